//! 8-bit (scale, minimum) pairs under one f16 pair per column of a group, as llama.cpp's
//! k-quants store 6-bit sub-scales under an f16 super-scale.
//!
//! A pair costs 16 bits instead of 32: with 2-bit values per token over 64 channels that is
//! 2.25 bits per value instead of 2.5. The scale is logarithmic (`D·2^(-k/32)`, a 2.2 % step
//! over a 2^-8 range: tokens far quieter than the loudest of their column keep a fine
//! scale), the minimum linear (`M·q/127`, signed). Both are rounded so that the decoded
//! range still covers the group — the minimum down, the scale up — so no value is clipped;
//! codes are then computed against the decoded pair, so dequantizing the stored bytes gives
//! exactly what the quantizer aimed at.

use std::sync::OnceLock;

use half::f16;

use super::{max_code, QuantError};
use crate::format::QParams;

/// Scale steps per octave.
const STEPS_PER_OCTAVE: f64 = 32.0;
/// Largest magnitude of the minimum's signed code.
const MIN_CODE: i32 = 127;

/// `2^(-k/32)` for every scale code, computed in f64 and rounded once, so the table is the
/// same on every platform.
fn scale_steps() -> &'static [f32; 256] {
    static STEPS: OnceLock<[f32; 256]> = OnceLock::new();
    STEPS.get_or_init(|| std::array::from_fn(|k| (-(k as f64) / STEPS_PER_OCTAVE).exp2() as f32))
}

/// The smallest f16 at or above `x` (x finite, non-negative, within f16's range).
fn f16_at_least(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

/// The pair a column's `sup` and a group's two bytes stand for.
#[inline]
pub fn decode_params8(sup: QParams, b: [u8; 2]) -> QParams {
    let d = f16::from_bits(sup.scale).to_f32();
    let m = f16::from_bits(sup.min).to_f32();
    let scale = f16::from_f32(d * scale_steps()[b[0] as usize]);
    let min = f16::from_f32(m * f32::from(b[1] as i8) / MIN_CODE as f32);
    QParams {
        scale: scale.to_bits(),
        min: min.to_bits(),
    }
}

/// (min, max) of a group; fails on what [`super::minmax_params`] refuses.
pub fn finite_range(x: impl IntoIterator<Item = f32>) -> Result<(f32, f32), QuantError> {
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    for (index, v) in x.into_iter().enumerate() {
        if !f16::from_f32(v).is_finite() {
            return Err(QuantError::NonFinite { index, value: v });
        }
        mn = mn.min(v);
        mx = mx.max(v);
    }
    if mn > mx {
        return Err(QuantError::EmptyGroup);
    }
    Ok((mn, mx))
}

/// Encodes the (min, max) ranges of a group's quantization groups, laid out `[row][cols]`
/// (column j of every row shares `sup[j]`): writes `sup` (`[cols]`) and `bytes`
/// (`[rows·cols]`) and returns the decoded pairs (`[rows·cols]`) to quantize against.
pub fn encode_params8(
    ranges: &[(f32, f32)],
    cols: usize,
    bits: u32,
    sup: &mut [QParams],
    bytes: &mut [[u8; 2]],
) -> Result<Vec<QParams>, QuantError> {
    super::check_bits(bits)?;
    if cols == 0 || ranges.len() % cols != 0 || ranges.is_empty() {
        return Err(QuantError::EmptyGroup);
    }
    for (what, expected, got) in [
        ("params8 super pairs", cols, sup.len()),
        ("params8 bytes", ranges.len(), bytes.len()),
    ] {
        if expected != got {
            return Err(QuantError::Length {
                what,
                expected,
                got,
            });
        }
    }
    let levels = max_code(bits) as f32;
    let mut mins = vec![0f32; ranges.len()]; // decoded minima, [rows·cols]
    let mut out = vec![QParams::default(); ranges.len()];
    for (j, sup_j) in sup.iter_mut().enumerate() {
        let col = || ranges.iter().skip(j).step_by(cols);
        // f16 at or above the largest |min|, so every minimum's code fits in ±127.
        let dm = f16_at_least(col().fold(0f32, |a, r| a.max(r.0.abs())));
        let dm32 = dm.to_f32();
        for (i, &(mn, _)) in col().enumerate() {
            let i = i * cols + j;
            let mut q = if dm32 > 0.0 {
                ((mn / dm32 * MIN_CODE as f32).floor() as i32).clamp(-MIN_CODE, MIN_CODE)
            } else {
                0
            };
            // Rounded down, the decoded minimum is at or below the group's (f16 rounding of
            // the product may still lift it by an ulp; one code lower then).
            let dec = |q: i32| f16::from_f32(dm32 * q as f32 / MIN_CODE as f32).to_f32();
            if dec(q) > mn && q > -MIN_CODE {
                q -= 1;
            }
            bytes[i][1] = q as i8 as u8;
            mins[i] = dec(q);
        }
        // Scale each group needs over its decoded minimum; the column's super-scale covers
        // the largest.
        let need = |i: usize| ((ranges[i].1 - mins[i]) / levels).max(0.0);
        let ds = f16_at_least(
            (0..ranges.len() / cols)
                .map(|r| need(r * cols + j))
                .fold(0f32, f32::max),
        );
        *sup_j = QParams {
            scale: ds.to_bits(),
            min: dm.to_bits(),
        };
        let ds32 = ds.to_f32();
        let steps = scale_steps();
        let dec = |k: usize| f16::from_f32(ds32 * steps[k]).to_f32();
        for r in 0..ranges.len() / cols {
            let i = r * cols + j;
            let n = need(i);
            // The largest k (finest scale) whose decoded scale still covers the range.
            let mut k = if n > 0.0 && ds32 > 0.0 {
                ((-(n / ds32).log2() as f64 * STEPS_PER_OCTAVE).floor() as i64).clamp(0, 255)
                    as usize
            } else {
                255
            };
            while k > 0 && dec(k) < n {
                k -= 1;
            }
            while k < 255 && dec(k + 1) >= n {
                k += 1;
            }
            bytes[i][0] = k as u8;
            out[i] = decode_params8(*sup_j, bytes[i]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{param_min, param_scale, quantize_one};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Every value of every group dequantizes within half a decoded step (nothing clipped),
    /// and the decoded scale is at most one table step above what the group needs.
    #[test]
    fn decoded_pairs_cover_every_group() {
        let mut rng = StdRng::seed_from_u64(7);
        for bits in 2..=4 {
            let (rows, cols, n) = (64, 2, 32);
            let mut groups = Vec::new();
            for r in 0..rows {
                for _ in 0..cols {
                    // Ranges from 1e-3 to 50, offsets of both signs, one constant group.
                    let spread = 10f32.powf(rng.gen_range(-3.0..1.7));
                    let off = rng.gen_range(-20.0..20.0);
                    let g: Vec<f32> = (0..n)
                        .map(|_| {
                            if r == 5 {
                                off
                            } else {
                                off + spread * rng.gen_range(-1.0..1.0)
                            }
                        })
                        .collect();
                    groups.push(g);
                }
            }
            let ranges: Vec<_> = groups
                .iter()
                .map(|g| finite_range(g.iter().copied()).unwrap())
                .collect();
            let mut sup = vec![QParams::default(); cols];
            let mut bytes = vec![[0u8; 2]; rows * cols];
            let dec = encode_params8(&ranges, cols, bits, &mut sup, &mut bytes).unwrap();
            for (i, g) in groups.iter().enumerate() {
                assert_eq!(dec[i], decode_params8(sup[i % cols], bytes[i]));
                let (s, m) = (param_scale(dec[i]), param_min(dec[i]));
                let (lo, hi) = ranges[i];
                let dm = f16::from_bits(sup[i % cols].min).to_f32();
                assert!(m <= lo + 1e-6 * lo.abs(), "min {m} above {lo}");
                assert!(
                    lo - m <= dm / 127.0 + lo.abs() / 1024.0 + 1e-6,
                    "min {m} far below {lo} (dm {dm}, byte {})",
                    bytes[i][1] as i8
                );
                let need = (hi - m) / max_code(bits) as f32;
                let floor = f16::from_bits(sup[i % cols].scale).to_f32() * (-255f32 / 32.0).exp2();
                assert!(s >= need, "scale {s} below {need}");
                assert!(
                    s <= (need * 1.03).max(floor * 1.001),
                    "scale {s} far above {need}"
                );
                for &x in g {
                    let y = f32::from(quantize_one(x, dec[i], bits)) * s + m;
                    let tol = s * 0.5 + 1e-6 * x.abs().max(1.0);
                    assert!((y - x).abs() <= tol, "{x} -> {y} (scale {s}, min {m})");
                }
            }
        }
    }

    #[test]
    fn refuses_what_f16_cannot_hold() {
        assert!(matches!(
            finite_range([1.0, f32::NAN]),
            Err(QuantError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            finite_range([1e6f32]),
            Err(QuantError::NonFinite { index: 0, .. })
        ));
        assert_eq!(
            finite_range(std::iter::empty()),
            Err(QuantError::EmptyGroup)
        );
        let mut sup = [QParams::default(); 2];
        let mut b = [[0u8; 2]; 3];
        assert!(encode_params8(&[(0.0, 1.0); 3], 2, 2, &mut sup, &mut b).is_err());
    }
}
