//! Tiny PNG chart renderer for evaluation reports: scatter plots with a label
//! beside every point, and line charts with markers and a legend.
//!
//! It exists so that quality and speed results can be turned into pictures
//! without pulling a plotting stack (fontconfig, freetype, cairo) into a crate
//! that already builds llama.cpp; the only dependency is `png`. Text uses a
//! built-in 5x7 bitmap font, so a chart renders identically on every machine.

use std::path::Path;

/// Output size in pixels; fixed so that charts from different runs line up
/// side by side in a report.
pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 600;

/// One labelled point of a scatter plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub label: String,
    pub x: f64,
    pub y: f64,
}

/// One line of a line chart. Points are joined in the order given (not sorted
/// by x), so parametric curves work; a non-finite point breaks the line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Titles and scale types shared by both chart kinds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Axes {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("writing chart: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding chart as PNG: {0}")]
    Png(String),
    #[error("nothing to plot: every value is non-finite, or non-positive on a log axis")]
    NoData,
}

/// Scatter plot, one labelled point per entry (label drawn next to the
/// point), e.g. "ΔPPL % vs bits per element" for KV-cache types.
///
/// Each point keeps the palette colour of its position in `points`, so the
/// same entry gets the same colour even when an earlier one is skipped.
pub fn scatter_png(points: &[Point], axes: &Axes, path: &Path) -> Result<(), PlotError> {
    let kept: Vec<(usize, &Point)> = points
        .iter()
        .enumerate()
        .filter(|(_, p)| usable(p.x, axes.log_x) && usable(p.y, axes.log_y))
        .collect();
    if kept.is_empty() {
        return Err(PlotError::NoData);
    }
    let xv: Vec<f64> = kept.iter().map(|(_, p)| p.x).collect();
    let yv: Vec<f64> = kept.iter().map(|(_, p)| p.y).collect();
    let xs = Scale::fit(&xv, axes.log_x);
    let ys = Scale::fit(&yv, axes.log_y);

    let mut c = Canvas::new(WIDTH as i32, HEIGHT as i32);
    let plot = draw_frame(&mut c, axes, &xs, &ys);
    let at: Vec<(f64, f64)> = kept
        .iter()
        .map(|(_, p)| plot.map(xs.frac(p.x), ys.frac(p.y)))
        .collect();

    c.clip = plot;
    let r = 5.0;
    for (&(i, _), &(x, y)) in kept.iter().zip(&at) {
        marker(&mut c, x, y, r, i, colour(i));
    }

    // Markers are obstacles from the start so that a label never hides a
    // point placed later in the list.
    let mut taken: Vec<Rect> = at
        .iter()
        .map(|&(x, y)| Rect::around(x, y, r + 1.0))
        .collect();
    let bounds = plot.inset(2);
    for (&(i, p), &(x, y)) in kept.iter().zip(&at) {
        let g = fit(&glyphs(&p.label), bounds.width(), TEXT_SCALE);
        if g.is_empty() {
            continue;
        }
        let (w, h) = (text_width(g.len(), TEXT_SCALE), GLYPH_H * TEXT_SCALE);
        let rect = place_label((x, y), r, w, h, bounds, &taken);
        draw_text(&mut c, rect.x0, rect.y0, &g, TEXT_SCALE, darken(colour(i)));
        taken.push(rect);
    }
    write_png(&c, path)
}

/// Line chart with markers, one coloured line per series and a legend, e.g.
/// "decode tokens/s vs context length".
///
/// A series whose points are all unusable still appears in the legend, so a
/// missing measurement is visible rather than silently dropped.
pub fn lines_png(series: &[Series], axes: &Axes, path: &Path) -> Result<(), PlotError> {
    let ok = |&(x, y): &(f64, f64)| usable(x, axes.log_x) && usable(y, axes.log_y);
    let xv: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().filter(|p| ok(p)).map(|p| p.0))
        .collect();
    if xv.is_empty() {
        return Err(PlotError::NoData);
    }
    let yv: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().filter(|p| ok(p)).map(|p| p.1))
        .collect();
    let xs = Scale::fit(&xv, axes.log_x);
    let ys = Scale::fit(&yv, axes.log_y);

    let mut c = Canvas::new(WIDTH as i32, HEIGHT as i32);
    let plot = draw_frame(&mut c, axes, &xs, &ys);
    // None marks a skipped point, where the line has to break.
    let mapped: Vec<Vec<Option<(f64, f64)>>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .map(|p| ok(p).then(|| plot.map(xs.frac(p.0), ys.frac(p.1))))
                .collect()
        })
        .collect();

    c.clip = plot;
    for (i, pts) in mapped.iter().enumerate() {
        for pair in pts.windows(2) {
            if let (Some(a), Some(b)) = (pair[0], pair[1]) {
                c.line(a, b, 2.2, colour(i));
            }
        }
    }
    // Markers go on top of every line so that crossings do not hide them.
    for (i, pts) in mapped.iter().enumerate() {
        for &(x, y) in pts.iter().flatten() {
            marker(&mut c, x, y, 3.5, i, colour(i));
        }
    }
    draw_legend(&mut c, series, &mapped, plot);
    write_png(&c, path)
}

fn usable(v: f64, log: bool) -> bool {
    v.is_finite() && (!log || v > 0.0)
}

// ---------------------------------------------------------------------------
// Scales and ticks

#[derive(Debug, Clone, PartialEq)]
struct Tick {
    value: f64,
    label: String,
}

/// Fraction of the axis added on each side, so markers at the extremes are
/// not cut in half by the frame.
const PAD: f64 = 0.06;

struct Scale {
    log: bool,
    /// Axis limits in transformed space (log10 of the value on a log axis).
    lo: f64,
    hi: f64,
    ticks: Vec<Tick>,
    /// Unlabelled gridlines (log axes only), in data space.
    minor: Vec<f64>,
}

impl Scale {
    /// `values` must be non-empty and all `usable` for this scale.
    fn fit(values: &[f64], log: bool) -> Scale {
        let t = |v: f64| if log { v.log10() } else { v };
        let mut lo = values.iter().map(|&v| t(v)).fold(f64::INFINITY, f64::min);
        let mut hi = values
            .iter()
            .map(|&v| t(v))
            .fold(f64::NEG_INFINITY, f64::max);
        let span = hi - lo;
        if span <= 1e-12 * lo.abs().max(hi.abs()) {
            // A single distinct value has no extent to scale; centre it in a
            // window that still yields a few readable ticks.
            let half = if log {
                0.5
            } else if lo == 0.0 {
                1.0
            } else {
                lo.abs() * 0.1
            };
            lo -= half;
            hi += half;
        } else {
            lo -= span * PAD;
            hi += span * PAD;
        }
        let (ticks, minor) = if log {
            log_ticks(lo, hi)
        } else {
            (linear_ticks(lo, hi, 5), Vec::new())
        };
        Scale {
            log,
            lo,
            hi,
            ticks,
            minor,
        }
    }

    fn frac(&self, v: f64) -> f64 {
        let t = if self.log { v.log10() } else { v };
        (t - self.lo) / (self.hi - self.lo)
    }
}

/// n * 10^e, computed so that the result is the double nearest the decimal
/// value (multiplying by 10^-e would not be), which keeps labels free of
/// digits like 0.30000000000000004.
fn dec(n: i64, e: i32) -> f64 {
    if e >= 0 {
        n as f64 * 10f64.powi(e)
    } else {
        n as f64 / 10f64.powi(-e)
    }
}

/// About `target` ticks inside [lo, hi] at a step of 1, 2 or 5 x 10^k.
fn linear_ticks(lo: f64, hi: f64, target: i64) -> Vec<Tick> {
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Vec::new();
    }
    let e0 = ((hi - lo) / target as f64).log10().floor() as i32;
    // (score, m, e, first, last); steps are visited in increasing order and
    // ties go to the later one, i.e. to fewer, sparser labels.
    let mut best: Option<(i64, i64, i32, i64, i64)> = None;
    for e in e0 - 1..=e0 + 1 {
        for m in [1, 2, 5] {
            let step = dec(m, e);
            let (first, last) = ((lo / step).ceil(), (hi / step).floor());
            if !(first.is_finite() && last.is_finite()) || last - first > 1000.0 {
                continue;
            }
            let count = (last - first) as i64 + 1;
            if count < 2 {
                continue;
            }
            let score = (count - target).abs();
            if !matches!(best, Some(b) if score > b.0) {
                best = Some((score, m, e, first as i64, last as i64));
            }
        }
    }
    let Some((_, m, e, first, last)) = best else {
        return Vec::new();
    };
    let sci = lo.abs().max(hi.abs()) >= 1e6 || dec(m, e) < 1e-3;
    (first..=last)
        .map(|i| {
            let value = dec(i * m, e);
            let label = if sci {
                sci_label(value)
            } else {
                format!("{:.*}", (-e).max(0) as usize, value)
            };
            Tick { value, label }
        })
        .collect()
}

fn sci_label(v: f64) -> String {
    if v == 0.0 {
        "0".to_string()
    } else {
        format!("{v:e}")
    }
}

/// Ticks for a log axis whose limits are given as log10 values: powers of
/// ten, thinned when there are many decades, with 2 and 5 in between when
/// there are few, and plain linear ticks when not even one decade fits.
fn log_ticks(lo: f64, hi: f64) -> (Vec<Tick>, Vec<f64>) {
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return (Vec::new(), Vec::new());
    }
    let label = |m: i64, k: i32| {
        let v = dec(m, k);
        // Plain decimals stay short only for a few decades around 1.
        let text = if (-3..=4).contains(&k) {
            format!("{v}")
        } else {
            format!("{v:e}")
        };
        Tick {
            value: v,
            label: text,
        }
    };
    // The epsilon keeps a limit that is a power of ten up to rounding (e.g.
    // log10(1000) = 2.9999999999999996) on the inside.
    let inside = |m: i64, k: i32| {
        let t = (m as f64).log10() + k as f64;
        t >= lo - 1e-9 && t <= hi + 1e-9
    };
    let k0 = (lo - 1e-9).ceil() as i32;
    let k1 = (hi + 1e-9).floor() as i32;
    let decades = k1 - k0 + 1;
    let span = (lo.floor() as i32)..=(hi.ceil() as i32);
    let minor_except = |skip: &[i64]| -> Vec<f64> {
        span.clone()
            .flat_map(|k| (2..=9).map(move |m| (m, k)))
            .filter(|&(m, k)| !skip.contains(&m) && inside(m, k))
            .map(|(m, k)| dec(m, k))
            .collect()
    };
    if decades > 7 {
        let stride = (decades + 6) / 7;
        let ticks = (k0..=k1)
            .filter(|k| k.rem_euclid(stride) == 0)
            .map(|k| label(1, k))
            .collect();
        return (ticks, Vec::new());
    }
    if decades >= 3 {
        let ticks = (k0..=k1).map(|k| label(1, k)).collect();
        return (ticks, minor_except(&[]));
    }
    let ticks: Vec<Tick> = span
        .clone()
        .flat_map(|k| [1, 2, 5].map(|m| (m, k)))
        .filter(|&(m, k)| inside(m, k))
        .map(|(m, k)| label(m, k))
        .collect();
    if ticks.len() >= 3 {
        return (ticks, minor_except(&[2, 5]));
    }
    let lin = linear_ticks(10f64.powf(lo), 10f64.powf(hi), 4);
    (
        lin.into_iter().filter(|t| t.value > 0.0).collect(),
        Vec::new(),
    )
}

// ---------------------------------------------------------------------------
// Layout

const MARGIN: i32 = 12;
const TICK_LEN: i32 = 5;
const TEXT_SCALE: i32 = 2;
const TITLE_SCALE: i32 = 3;

type Rgb = [u8; 3];
const TEXT: Rgb = [34, 34, 34];
const AXIS: Rgb = [90, 90, 90];
const GRID: Rgb = [222, 222, 222];
const GRID_MINOR: Rgb = [241, 241, 241];
const LEGEND_BORDER: Rgb = [170, 170, 170];

/// Tableau 10: distinct for most colour-blind viewers and on white.
const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

fn colour(i: usize) -> Rgb {
    PALETTE[i % PALETTE.len()]
}

/// Text in a pale palette colour (olive, cyan) is hard to read when thin.
fn darken(c: Rgb) -> Rgb {
    c.map(|v| (v as f64 * 0.75) as u8)
}

/// Pixel rectangle, x0..x1 and y0..y1 half-open.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rect {
    x0: i32,
    y0: i32,
    x1: i32,
    y1: i32,
}

impl Rect {
    fn new(x0: i32, y0: i32, w: i32, h: i32) -> Rect {
        Rect {
            x0,
            y0,
            x1: x0 + w,
            y1: y0 + h,
        }
    }

    fn around(x: f64, y: f64, r: f64) -> Rect {
        Rect {
            x0: (x - r).floor() as i32,
            y0: (y - r).floor() as i32,
            x1: (x + r).ceil() as i32 + 1,
            y1: (y + r).ceil() as i32 + 1,
        }
    }

    fn width(&self) -> i32 {
        self.x1 - self.x0
    }

    fn height(&self) -> i32 {
        self.y1 - self.y0
    }

    fn inset(&self, d: i32) -> Rect {
        Rect {
            x0: self.x0 + d,
            y0: self.y0 + d,
            x1: self.x1 - d,
            y1: self.y1 - d,
        }
    }

    fn contains(&self, o: &Rect) -> bool {
        o.x0 >= self.x0 && o.y0 >= self.y0 && o.x1 <= self.x1 && o.y1 <= self.y1
    }

    fn overlap(&self, o: &Rect) -> i64 {
        let w = (self.x1.min(o.x1) - self.x0.max(o.x0)).max(0) as i64;
        let h = (self.y1.min(o.y1) - self.y0.max(o.y0)).max(0) as i64;
        w * h
    }

    /// Axis fractions to pixel centres; y grows upwards on the chart.
    fn map(&self, fx: f64, fy: f64) -> (f64, f64) {
        (
            self.x0 as f64 + 0.5 + fx * (self.width() - 1) as f64,
            self.y1 as f64 - 0.5 - fy * (self.height() - 1) as f64,
        )
    }
}

/// Draws title, axis titles, grid, ticks and frame; returns the plot area
/// that data goes into. Left and bottom margins follow the tick labels, so a
/// long y label such as "1.0e-5" never collides with the axis title.
fn draw_frame(c: &mut Canvas, axes: &Axes, xs: &Scale, ys: &Scale) -> Rect {
    let (w, h) = (c.w, c.h);
    let line_h = GLYPH_H * TEXT_SCALE;

    let mut top = MARGIN;
    let title = glyphs(&axes.title);
    if title.is_empty() {
        top += 8;
    } else {
        let room = w - 2 * MARGIN;
        let s = if text_width(title.len(), TITLE_SCALE) <= room {
            TITLE_SCALE
        } else {
            TEXT_SCALE
        };
        let t = fit(&title, room, s);
        draw_text(c, (w - text_width(t.len(), s)) / 2, top, &t, s, TEXT);
        top += GLYPH_H * s + 16;
    }

    let ylabels: Vec<Vec<Glyph>> = ys.ticks.iter().map(|t| glyphs(&t.label)).collect();
    let ylab_w = ylabels
        .iter()
        .map(|g| text_width(g.len(), TEXT_SCALE))
        .max()
        .unwrap_or(0);
    let ytitle = glyphs(&axes.y_label);
    let xtitle = glyphs(&axes.x_label);
    let mut left = MARGIN + ylab_w + 6 + TICK_LEN;
    if !ytitle.is_empty() {
        left += line_h + 12;
    }
    let mut bottom = h - MARGIN - line_h - 6 - TICK_LEN;
    if !xtitle.is_empty() {
        bottom -= line_h + 10;
    }
    let plot = Rect {
        x0: left,
        y0: top,
        x1: w - 28,
        y1: bottom,
    };

    for &v in &xs.minor {
        let x = plot.map(xs.frac(v), 0.0).0 as i32;
        c.fill(Rect::new(x, plot.y0, 1, plot.height()), GRID_MINOR);
    }
    for &v in &ys.minor {
        let y = plot.map(0.0, ys.frac(v)).1 as i32;
        c.fill(Rect::new(plot.x0, y, plot.width(), 1), GRID_MINOR);
    }

    let xpos: Vec<i32> = xs
        .ticks
        .iter()
        .map(|t| plot.map(xs.frac(t.value), 0.0).0 as i32)
        .collect();
    let xlabels: Vec<Vec<Glyph>> = xs.ticks.iter().map(|t| glyphs(&t.label)).collect();
    let xlab_w = xlabels
        .iter()
        .map(|g| text_width(g.len(), TEXT_SCALE))
        .max()
        .unwrap_or(0);
    let xstride = label_stride(&xpos, xlab_w + 10);
    for (i, (&x, g)) in xpos.iter().zip(&xlabels).enumerate() {
        c.fill(Rect::new(x, plot.y0, 1, plot.height()), GRID);
        c.fill(Rect::new(x, plot.y1, 1, TICK_LEN + 1), AXIS);
        if i % xstride == 0 {
            let tw = text_width(g.len(), TEXT_SCALE);
            let tx = (x - tw / 2).clamp(2, w - 2 - tw);
            draw_text(c, tx, plot.y1 + TICK_LEN + 6, g, TEXT_SCALE, TEXT);
        }
    }

    let ypos: Vec<i32> = ys
        .ticks
        .iter()
        .map(|t| plot.map(0.0, ys.frac(t.value)).1 as i32)
        .collect();
    let ystride = label_stride(&ypos, line_h + 4);
    for (i, (&y, g)) in ypos.iter().zip(&ylabels).enumerate() {
        c.fill(Rect::new(plot.x0, y, plot.width(), 1), GRID);
        c.fill(Rect::new(plot.x0 - TICK_LEN - 1, y, TICK_LEN + 1, 1), AXIS);
        if i % ystride == 0 {
            let tw = text_width(g.len(), TEXT_SCALE);
            let tx = plot.x0 - TICK_LEN - 6 - tw;
            draw_text(c, tx, y - CAP_H * TEXT_SCALE / 2, g, TEXT_SCALE, TEXT);
        }
    }

    // The frame sits just outside the plot area, so data never covers it.
    let frame = plot.inset(-1);
    c.fill(Rect::new(frame.x0, frame.y0, frame.width(), 1), AXIS);
    c.fill(Rect::new(frame.x0, frame.y1 - 1, frame.width(), 1), AXIS);
    c.fill(Rect::new(frame.x0, frame.y0, 1, frame.height()), AXIS);
    c.fill(Rect::new(frame.x1 - 1, frame.y0, 1, frame.height()), AXIS);

    if !xtitle.is_empty() {
        let t = fit(&xtitle, w - 2 * MARGIN, TEXT_SCALE);
        let tw = text_width(t.len(), TEXT_SCALE);
        let tx = (plot.x0 + plot.width() / 2 - tw / 2).clamp(MARGIN, w - MARGIN - tw);
        draw_text(c, tx, h - MARGIN - line_h, &t, TEXT_SCALE, TEXT);
    }
    if !ytitle.is_empty() {
        let t = fit(&ytitle, h - 2 * MARGIN, TEXT_SCALE);
        let tw = text_width(t.len(), TEXT_SCALE);
        let base = (plot.y0 + plot.height() / 2 + tw / 2).clamp(MARGIN + tw, h - MARGIN);
        draw_text_up(c, MARGIN, base, &t, TEXT_SCALE, TEXT);
    }
    plot
}

/// Label every n-th tick, n chosen so that labels `need` pixels apart fit.
fn label_stride(pos: &[i32], need: i32) -> usize {
    let gap = pos
        .windows(2)
        .map(|p| (p[1] - p[0]).abs())
        .min()
        .unwrap_or(i32::MAX)
        .max(1);
    ((need + gap - 1) / gap).max(1) as usize
}

/// Picks where a point's label goes: beside the marker when there is room,
/// flipping to the left near the right edge, then above or below; among
/// spots inside `bounds` the one overlapping fewest markers and labels wins.
fn place_label(at: (f64, f64), r: f64, w: i32, h: i32, bounds: Rect, taken: &[Rect]) -> Rect {
    let (x, y) = (at.0.round() as i32, at.1.round() as i32);
    let r = r.ceil() as i32;
    let candidates = [
        (x + r + 5, y - h / 2),
        (x - r - 5 - w, y - h / 2),
        (x + r + 2, y - r - 2 - h),
        (x + r + 2, y + r + 2),
        (x - r - 2 - w, y - r - 2 - h),
        (x - r - 2 - w, y + r + 2),
        (x - w / 2, y - r - 4 - h),
        (x - w / 2, y + r + 4),
    ];
    let mut best: Option<(i64, Rect)> = None;
    for (cx, cy) in candidates {
        let rect = Rect::new(cx, cy, w, h);
        if !bounds.contains(&rect) {
            continue;
        }
        let cost: i64 = taken.iter().map(|t| t.overlap(&rect)).sum();
        if cost == 0 {
            return rect;
        }
        if !matches!(best, Some(b) if cost >= b.0) {
            best = Some((cost, rect));
        }
    }
    best.map(|b| b.1).unwrap_or_else(|| {
        // No spot fits (a label nearly as wide as the plot): slide the
        // right-hand spot inside the bounds rather than off the image.
        let cx = (x + r + 5).min(bounds.x1 - w).max(bounds.x0);
        let cy = (y - h / 2).clamp(bounds.y0, (bounds.y1 - h).max(bounds.y0));
        Rect::new(cx, cy, w, h)
    })
}

fn draw_legend(c: &mut Canvas, series: &[Series], mapped: &[Vec<Option<(f64, f64)>>], plot: Rect) {
    if series.is_empty() {
        return;
    }
    let row_h = GLYPH_H * TEXT_SCALE + 6;
    let swatch = 26;
    let max_rows = ((plot.height() - 20) / row_h).max(1) as usize;
    let mut rows: Vec<(Vec<Glyph>, Option<usize>)> = series
        .iter()
        .enumerate()
        .map(|(i, s)| (glyphs(&s.label), Some(i)))
        .collect();
    if rows.len() > max_rows {
        // Better a visible count of what was left out than a legend taller
        // than the chart.
        let more = rows.len() - (max_rows - 1);
        rows.truncate(max_rows - 1);
        rows.push((glyphs(&format!("+{more} more")), None));
    }
    let label_room = plot.width() * 45 / 100;
    for row in &mut rows {
        row.0 = fit(&row.0, label_room, TEXT_SCALE);
    }
    let label_w = rows
        .iter()
        .map(|r| text_width(r.0.len(), TEXT_SCALE))
        .max()
        .unwrap_or(0);
    let (bw, bh) = (
        8 + swatch + 8 + label_w + 8,
        8 + rows.len() as i32 * row_h + 2,
    );

    // The legend goes into the corner that hides the fewest line pixels,
    // sampled along every segment, preferring the top right on ties.
    let inner = plot.inset(8);
    let corners = [
        Rect::new(inner.x1 - bw, inner.y0, bw, bh),
        Rect::new(inner.x0, inner.y0, bw, bh),
        Rect::new(inner.x1 - bw, inner.y1 - bh, bw, bh),
        Rect::new(inner.x0, inner.y1 - bh, bw, bh),
    ];
    let mut samples = Vec::new();
    for pts in mapped {
        for pair in pts.windows(2) {
            if let (Some(a), Some(b)) = (pair[0], pair[1]) {
                let n = ((b.0 - a.0).hypot(b.1 - a.1) / 3.0).ceil().max(1.0) as usize;
                for k in 0..=n {
                    let t = k as f64 / n as f64;
                    samples.push((a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t));
                }
            }
        }
        samples.extend(pts.iter().flatten().copied());
    }
    let hits = |r: &Rect| {
        samples
            .iter()
            .filter(|&&(x, y)| {
                x >= r.x0 as f64 && x < r.x1 as f64 && y >= r.y0 as f64 && y < r.y1 as f64
            })
            .count()
    };
    let mut best = corners[0];
    let mut best_hits = hits(&best);
    for r in &corners[1..] {
        let h = hits(r);
        if h < best_hits {
            best = *r;
            best_hits = h;
        }
    }

    c.fill(best, [255, 255, 255]);
    let b = best;
    c.fill(Rect::new(b.x0, b.y0, b.width(), 1), LEGEND_BORDER);
    c.fill(Rect::new(b.x0, b.y1 - 1, b.width(), 1), LEGEND_BORDER);
    c.fill(Rect::new(b.x0, b.y0, 1, b.height()), LEGEND_BORDER);
    c.fill(Rect::new(b.x1 - 1, b.y0, 1, b.height()), LEGEND_BORDER);
    for (row, (g, idx)) in rows.iter().enumerate() {
        let ty = b.y0 + 8 + row as i32 * row_h;
        let cy = ty as f64 + (CAP_H * TEXT_SCALE) as f64 / 2.0;
        if let Some(i) = *idx {
            let x0 = (b.x0 + 8) as f64;
            c.line((x0, cy), (x0 + swatch as f64, cy), 2.2, colour(i));
            marker(c, x0 + swatch as f64 / 2.0, cy, 3.5, i, colour(i));
        }
        draw_text(c, b.x0 + 8 + swatch + 8, ty, g, TEXT_SCALE, TEXT);
    }
}

/// Filled marker; past ten entries the palette repeats, so the shape changes
/// instead (circle, square, triangle, diamond) to keep entries apart. A white
/// ring separates overlapping markers.
fn marker(c: &mut Canvas, x: f64, y: f64, r: f64, index: usize, col: Rgb) {
    let shape = (index / PALETTE.len()) % 4;
    let inside = move |dx: f64, dy: f64, r: f64| match shape {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        2 => dy <= r * 0.75 && dy >= -r && dx.abs() <= (dy + r) * 0.6,
        _ => dx.abs() + dy.abs() <= r * 1.2,
    };
    c.shape(x, y, r + 1.5, [255, 255, 255], |dx, dy| {
        inside(dx, dy, r + 1.5)
    });
    c.shape(x, y, r, col, |dx, dy| inside(dx, dy, r));
}

// ---------------------------------------------------------------------------
// Raster

struct Canvas {
    w: i32,
    h: i32,
    px: Vec<u8>,
    /// Drawing outside this is dropped; data drawing sets it to the plot area.
    clip: Rect,
}

impl Canvas {
    fn new(w: i32, h: i32) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; (w * h * 3) as usize],
            clip: Rect::new(0, 0, w, h),
        }
    }

    fn blend(&mut self, x: i32, y: i32, c: Rgb, a: f64) {
        let k = &self.clip;
        if a <= 0.0 || x < k.x0 || y < k.y0 || x >= k.x1 || y >= k.y1 {
            return;
        }
        if x < 0 || y < 0 || x >= self.w || y >= self.h {
            return;
        }
        let i = ((y * self.w + x) * 3) as usize;
        let a = a.min(1.0);
        for (p, &v) in self.px[i..i + 3].iter_mut().zip(&c) {
            *p = (*p as f64 * (1.0 - a) + v as f64 * a).round() as u8;
        }
    }

    fn fill(&mut self, r: Rect, c: Rgb) {
        for y in r.y0..r.y1 {
            for x in r.x0..r.x1 {
                self.blend(x, y, c, 1.0);
            }
        }
    }

    /// Anti-aliased line of the given width: coverage falls off linearly over
    /// one pixel from the segment's edge, which is cheap and looks smooth.
    fn line(&mut self, a: (f64, f64), b: (f64, f64), width: f64, c: Rgb) {
        let half = width / 2.0;
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len2 = dx * dx + dy * dy;
        let x0 = (a.0.min(b.0) - half - 1.0).floor() as i32;
        let x1 = (a.0.max(b.0) + half + 1.0).ceil() as i32;
        let y0 = (a.1.min(b.1) - half - 1.0).floor() as i32;
        let y1 = (a.1.max(b.1) + half + 1.0).ceil() as i32;
        for y in y0.max(self.clip.y0)..=y1.min(self.clip.y1 - 1) {
            for x in x0.max(self.clip.x0)..=x1.min(self.clip.x1 - 1) {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let t = if len2 > 0.0 {
                    (((px - a.0) * dx + (py - a.1) * dy) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let d = (px - a.0 - t * dx).hypot(py - a.1 - t * dy);
                self.blend(x, y, c, (half + 0.5 - d).clamp(0.0, 1.0));
            }
        }
    }

    /// Fills the set `inside(dx, dy)` (offsets from the centre) within radius
    /// `r`, 4x4 supersampled so that any shape gets smooth edges.
    fn shape(&mut self, cx: f64, cy: f64, r: f64, c: Rgb, inside: impl Fn(f64, f64) -> bool) {
        let (x0, x1) = ((cx - r - 1.0).floor() as i32, (cx + r + 1.0).ceil() as i32);
        let (y0, y1) = ((cy - r - 1.0).floor() as i32, (cy + r + 1.0).ceil() as i32);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let mut n = 0;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let dx = x as f64 + (sx as f64 + 0.5) / 4.0 - cx;
                        let dy = y as f64 + (sy as f64 + 0.5) / 4.0 - cy;
                        if inside(dx, dy) {
                            n += 1;
                        }
                    }
                }
                self.blend(x, y, c, n as f64 / 16.0);
            }
        }
    }
}

fn write_png(c: &Canvas, path: &Path) -> Result<(), PlotError> {
    let png_err = |e: png::EncodingError| match e {
        png::EncodingError::IoError(e) => PlotError::Io(e),
        other => PlotError::Png(other.to_string()),
    };
    // Encoding into memory first means a failed write is reported, where a
    // BufWriter dropped inside the encoder would swallow its flush error.
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, c.w as u32, c.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // Charts are mostly flat colour; the slower settings cost a few
        // milliseconds and shrink the file several times over.
        enc.set_compression(png::Compression::Best);
        enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(&c.px).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Text

const GLYPH_W: i32 = 5;
/// Cell height: capitals use the top seven rows, descenders the eighth.
const GLYPH_H: i32 = 8;
const CAP_H: i32 = 7;
/// Glyph width plus one column of spacing.
const ADVANCE: i32 = GLYPH_W + 1;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Glyph {
    Ascii(u8),
    /// Drawn as a hollow box, so a missing character is seen, not dropped.
    Unknown,
}

/// Maps text onto the font: printable ASCII as is, common symbols from
/// metric names to ASCII look-alikes, anything else to the placeholder box.
fn glyphs(s: &str) -> Vec<Glyph> {
    let mut out = Vec::new();
    for ch in s.chars() {
        let sub = match ch {
            ' '..='~' => {
                out.push(Glyph::Ascii(ch as u8));
                continue;
            }
            'Δ' | 'δ' => "d",
            'µ' | 'μ' => "u",
            'α' => "a",
            'β' => "b",
            'σ' => "s",
            'λ' => "l",
            '×' => "x",
            '·' | '•' => ".",
            '±' => "+-",
            '≤' => "<=",
            '≥' => ">=",
            '≈' => "~",
            '→' => "->",
            '–' | '—' | '−' => "-",
            '‘' | '’' => "'",
            '“' | '”' => "\"",
            '…' => "...",
            '\t' => " ",
            _ => {
                out.push(Glyph::Unknown);
                continue;
            }
        };
        out.extend(sub.bytes().map(Glyph::Ascii));
    }
    out
}

fn text_width(n: usize, scale: i32) -> i32 {
    if n == 0 {
        0
    } else {
        (n as i32 * ADVANCE - 1) * scale
    }
}

/// Shortens text to `max_w` pixels with a trailing "...".
fn fit(g: &[Glyph], max_w: i32, scale: i32) -> Vec<Glyph> {
    if text_width(g.len(), scale) <= max_w {
        return g.to_vec();
    }
    let mut keep = g.len();
    while keep > 0 && text_width(keep + 3, scale) > max_w {
        keep -= 1;
    }
    let mut out = g[..keep].to_vec();
    out.extend([Glyph::Ascii(b'.'); 3]);
    out
}

fn glyph_on(g: Glyph, col: i32, row: i32) -> bool {
    match g {
        Glyph::Ascii(b) => FONT[(b - b' ') as usize][col as usize] >> row & 1 == 1,
        Glyph::Unknown => {
            row < CAP_H && (col == 0 || col == GLYPH_W - 1 || row == 0 || row == CAP_H - 1)
        }
    }
}

/// Left-to-right text with its top-left corner at (x, y).
fn draw_text(c: &mut Canvas, x: i32, y: i32, text: &[Glyph], scale: i32, col: Rgb) {
    for (i, &g) in text.iter().enumerate() {
        let gx = x + i as i32 * ADVANCE * scale;
        for gc in 0..GLYPH_W {
            for gr in 0..GLYPH_H {
                if glyph_on(g, gc, gr) {
                    c.fill(
                        Rect::new(gx + gc * scale, y + gr * scale, scale, scale),
                        col,
                    );
                }
            }
        }
    }
}

/// Text rotated a quarter turn anticlockwise (reading upwards, as a y-axis
/// title does), starting at bottom-left (x, y).
fn draw_text_up(c: &mut Canvas, x: i32, y: i32, text: &[Glyph], scale: i32, col: Rgb) {
    for (i, &g) in text.iter().enumerate() {
        for gc in 0..GLYPH_W {
            for gr in 0..GLYPH_H {
                if glyph_on(g, gc, gr) {
                    let along = i as i32 * ADVANCE + gc;
                    c.fill(
                        Rect::new(x + gr * scale, y - (along + 1) * scale, scale, scale),
                        col,
                    );
                }
            }
        }
    }
}

/// Classic 5x7 font for ' '..='~', five columns per glyph with bit 0 at the
/// top; g, j, p, q, y and the comma use an eighth row for their descenders.
const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5F, 0x00, 0x00], // !
    [0x00, 0x07, 0x00, 0x07, 0x00], // "
    [0x14, 0x7F, 0x14, 0x7F, 0x14], // #
    [0x24, 0x2A, 0x7F, 0x2A, 0x12], // $
    [0x23, 0x13, 0x08, 0x64, 0x62], // %
    [0x36, 0x49, 0x55, 0x22, 0x50], // &
    [0x00, 0x05, 0x03, 0x00, 0x00], // '
    [0x00, 0x1C, 0x22, 0x41, 0x00], // (
    [0x00, 0x41, 0x22, 0x1C, 0x00], // )
    [0x14, 0x08, 0x3E, 0x08, 0x14], // *
    [0x08, 0x08, 0x3E, 0x08, 0x08], // +
    [0x00, 0xA0, 0x60, 0x00, 0x00], // ,
    [0x08, 0x08, 0x08, 0x08, 0x08], // -
    [0x00, 0x60, 0x60, 0x00, 0x00], // .
    [0x20, 0x10, 0x08, 0x04, 0x02], // /
    [0x3E, 0x51, 0x49, 0x45, 0x3E], // 0
    [0x00, 0x42, 0x7F, 0x40, 0x00], // 1
    [0x42, 0x61, 0x51, 0x49, 0x46], // 2
    [0x21, 0x41, 0x45, 0x4B, 0x31], // 3
    [0x18, 0x14, 0x12, 0x7F, 0x10], // 4
    [0x27, 0x45, 0x45, 0x45, 0x39], // 5
    [0x3C, 0x4A, 0x49, 0x49, 0x30], // 6
    [0x01, 0x71, 0x09, 0x05, 0x03], // 7
    [0x36, 0x49, 0x49, 0x49, 0x36], // 8
    [0x06, 0x49, 0x49, 0x29, 0x1E], // 9
    [0x00, 0x36, 0x36, 0x00, 0x00], // :
    [0x00, 0x56, 0x36, 0x00, 0x00], // ;
    [0x08, 0x14, 0x22, 0x41, 0x00], // <
    [0x14, 0x14, 0x14, 0x14, 0x14], // =
    [0x00, 0x41, 0x22, 0x14, 0x08], // >
    [0x02, 0x01, 0x51, 0x09, 0x06], // ?
    [0x32, 0x49, 0x79, 0x41, 0x3E], // @
    [0x7E, 0x11, 0x11, 0x11, 0x7E], // A
    [0x7F, 0x49, 0x49, 0x49, 0x36], // B
    [0x3E, 0x41, 0x41, 0x41, 0x22], // C
    [0x7F, 0x41, 0x41, 0x22, 0x1C], // D
    [0x7F, 0x49, 0x49, 0x49, 0x41], // E
    [0x7F, 0x09, 0x09, 0x09, 0x01], // F
    [0x3E, 0x41, 0x49, 0x49, 0x7A], // G
    [0x7F, 0x08, 0x08, 0x08, 0x7F], // H
    [0x00, 0x41, 0x7F, 0x41, 0x00], // I
    [0x20, 0x40, 0x41, 0x3F, 0x01], // J
    [0x7F, 0x08, 0x14, 0x22, 0x41], // K
    [0x7F, 0x40, 0x40, 0x40, 0x40], // L
    [0x7F, 0x02, 0x0C, 0x02, 0x7F], // M
    [0x7F, 0x04, 0x08, 0x10, 0x7F], // N
    [0x3E, 0x41, 0x41, 0x41, 0x3E], // O
    [0x7F, 0x09, 0x09, 0x09, 0x06], // P
    [0x3E, 0x41, 0x51, 0x21, 0x5E], // Q
    [0x7F, 0x09, 0x19, 0x29, 0x46], // R
    [0x46, 0x49, 0x49, 0x49, 0x31], // S
    [0x01, 0x01, 0x7F, 0x01, 0x01], // T
    [0x3F, 0x40, 0x40, 0x40, 0x3F], // U
    [0x1F, 0x20, 0x40, 0x20, 0x1F], // V
    [0x3F, 0x40, 0x38, 0x40, 0x3F], // W
    [0x63, 0x14, 0x08, 0x14, 0x63], // X
    [0x07, 0x08, 0x70, 0x08, 0x07], // Y
    [0x61, 0x51, 0x49, 0x45, 0x43], // Z
    [0x00, 0x7F, 0x41, 0x41, 0x00], // [
    [0x02, 0x04, 0x08, 0x10, 0x20], // backslash
    [0x00, 0x41, 0x41, 0x7F, 0x00], // ]
    [0x04, 0x02, 0x01, 0x02, 0x04], // ^
    [0x40, 0x40, 0x40, 0x40, 0x40], // _
    [0x00, 0x01, 0x02, 0x04, 0x00], // `
    [0x20, 0x54, 0x54, 0x54, 0x78], // a
    [0x7F, 0x48, 0x44, 0x44, 0x38], // b
    [0x38, 0x44, 0x44, 0x44, 0x20], // c
    [0x38, 0x44, 0x44, 0x48, 0x7F], // d
    [0x38, 0x54, 0x54, 0x54, 0x18], // e
    [0x08, 0x7E, 0x09, 0x01, 0x02], // f
    [0x98, 0xA4, 0xA4, 0xA4, 0x7C], // g
    [0x7F, 0x08, 0x04, 0x04, 0x78], // h
    [0x00, 0x44, 0x7D, 0x40, 0x00], // i
    [0x40, 0x80, 0x80, 0x7D, 0x00], // j
    [0x00, 0x7F, 0x10, 0x28, 0x44], // k
    [0x00, 0x41, 0x7F, 0x40, 0x00], // l
    [0x7C, 0x04, 0x18, 0x04, 0x78], // m
    [0x7C, 0x08, 0x04, 0x04, 0x78], // n
    [0x38, 0x44, 0x44, 0x44, 0x38], // o
    [0xFC, 0x24, 0x24, 0x24, 0x18], // p
    [0x18, 0x24, 0x24, 0x24, 0xFC], // q
    [0x7C, 0x08, 0x04, 0x04, 0x08], // r
    [0x48, 0x54, 0x54, 0x54, 0x20], // s
    [0x04, 0x3F, 0x44, 0x40, 0x20], // t
    [0x3C, 0x40, 0x40, 0x20, 0x7C], // u
    [0x1C, 0x20, 0x40, 0x20, 0x1C], // v
    [0x3C, 0x40, 0x30, 0x40, 0x3C], // w
    [0x44, 0x28, 0x10, 0x28, 0x44], // x
    [0x9C, 0xA0, 0xA0, 0xA0, 0x7C], // y
    [0x44, 0x64, 0x54, 0x4C, 0x44], // z
    [0x00, 0x08, 0x36, 0x41, 0x00], // {
    [0x00, 0x00, 0x7F, 0x00, 0x00], // |
    [0x00, 0x41, 0x36, 0x08, 0x00], // }
    [0x08, 0x04, 0x08, 0x10, 0x08], // ~
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ottkv-plot-{}-{name}.png", std::process::id()))
    }

    /// Decodes a written chart; returns its RGB bytes after checking the format.
    fn decode(path: &Path) -> Vec<u8> {
        let file = std::fs::File::open(path).unwrap();
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        buf
    }

    fn has_colour(buf: &[u8], c: Rgb) -> bool {
        buf.chunks_exact(3).any(|p| p == c)
    }

    fn values(t: &[Tick]) -> Vec<f64> {
        t.iter().map(|t| t.value).collect()
    }

    fn labels(t: &[Tick]) -> Vec<&str> {
        t.iter().map(|t| t.label.as_str()).collect()
    }

    #[test]
    fn scatter_writes_png_of_expected_size() {
        let points = vec![
            Point {
                label: "f16".into(),
                x: 16.0,
                y: 0.0,
            },
            Point {
                label: "q8_0".into(),
                x: 8.5,
                y: 0.02,
            },
            Point {
                label: "q4_0".into(),
                x: 4.5,
                y: 0.9,
            },
            Point {
                label: "ottkv-2bit".into(),
                x: 2.3,
                y: f64::NAN,
            },
        ];
        let axes = Axes {
            title: "ΔPPL % vs bits per element".into(),
            x_label: "bits per element".into(),
            y_label: "ΔPPL %".into(),
            ..Axes::default()
        };
        let path = tmp("scatter");
        scatter_png(&points, &axes, &path).unwrap();
        let buf = decode(&path);
        assert_eq!(&buf[..3], &[255, 255, 255], "white background");
        for i in 0..3 {
            assert!(has_colour(&buf, colour(i)), "point {i} drawn");
        }
        assert!(!has_colour(&buf, colour(3)), "NaN point skipped");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn lines_write_png_on_log_axes() {
        let series: Vec<Series> = (0..3)
            .map(|s| Series {
                label: format!("type {s}"),
                points: (0..7)
                    .map(|k| {
                        let ctx = 512.0 * 2f64.powi(k);
                        (ctx, 100.0 / (1.0 + s as f64) / (1.0 + ctx / 8192.0))
                    })
                    .collect(),
            })
            .collect();
        let axes = Axes {
            title: "decode tokens/s vs context length".into(),
            x_label: "context length (tokens)".into(),
            y_label: "tokens/s".into(),
            log_x: true,
            log_y: true,
        };
        let path = tmp("lines");
        lines_png(&series, &axes, &path).unwrap();
        let buf = decode(&path);
        for i in 0..3 {
            assert!(has_colour(&buf, colour(i)), "series {i} drawn");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn linear_ticks_are_nice() {
        let t = linear_ticks(0.0, 10.0, 5);
        assert_eq!(values(&t), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(labels(&t), ["0", "2", "4", "6", "8", "10"]);

        let t = linear_ticks(0.0, 1.0, 5);
        assert_eq!(labels(&t), ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);

        let t = linear_ticks(0.95, 1.05, 5);
        assert_eq!(labels(&t), ["0.96", "0.98", "1.00", "1.02", "1.04"]);

        let t = linear_ticks(-37.0, 122.0, 5);
        assert_eq!(values(&t), [0.0, 50.0, 100.0]);

        let t = linear_ticks(0.0, 3.2e7, 5);
        assert_eq!(labels(&t), ["0", "1e7", "2e7", "3e7"]);

        let t = linear_ticks(1.2e-5, 4.9e-5, 5);
        assert_eq!(labels(&t), ["2e-5", "3e-5", "4e-5"]);

        // Whatever the range, steps are 1, 2 or 5 x 10^k and ticks lie inside.
        for (lo, hi) in [(0.3, 0.7), (-1.0, 1.0), (123.0, 4567.0), (-9e-3, -1e-3)] {
            let t = linear_ticks(lo, hi, 5);
            assert!((3..=8).contains(&t.len()), "{lo}..{hi}: {t:?}");
            assert!(t.iter().all(|t| t.value >= lo && t.value <= hi));
            let step = t[1].value - t[0].value;
            let m = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0].iter().any(|n| (m - n).abs() < 1e-9),
                "{step}"
            );
        }
    }

    #[test]
    fn log_ticks_are_nice() {
        let (t, minor) = log_ticks(0.0, 6.0);
        assert_eq!(values(&t), [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6]);
        assert_eq!(
            labels(&t),
            ["1", "10", "100", "1000", "10000", "1e5", "1e6"]
        );
        assert!(minor.contains(&20.0));

        // A narrow range gets 2 and 5 between the powers of ten.
        let (t, _) = log_ticks(10f64.log10(), 500f64.log10());
        assert_eq!(labels(&t), ["10", "20", "50", "100", "200", "500"]);

        let (t, _) = log_ticks(-3.2, -1.9);
        assert_eq!(labels(&t), ["0.001", "0.002", "0.005", "0.01"]);

        // Many decades are thinned to every other one.
        let (t, _) = log_ticks(-6.0, 6.0);
        assert_eq!(t.len(), 7);
        assert_eq!(t[0].label, "1e-6");

        // Under one decade falls back to linear steps.
        let (t, _) = log_ticks(100f64.log10(), 130f64.log10());
        assert_eq!(values(&t), [100.0, 110.0, 120.0, 130.0]);
    }

    #[test]
    fn equal_values_still_get_a_range() {
        let s = Scale::fit(&[3.0, 3.0, 3.0], false);
        assert!(s.lo < 3.0 && s.hi > 3.0);
        assert!(s.ticks.len() >= 3);
        let s = Scale::fit(&[0.0], false);
        assert!(s.lo < 0.0 && s.hi > 0.0 && s.ticks.len() >= 3);
        let s = Scale::fit(&[100.0], true);
        assert!((s.frac(100.0) - 0.5).abs() < 1e-9);
        assert!(s.ticks.len() >= 3);

        let one = [Point {
            label: "only".into(),
            x: 2.0,
            y: 2.0,
        }];
        let path = tmp("single");
        scatter_png(&one, &Axes::default(), &path).unwrap();
        decode(&path);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unusable_inputs_are_skipped() {
        let axes = Axes::default();
        let path = tmp("nodata");
        let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
        let points: Vec<Point> = bad
            .iter()
            .map(|&v| Point {
                label: "x".into(),
                x: v,
                y: 1.0,
            })
            .collect();
        assert!(matches!(
            scatter_png(&points, &axes, &path),
            Err(PlotError::NoData)
        ));
        assert!(matches!(
            scatter_png(&[], &axes, &path),
            Err(PlotError::NoData)
        ));
        let series = [Series {
            label: "s".into(),
            points: bad.iter().map(|&v| (1.0, v)).collect(),
        }];
        assert!(matches!(
            lines_png(&series, &axes, &path),
            Err(PlotError::NoData)
        ));
        assert!(matches!(
            lines_png(&[], &axes, &path),
            Err(PlotError::NoData)
        ));

        // Non-positive values cannot sit on a log axis.
        let log = Axes {
            log_y: true,
            ..Axes::default()
        };
        let series = [Series {
            label: "s".into(),
            points: vec![(1.0, 0.0), (2.0, -3.0)],
        }];
        assert!(matches!(
            lines_png(&series, &log, &path),
            Err(PlotError::NoData)
        ));
        assert!(!path.exists(), "no file is written without data");

        // One usable point among bad ones is enough.
        let series = [Series {
            label: "s".into(),
            points: vec![(1.0, f64::NAN), (2.0, -3.0), (3.0, 4.0)],
        }];
        lines_png(&series, &log, &path).unwrap();
        decode(&path);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn text_maps_unknown_characters() {
        assert_eq!(
            glyphs("Δx µs"),
            glyphs("dx us"),
            "common symbols become ASCII"
        );
        assert_eq!(glyphs("a€"), [Glyph::Ascii(b'a'), Glyph::Unknown]);
        let long = glyphs("a very long label indeed");
        let cut = fit(&long, 100, 2);
        assert!(text_width(cut.len(), 2) <= 100);
        assert!(cut.ends_with(&[Glyph::Ascii(b'.'); 3]));
    }

    #[test]
    fn labels_stay_inside_the_plot() {
        let bounds = Rect::new(100, 50, 700, 400);
        // A point at the right edge gets its label on the left.
        let r = place_label((795.0, 200.0), 5.0, 120, 14, bounds, &[]);
        assert!(bounds.contains(&r));
        assert!(r.x1 <= 795);
        // A point at the top right corner still stays in.
        let r = place_label((798.0, 51.0), 5.0, 120, 14, bounds, &[]);
        assert!(bounds.contains(&r));
        // An occupied spot is avoided.
        let first = place_label((300.0, 200.0), 5.0, 60, 14, bounds, &[]);
        let second = place_label((300.0, 200.0), 5.0, 60, 14, bounds, &[first]);
        assert_eq!(second.overlap(&first), 0);
    }
}
