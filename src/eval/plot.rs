//! PNG charts for evaluation reports: scatter plots with a label beside every
//! point, and line charts with markers and a legend, drawn with `plotters`.
//!
//! Text is set in DejaVu Sans, embedded in the crate (`assets/fonts`, with its
//! licence), so a chart renders the same on a machine with no fonts installed
//! and no fontconfig. Ticks come from this module rather than plotters': its
//! log axis labels only powers of ten and their multiples above the first
//! one, which leaves a range inside one decade (a typical KLD spread) bare.

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::element::{Drawable, PointCollection};
use plotters::prelude::*;
use plotters_backend::{BackendCoord, DrawingErrorKind};
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

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
    #[error("drawing chart: {0}")]
    Draw(String),
    #[error("the embedded chart font could not be loaded")]
    Font,
    #[error(
        "nothing to plot: every value is non-finite or beyond 1e300, or non-positive on a log axis"
    )]
    NoData,
}

// The backend is an in-memory buffer, so its errors only carry a message.
impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for PlotError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        PlotError::Draw(e.to_string())
    }
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

    render(path, |root| {
        let mut chart = frame(root, axes, xs, ys)?;
        chart.draw_series(kept.iter().map(|&(i, p)| marker((p.x, p.y), i, POINT_R, 0)))?;
        let at: Vec<BackendCoord> = kept
            .iter()
            .map(|(_, p)| chart.backend_coord(&(p.x, p.y)))
            .collect();

        // Markers are obstacles from the start so that a label never hides a
        // point placed later in the list.
        let r = POINT_R as f64;
        let mut taken: Vec<Rect> = at
            .iter()
            .map(|&(x, y)| Rect::around(x as f64, y as f64, r + 2.0))
            .collect();
        let bounds = plot_rect(&chart).inset(2);
        for (&(i, p), &(x, y)) in kept.iter().zip(&at) {
            let ink = darken(colour(i));
            let style = font(TEXT_PX).color(&ink);
            let label = fit_text(root, &p.label, bounds.width(), &style)?;
            if label.is_empty() {
                continue;
            }
            let w = root.estimate_text_size(&label, &style)?.0 as i32;
            let rect = place_label((x as f64, y as f64), r, w, LABEL_H, bounds, &taken);
            root.draw_text(&label, &style, (rect.x0, rect.y0 + TEXT_DROP))?;
            taken.push(rect);
        }
        Ok(())
    })
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

    render(path, |root| {
        let mut chart = frame(root, axes, xs, ys)?;
        for (i, s) in series.iter().enumerate() {
            for run in s.points.split(|p| !ok(p)).filter(|run| run.len() > 1) {
                let style = colour(i).stroke_width(LINE_W);
                chart.draw_series(LineSeries::new(run.iter().copied(), style))?;
            }
        }

        let plot = plot_rect(&chart);
        let style = font(TEXT_PX);
        // Better a visible count of what was left out than a legend taller
        // than the chart.
        let max_rows = ((plot.height() - 20) / LEGEND_ROW_H).max(1) as usize;
        let shown = if series.len() > max_rows {
            max_rows - 1
        } else {
            series.len()
        };
        let mut labels = Vec::new();
        for s in &series[..shown] {
            labels.push(fit_text(root, &s.label, plot.width() * 45 / 100, &style)?);
        }
        if shown < series.len() {
            labels.push(format!("+{} more", series.len() - shown));
        }
        // Markers go on top of every line so that crossings do not hide
        // them; each series' markers carry its legend entry.
        for (i, s) in series.iter().enumerate() {
            let anno = chart.draw_series(
                s.points
                    .iter()
                    .filter(|p| ok(p))
                    .map(|&p| marker(p, i, LINE_MARKER_R, 0)),
            )?;
            if i < shown {
                anno.label(labels[i].as_str())
                    .legend(move |c| marker(c, i, LINE_MARKER_R, SWATCH));
            }
        }
        if shown < series.len() {
            chart
                .draw_series(std::iter::empty::<EmptyElement<(f64, f64), _>>())?
                .label(labels[shown].as_str());
        }

        let mut legend_w = 0;
        for l in &labels {
            legend_w = legend_w.max(root.estimate_text_size(l, &style)?.0 as i32);
        }
        let size = (
            legend_w + LEGEND_AREA + 2 * LEGEND_MARGIN,
            labels.len() as i32 * LEGEND_ROW_H + 2 * LEGEND_MARGIN,
        );
        let mut samples = Vec::new();
        for s in series {
            let pts: Vec<Option<BackendCoord>> = s
                .points
                .iter()
                .map(|p| ok(p).then(|| chart.backend_coord(p)))
                .collect();
            sample_path(&pts, &mut samples);
        }
        chart
            .configure_series_labels()
            .position(legend_corner(plot, size, &samples))
            .background_style(WHITE)
            .border_style(LEGEND_BORDER)
            .label_font(style.clone())
            .legend_area_size(LEGEND_AREA)
            .margin(LEGEND_MARGIN)
            .draw()?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Drawing

/// DejaVu Sans 2.37, under the Bitstream Vera licence with DejaVu's changes
/// in the public domain (`assets/fonts/LICENSE-DejaVu.txt`).
static FONT_TTF: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
/// Registered under plotters' generic name so that its own defaults (such
/// as the legend's) find the font too.
const FAMILY: &str = "sans-serif";

const TITLE_PX: f64 = 24.0;
const TEXT_PX: f64 = 16.0;
const TICK_PX: f64 = 14.0;
/// Height of a line of TEXT_PX text as placed by `place_label`, and how far
/// below its anchor plotters' ab_glyph text has to start to sit in it (it
/// puts the baseline at half the font size below the anchor).
const LABEL_H: i32 = 14;
const TEXT_DROP: i32 = 3;

const MARGIN: i32 = 12;
const POINT_R: i32 = 5;
const LINE_MARKER_R: i32 = 4;
const LINE_W: u32 = 2;
/// Legend geometry as plotters lays it out: the swatch column, padding
/// inside the box, and a row at 1.25 times the font size.
const SWATCH: i32 = 26;
const LEGEND_AREA: i32 = SWATCH + 8;
const LEGEND_MARGIN: i32 = 8;
const LEGEND_ROW_H: i32 = 20;

const TEXT: RGBColor = RGBColor(34, 34, 34);
const AXIS: RGBColor = RGBColor(90, 90, 90);
const GRID: RGBColor = RGBColor(222, 222, 222);
const GRID_MINOR: RGBColor = RGBColor(241, 241, 241);
const LEGEND_BORDER: RGBColor = RGBColor(170, 170, 170);

/// Tableau 10: distinct for most colour-blind viewers and on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Text in a pale palette colour (olive, cyan) is hard to read when thin.
fn darken(c: RGBColor) -> RGBColor {
    let d = |v: u8| (v as f64 * 0.75) as u8;
    RGBColor(d(c.0), d(c.1), d(c.2))
}

fn font(size: f64) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&TEXT)
}

fn register_font() -> Result<(), PlotError> {
    // plotters keeps fonts in one table for the process.
    static LOADED: OnceLock<bool> = OnceLock::new();
    let ok = LOADED.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT_TTF).is_ok()
    });
    if *ok {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

type Root<'b> = DrawingArea<BitMapBackend<'b>, Shift>;
type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Scale, Scale>>;

/// Draws into an RGB buffer and writes it out only once the whole chart is
/// done, so a failure never leaves half a file behind.
fn render(
    path: &Path,
    draw: impl FnOnce(&Root<'_>) -> Result<(), PlotError>,
) -> Result<(), PlotError> {
    register_font()?;
    let mut px = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut px, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    write_png(&px, path)
}

/// Title, axis titles, grid, ticks and frame. The left margin follows the
/// widest tick label, so a long one such as "1e-5" never meets the y title.
fn frame<'a, 'b>(
    root: &'a Root<'b>,
    axes: &Axes,
    xs: Scale,
    ys: Scale,
) -> Result<Chart<'a, 'b>, PlotError> {
    let (tick, text, title) = (font(TICK_PX), font(TEXT_PX), font(TITLE_PX));
    let mut ylab_w = 0;
    for t in &ys.ticks {
        ylab_w = ylab_w.max(root.estimate_text_size(&t.label, &tick)?.0 as i32);
    }
    let desc = |s: &str| if s.is_empty() { 0 } else { TEXT_PX as i32 + 6 };
    let room = WIDTH as i32 - 2 * MARGIN;

    let mut builder = ChartBuilder::on(root);
    builder
        .margin(MARGIN)
        .margin_right(28)
        .x_label_area_size(TICK_PX as i32 + 12 + desc(&axes.x_label))
        .y_label_area_size(ylab_w + 12 + desc(&axes.y_label));
    if axes.title.is_empty() {
        builder.margin_top(MARGIN + 8);
    } else {
        let t = fit_text(root, &clean(&axes.title), room, &title)?;
        builder.caption(t, title.clone());
    }
    let mut chart = builder.build_cartesian_2d(xs, ys)?;

    let x_desc = fit_text(root, &clean(&axes.x_label), room, &text)?;
    let y_desc = fit_text(
        root,
        &clean(&axes.y_label),
        HEIGHT as i32 - 2 * MARGIN,
        &text,
    )?;
    let mut mesh = chart.configure_mesh();
    mesh.label_style(tick)
        .axis_desc_style(text)
        .bold_line_style(GRID)
        .light_line_style(GRID_MINOR)
        .axis_style(AXIS)
        .set_all_tick_mark_size(5);
    if !x_desc.is_empty() {
        mesh.x_desc(x_desc);
    }
    if !y_desc.is_empty() {
        mesh.y_desc(y_desc);
    }
    mesh.draw()?;

    // The frame sits just outside the plot area, so data never covers it.
    let p = plot_rect(&chart);
    root.draw(&Rectangle::new(
        [(p.x0 - 1, p.y0 - 1), (p.x1, p.y1)],
        AXIS.stroke_width(1),
    ))?;
    Ok(chart)
}

fn plot_rect(chart: &Chart<'_, '_>) -> Rect {
    let (x, y) = chart.plotting_area().get_pixel_range();
    Rect {
        x0: x.start,
        y0: y.start,
        x1: x.end,
        y1: y.end,
    }
}

/// Filled marker with a white ring that separates overlapping ones; past ten
/// entries the palette repeats, so the shape changes instead (circle, square,
/// triangle, diamond) to keep entries apart. With `swatch` > 0 it is a legend
/// key: a line that long with the marker in its middle.
struct Marker<C> {
    at: C,
    index: usize,
    r: i32,
    swatch: i32,
}

fn marker<C>(at: C, index: usize, r: i32, swatch: i32) -> Marker<C> {
    Marker {
        at,
        index,
        r,
        swatch,
    }
}

impl<'a, C: 'a> PointCollection<'a, C> for &'a Marker<C> {
    type Point = &'a C;
    type IntoIter = std::iter::Once<&'a C>;

    fn point_iter(self) -> Self::IntoIter {
        std::iter::once(&self.at)
    }
}

impl<C, DB: DrawingBackend> Drawable<DB> for Marker<C> {
    fn draw<I: Iterator<Item = BackendCoord>>(
        &self,
        mut pos: I,
        backend: &mut DB,
        _: (u32, u32),
    ) -> Result<(), DrawingErrorKind<DB::ErrorType>> {
        let Some((x, y)) = pos.next() else {
            return Ok(());
        };
        let c = colour(self.index);
        if self.swatch > 0 {
            backend.draw_line((x, y), (x + self.swatch, y), &c.stroke_width(LINE_W))?;
        }
        let (x, r) = (x + self.swatch / 2, self.r);
        let shape = (self.index / PALETTE.len()) % 4;
        for (grow, style) in [(2, WHITE.filled()), (0, c.filled())] {
            match shape {
                0 => backend.draw_circle((x, y), (r + grow) as u32, &style, true)?,
                1 => {
                    let q = r * 85 / 100 + grow;
                    backend.draw_rect((x - q, y - q), (x + q, y + q), &style, true)?
                }
                2 => {
                    let q = r + 1 + grow * 3 / 2;
                    let tri = [(x, y - q), (x + q, y + q * 3 / 4), (x - q, y + q * 3 / 4)];
                    backend.fill_polygon(tri, &style)?
                }
                _ => {
                    let q = r + 1 + grow * 3 / 2;
                    let dia = [(x, y - q), (x + q, y), (x, y + q), (x - q, y)];
                    backend.fill_polygon(dia, &style)?
                }
            }
        }
        Ok(())
    }
}

/// Control characters would reach the font as boxes; a label read from a
/// file may well hold a tab.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Shortens text to `max_w` pixels with a trailing "…".
fn fit_text(root: &Root<'_>, s: &str, max_w: i32, style: &TextStyle) -> Result<String, PlotError> {
    let s = clean(s);
    let fits = |t: &str| -> Result<bool, PlotError> {
        Ok(root.estimate_text_size(t, style)?.0 as i32 <= max_w)
    };
    if fits(&s)? {
        return Ok(s);
    }
    let chars: Vec<char> = s.chars().collect();
    for keep in (1..chars.len()).rev() {
        let t: String = chars[..keep].iter().chain(['…'].iter()).collect();
        if fits(&t)? {
            return Ok(t);
        }
    }
    Ok(String::new())
}

/// Points every few pixels along each unbroken run of a line, markers
/// included; `None` marks a skipped point.
fn sample_path(pts: &[Option<BackendCoord>], out: &mut Vec<(f64, f64)>) {
    for pair in pts.windows(2) {
        if let (Some(a), Some(b)) = (pair[0], pair[1]) {
            let (a, b) = ((a.0 as f64, a.1 as f64), (b.0 as f64, b.1 as f64));
            let n = ((b.0 - a.0).hypot(b.1 - a.1) / 3.0)
                .ceil()
                .clamp(1.0, 2000.0) as usize;
            for k in 0..=n {
                let t = k as f64 / n as f64;
                out.push((a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t));
            }
        }
    }
    out.extend(pts.iter().flatten().map(|p| (p.0 as f64, p.1 as f64)));
}

/// The legend goes into the corner where it hides the fewest line samples,
/// the top right on ties. `size` is the legend box; plotters keeps it 5
/// pixels from the plot edges.
fn legend_corner(plot: Rect, size: (i32, i32), samples: &[(f64, f64)]) -> SeriesLabelPosition {
    let (w, h) = size;
    let (left, right) = (plot.x0 + 5, plot.x1 - 5 - w);
    let (top, bottom) = (plot.y0 + 5, plot.y1 - 5 - h);
    let corners = [
        (SeriesLabelPosition::UpperRight, right, top),
        (SeriesLabelPosition::UpperLeft, left, top),
        (SeriesLabelPosition::LowerRight, right, bottom),
        (SeriesLabelPosition::LowerLeft, left, bottom),
    ];
    let hits = |x0: i32, y0: i32| {
        let r = Rect::new(x0, y0, w, h);
        samples
            .iter()
            .filter(|&&(x, y)| {
                x >= r.x0 as f64 && x < r.x1 as f64 && y >= r.y0 as f64 && y < r.y1 as f64
            })
            .count()
    };
    let mut best = (usize::MAX, SeriesLabelPosition::UpperRight);
    for (pos, x0, y0) in corners {
        let n = hits(x0, y0);
        if n < best.0 {
            best = (n, pos);
        }
    }
    best.1
}

fn write_png(px: &[u8], path: &Path) -> Result<(), PlotError> {
    let png_err = |e: png::EncodingError| match e {
        png::EncodingError::IoError(e) => PlotError::Io(e),
        other => PlotError::Png(other.to_string()),
    };
    // Encoding into memory first means a failed write is reported, where a
    // BufWriter dropped inside the encoder would swallow its flush error.
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, WIDTH, HEIGHT);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // Charts are mostly flat colour; the slower settings cost a few
        // milliseconds and shrink the file several times over.
        enc.set_compression(png::Compression::Best);
        enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(px).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Scales and ticks

/// Magnitudes past this count as infinite: they leave no room to pad the
/// axis or to take its span without overflowing, and no measurement is there.
const HUGE: f64 = 1e300;

fn usable(v: f64, log: bool) -> bool {
    v.abs() <= HUGE && (!log || v > 0.0)
}

#[derive(Debug, Clone, PartialEq)]
struct Tick {
    value: f64,
    label: String,
}

/// Fraction of the axis added on each side, so markers at the extremes are
/// not cut in half by the frame.
const PAD: f64 = 0.06;

#[derive(Clone)]
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

/// The chart's coordinate for one axis: positions in linear or log space,
/// grid lines and labels from this module's ticks.
impl Ranged for Scale {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = self.frac(*v);
        (limit.0 as f64 + f * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        let mut v: Vec<f64> = self.ticks.iter().map(|t| t.value).collect();
        if hint.weight().allow_light_points() {
            v.extend(&self.minor);
        }
        v
    }

    fn range(&self) -> Range<f64> {
        if self.log {
            10f64.powf(self.lo)..10f64.powf(self.hi)
        } else {
            self.lo..self.hi
        }
    }
}

impl ValueFormatter<f64> for Scale {
    // plotters' default panics; nothing here calls it, but a plain number
    // is the safe answer should a later version start to.
    fn format(v: &f64) -> String {
        format!("{v}")
    }

    fn format_ext(&self, v: &f64) -> String {
        self.ticks
            .iter()
            .find(|t| t.value == *v)
            .map(|t| t.label.clone())
            .unwrap_or_default()
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

/// Shortest scientific form of a tick value, read to 12 digits so that an
/// inexact power of ten (2e299 is stored as 2.0000000000000001e299) still
/// prints as written.
fn sci_label(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let s = format!("{v:.12e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
    format!("{mantissa}e{exp}")
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
            sci_label(v)
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
// Label placement

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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn has_colour(buf: &[u8], c: RGBColor) -> bool {
        buf.chunks_exact(3).any(|p| p == [c.0, c.1, c.2])
    }

    /// Pixels that are neither white nor grey: what data and labels drew.
    fn coloured(buf: &[u8]) -> usize {
        buf.chunks_exact(3)
            .filter(|p| p.iter().max().unwrap() - p.iter().min().unwrap() > 40)
            .count()
    }

    fn values(t: &[Tick]) -> Vec<f64> {
        t.iter().map(|t| t.value).collect()
    }

    fn labels(t: &[Tick]) -> Vec<&str> {
        t.iter().map(|t| t.label.as_str()).collect()
    }

    fn point(label: &str, x: f64, y: f64) -> Point {
        Point {
            label: label.into(),
            x,
            y,
        }
    }

    /// KLD against bits per element as `compare` plots it, on a log y axis.
    fn kld_scatter() -> (Vec<Point>, Axes) {
        let points = vec![
            point("llama.cpp q8_0", 8.5, 0.00041),
            point("llama.cpp q4_0", 4.5, 0.0213),
            point("llama.cpp q4_1", 5.0, 0.0158),
            point("ott2", 2.31, 0.0312),
            point("ott3", 3.27, 0.0079),
            point("ottk4v2", 3.13, 0.0118),
            point("ottkv-2bit", 2.3, f64::NAN),
        ];
        let axes = Axes {
            title: "KL divergence vs llama.cpp f16, n_ctx 2048".into(),
            x_label: "KV bits per element, allocated at 8192 tokens".into(),
            y_label: "mean KLD".into(),
            log_x: false,
            log_y: true,
        };
        (points, axes)
    }

    /// Decode speed against context as `bench` plots it, on a log x axis.
    fn decode_lines() -> (Vec<Series>, Axes) {
        let names = ["llama.cpp f16", "llama.cpp q4_0", "ours f16", "ours ott2"];
        let series = names
            .iter()
            .enumerate()
            .map(|(s, name)| Series {
                label: name.to_string(),
                points: (0..5)
                    .map(|k| {
                        let ctx = 512.0 * 2f64.powi(k);
                        let slow = 1.0 + ctx / (4096.0 * (1.0 + s as f64));
                        (ctx, 60.0 / (1.0 + 0.1 * s as f64) / slow)
                    })
                    .collect(),
            })
            .collect();
        let axes = Axes {
            title: "Decode speed vs filled context".into(),
            x_label: "tokens in the cache".into(),
            y_label: "decode tokens/s".into(),
            log_x: true,
            log_y: false,
        };
        (series, axes)
    }

    #[test]
    fn scatter_writes_png_of_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scatter.png");
        let (points, axes) = kld_scatter();
        scatter_png(&points, &axes, &path).unwrap();
        let buf = decode(&path);
        assert_eq!(&buf[..3], &[255, 255, 255], "white background");
        for i in 0..6 {
            assert!(has_colour(&buf, colour(i)), "point {i} drawn");
        }
        assert!(!has_colour(&buf, colour(6)), "NaN point skipped");
    }

    #[test]
    fn lines_write_png_on_log_axes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.png");
        let (series, mut axes) = decode_lines();
        axes.log_y = true;
        lines_png(&series, &axes, &path).unwrap();
        let buf = decode(&path);
        for i in 0..series.len() {
            assert!(has_colour(&buf, colour(i)), "series {i} drawn");
        }
    }

    #[test]
    fn odd_inputs_still_draw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.png");
        let axes = Axes::default();
        let log = Axes {
            log_x: true,
            log_y: true,
            ..Axes::default()
        };

        // One point; and many points at one spot (zero range on both axes).
        for (pts, axes) in [
            (vec![point("only", 2.0, 2.0)], &axes),
            (vec![point("only", 100.0, 1e-3)], &log),
            (vec![point("a", 0.0, 0.0), point("b", 0.0, 0.0)], &axes),
            (vec![point("a", 3.0, -7.0); 5], &axes),
        ] {
            scatter_png(&pts, axes, &path).unwrap();
            decode(&path);
        }

        // Extreme magnitudes, a huge label, control characters, no labels.
        let pts = vec![
            point("tiny", 1e-300, -HUGE),
            point("huge", HUGE, HUGE),
            point("too big", 1.0, f64::MAX),
            point(&"a very long label indeed ".repeat(20), 1.0, 0.0),
            point("tab\there\nnewline", 1e10, 1.0),
            point("", 5.0, 5.0),
        ];
        scatter_png(&pts, &axes, &path).unwrap();
        decode(&path);
        let pts: Vec<Point> = pts.into_iter().filter(|p| p.y > 0.0).collect();
        scatter_png(&pts, &log, &path).unwrap();
        decode(&path);

        // A series of one point has no line but a marker; an empty series
        // and one with only bad values still get a legend entry.
        let series = vec![
            Series {
                label: "one".into(),
                points: vec![(1.0, 1.0)],
            },
            Series {
                label: "empty".into(),
                points: Vec::new(),
            },
            Series {
                label: "bad".into(),
                points: vec![(f64::NAN, 1.0), (2.0, f64::INFINITY)],
            },
            Series {
                label: String::new(),
                points: vec![(1.0, 2.0), (f64::NAN, 3.0), (3.0, 4.0), (4.0, 4.0)],
            },
        ];
        lines_png(&series, &axes, &path).unwrap();
        decode(&path);

        // More series than legend rows, and past the palette: every marker
        // shape, and a "+N more" row.
        let many: Vec<Series> = (0..45)
            .map(|s| Series {
                label: format!("series number {s}"),
                points: (1..4).map(|k| (k as f64, (s * k) as f64 + 1.0)).collect(),
            })
            .collect();
        lines_png(&many, &log, &path).unwrap();
        assert!(coloured(&decode(&path)) > 1000);
    }

    #[test]
    fn unusable_inputs_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodata.png");
        let axes = Axes::default();
        let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
        let points: Vec<Point> = bad.iter().map(|&v| point("x", v, 1.0)).collect();
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
    }

    #[test]
    fn unwritable_path_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let (points, axes) = kld_scatter();
        let missing = dir.path().join("no such dir").join("x.png");
        assert!(matches!(
            scatter_png(&points, &axes, &missing),
            Err(PlotError::Io(_))
        ));
        let (series, axes) = decode_lines();
        assert!(matches!(
            lines_png(&series, &axes, dir.path()),
            Err(PlotError::Io(_))
        ));
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

        let t = linear_ticks(-1e300, 1e300, 5);
        assert_eq!(labels(&t), ["-5e299", "0", "5e299"]);

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
    }

    #[test]
    fn long_text_is_shortened() {
        register_font().unwrap();
        let mut px = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
        let root = BitMapBackend::with_buffer(&mut px, (WIDTH, HEIGHT)).into_drawing_area();
        let style = font(TEXT_PX);
        let short = fit_text(&root, "ΔPPL %", 200, &style).unwrap();
        assert_eq!(short, "ΔPPL %");
        let cut = fit_text(&root, "a very long label indeed", 100, &style).unwrap();
        assert!(cut.ends_with('…') && cut.len() < 24, "{cut}");
        assert!(root.estimate_text_size(&cut, &style).unwrap().0 <= 100);
        assert_eq!(
            fit_text(&root, "tab\there", 200, &style).unwrap(),
            "tab here"
        );
        assert_eq!(fit_text(&root, "wide", 1, &style).unwrap(), "");
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
