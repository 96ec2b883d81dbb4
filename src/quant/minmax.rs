//! Asymmetric min/max round-to-nearest quantizer with f16 scale and minimum (OTT.md §1).
//!
//! Codes are computed from the f16-rounded scale and minimum, so `code * scale + min` with the
//! stored parameters is exactly what the quantizer aimed at (a kernel dequantizing from the
//! stored bytes reproduces it). A constant group stores scale 0 and codes 0: it dequantizes to
//! its f16 minimum, exactly its value for f16 input, and no division by zero ever happens.

use half::f16;

use super::{check_bits, max_code, pack_codes, QuantError};
use crate::format::{words_for, QParams};

/// `x` rounded to the nearest f16, back in f32 (what an f16 buffer holds).
#[inline]
pub fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The scale of a parameter pair as f32.
#[inline]
pub fn param_scale(p: QParams) -> f32 {
    f16::from_bits(p.scale).to_f32()
}

/// The minimum of a parameter pair as f32.
#[inline]
pub fn param_min(p: QParams) -> f32 {
    f16::from_bits(p.min).to_f32()
}

/// Scale and minimum of one group. Fails on an empty group and on any value that is not finite
/// or that overflows f16 (the stored minimum would be infinite).
pub fn minmax_params(x: &[f32], bits: u32) -> Result<QParams, QuantError> {
    check_bits(bits)?;
    if x.is_empty() {
        return Err(QuantError::EmptyGroup);
    }
    let mut mn = f32::INFINITY;
    let mut mx = f32::NEG_INFINITY;
    for (index, &v) in x.iter().enumerate() {
        if !f16::from_f32(v).is_finite() {
            return Err(QuantError::NonFinite { index, value: v });
        }
        mn = mn.min(v);
        mx = mx.max(v);
    }
    Ok(range_params(mn, mx, bits))
}

/// The f16 pair of a grid spanning `[mn, mx]` (both finite in f16, `mn <= mx`).
pub fn range_params(mn: f32, mx: f32, bits: u32) -> QParams {
    let min = f16::from_f32(mn);
    // (mx - mn) <= 2 * 65504 and max_code >= 3, so the scale is always finite in f16; it can
    // underflow to 0 for a nearly constant group, which then behaves as a constant one.
    let scale = if mx > mn {
        f16::from_f32((mx - mn) / max_code(bits) as f32)
    } else {
        f16::ZERO
    };
    QParams {
        scale: scale.to_bits(),
        min: min.to_bits(),
    }
}

/// Code of one value under given parameters: round to nearest, clamped to the code range.
#[inline]
pub fn quantize_one(x: f32, p: QParams, bits: u32) -> u8 {
    let s = param_scale(p);
    if s <= 0.0 {
        return 0;
    }
    let q = ((x - param_min(p)) / s).round();
    q.clamp(0.0, max_code(bits) as f32) as u8
}

/// Quantizes one group into unpacked codes (`codes.len() == x.len()`).
pub fn quantize_group(x: &[f32], bits: u32, codes: &mut [u8]) -> Result<QParams, QuantError> {
    if codes.len() != x.len() {
        return Err(QuantError::Length {
            what: "codes",
            expected: x.len(),
            got: codes.len(),
        });
    }
    let p = minmax_params(x, bits)?;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = quantize_one(v, p, bits);
    }
    Ok(p)
}

/// The shapes of one key group (`n_values` = g·head_dim values, `n_words` words, `n_params`
/// pairs); returns the words per channel.
fn check_key_group(
    g: usize,
    head_dim: usize,
    bits: u32,
    n_values: usize,
    n_words: usize,
    n_params: usize,
) -> Result<usize, QuantError> {
    check_bits(bits)?;
    let kw = words_for(g as u32, bits) as usize;
    check_len("key group values", g * head_dim, n_values)?;
    check_len("key group words", head_dim * kw, n_words)?;
    check_len("key group params", head_dim, n_params)?;
    Ok(kw)
}

/// The shapes of one token's value row: `hd` values in groups of `value_group`, packed into
/// `n_words` words with `n_params` pairs.
fn check_value_row(
    hd: usize,
    value_group: usize,
    bits: u32,
    n_words: usize,
    n_params: usize,
) -> Result<(), QuantError> {
    check_bits(bits)?;
    if value_group == 0 || hd % value_group != 0 {
        return Err(QuantError::EmptyGroup);
    }
    check_len(
        "value row words",
        words_for(hd as u32, bits) as usize,
        n_words,
    )?;
    check_len("value row params", hd / value_group, n_params)
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), QuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::Length {
            what,
            expected,
            got,
        })
    }
}

/// Quantizes `g` tokens of keys per channel (the KIVI/OTT key layout).
///
/// `keys`: `[g][head_dim]`; `words`: `[head_dim][words_for(g, bits)]`; `params`: `[head_dim]`.
pub fn quantize_key_group(
    keys: &[f32],
    g: usize,
    head_dim: usize,
    bits: u32,
    words: &mut [u32],
    params: &mut [QParams],
) -> Result<(), QuantError> {
    let kw = check_key_group(g, head_dim, bits, keys.len(), words.len(), params.len())?;
    let mut col = vec![0f32; g]; // [g]
    let mut codes = vec![0u8; g]; // [g]
    for c in 0..head_dim {
        for (t, x) in col.iter_mut().enumerate() {
            *x = keys[t * head_dim + c];
        }
        params[c] = quantize_group(&col, bits, &mut codes)?;
        pack_codes(&codes, bits, &mut words[c * kw..(c + 1) * kw])?;
    }
    Ok(())
}

/// Codes of `g` tokens per channel against given parameters (`params`: `[head_dim]`), for
/// pairs stored in another form than computed here.
pub fn quantize_key_group_with(
    keys: &[f32],
    g: usize,
    head_dim: usize,
    bits: u32,
    params: &[QParams],
    words: &mut [u32],
) -> Result<(), QuantError> {
    let kw = check_key_group(g, head_dim, bits, keys.len(), words.len(), params.len())?;
    let mut codes = vec![0u8; g]; // [g]
    for c in 0..head_dim {
        for (t, q) in codes.iter_mut().enumerate() {
            *q = quantize_one(keys[t * head_dim + c], params[c], bits);
        }
        pack_codes(&codes, bits, &mut words[c * kw..(c + 1) * kw])?;
    }
    Ok(())
}

/// Inverse of [`quantize_key_group`]: `out` is `[g][head_dim]`.
pub fn dequantize_key_group(
    words: &[u32],
    params: &[QParams],
    g: usize,
    head_dim: usize,
    bits: u32,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let kw = check_key_group(g, head_dim, bits, out.len(), words.len(), params.len())?;
    for c in 0..head_dim {
        let (s, m) = (param_scale(params[c]), param_min(params[c]));
        let w = &words[c * kw..(c + 1) * kw];
        for t in 0..g {
            out[t * head_dim + c] = f32::from(super::code_at(w, bits, t)) * s + m;
        }
    }
    Ok(())
}

/// Quantizes one token's values per group of `value_group` channels.
///
/// `v`: `[head_dim]`; `words`: `[words_for(head_dim, bits)]`; `params`: `[head_dim / value_group]`.
pub fn quantize_value_row(
    v: &[f32],
    value_group: usize,
    bits: u32,
    words: &mut [u32],
    params: &mut [QParams],
) -> Result<(), QuantError> {
    check_value_row(v.len(), value_group, bits, words.len(), params.len())?;
    let mut codes = vec![0u8; v.len()]; // [head_dim]
    for (j, (x, c)) in v
        .chunks(value_group)
        .zip(codes.chunks_mut(value_group))
        .enumerate()
    {
        params[j] = quantize_group(x, bits, c)?;
    }
    pack_codes(&codes, bits, words)
}

/// Codes of one token's values against given parameters (`params`: `[head_dim / value_group]`).
pub fn quantize_value_row_with(
    v: &[f32],
    value_group: usize,
    bits: u32,
    params: &[QParams],
    words: &mut [u32],
) -> Result<(), QuantError> {
    check_value_row(v.len(), value_group, bits, words.len(), params.len())?;
    let codes: Vec<u8> = v
        .iter()
        .enumerate()
        .map(|(c, &x)| quantize_one(x, params[c / value_group], bits))
        .collect();
    pack_codes(&codes, bits, words)
}

/// Inverse of [`quantize_value_row`]: `out` is `[head_dim]`.
pub fn dequantize_value_row(
    words: &[u32],
    params: &[QParams],
    value_group: usize,
    bits: u32,
    out: &mut [f32],
) -> Result<(), QuantError> {
    check_value_row(out.len(), value_group, bits, words.len(), params.len())?;
    for (c, o) in out.iter_mut().enumerate() {
        let p = params[c / value_group];
        *o = f32::from(super::code_at(words, bits, c)) * param_scale(p) + param_min(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Error bound of one element: half a step of the stored scale, plus what rounding the
    /// scale and minimum to f16 can add (min off by |mn - mn16|, top of range off by
    /// qmax·|s - s16|). Derived from the quantizer, not fitted.
    fn bound(x: &[f32], p: QParams, bits: u32) -> f32 {
        let mn = x.iter().copied().fold(f32::INFINITY, f32::min);
        let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let s = param_scale(p);
        let s32 = (mx - mn) / max_code(bits) as f32;
        s / 2.0 + (mn - param_min(p)).abs() + max_code(bits) as f32 * (s32 - s).abs() + 1e-6
    }

    #[test]
    fn error_within_half_step() {
        let mut rng = StdRng::seed_from_u64(11);
        for bits in 2..=4 {
            for _ in 0..200 {
                let n = rng.gen_range(1..200);
                let off: f32 = rng.gen_range(-50.0..50.0);
                let amp: f32 = rng.gen_range(0.001..20.0);
                let x: Vec<f32> = (0..n)
                    .map(|_| off + amp * rng.gen_range(-1.0f32..1.0))
                    .collect();
                let mut codes = vec![0; n];
                let p = quantize_group(&x, bits, &mut codes).unwrap();
                let b = bound(&x, p, bits);
                for (&v, &c) in x.iter().zip(&codes) {
                    assert!(u32::from(c) <= max_code(bits));
                    let d = f32::from(c) * param_scale(p) + param_min(p);
                    assert!((d - v).abs() <= b, "bits {bits}: {v} -> {d}, bound {b}");
                }
            }
        }
    }

    #[test]
    fn extremes_hit_end_codes() {
        let x = [1.0f32, 2.0, 4.0, 0.5, -3.0, 7.0];
        let mut codes = [0u8; 6];
        let p = quantize_group(&x, 2, &mut codes).unwrap();
        assert_eq!(codes[4], 0);
        assert_eq!(codes[5], 3);
        assert_eq!(param_min(p), -3.0);
        assert_eq!(param_scale(p), f16_round(10.0 / 3.0));
    }

    #[test]
    fn constant_and_zero_groups_are_exact() {
        for bits in 2..=4 {
            for val in [0.0f32, -0.0, 1.5, -7.25, 65504.0] {
                let x = [val; 9];
                let mut codes = [9u8; 9];
                let p = quantize_group(&x, bits, &mut codes).unwrap();
                assert_eq!(param_scale(p), 0.0);
                assert_eq!(codes, [0; 9]);
                let d = f32::from(codes[0]) * param_scale(p) + param_min(p);
                assert_eq!(d, val);
                assert!(!d.is_nan());
            }
        }
    }

    #[test]
    fn tiny_range_underflows_to_constant_without_nan() {
        let x = [1.0f32, 1.0 + 1e-9];
        let mut codes = [0u8; 2];
        let p = quantize_group(&x, 2, &mut codes).unwrap();
        let d = f32::from(codes[1]) * param_scale(p) + param_min(p);
        assert!(d.is_finite());
    }

    #[test]
    fn non_finite_is_rejected() {
        let mut codes = [0u8; 3];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 70000.0] {
            let x = [1.0, bad, 2.0];
            let e = quantize_group(&x, 2, &mut codes).unwrap_err();
            assert!(
                matches!(e, QuantError::NonFinite { index: 1, .. }),
                "{bad}: {e:?}"
            );
        }
        assert_eq!(quantize_group(&[], 2, &mut []), Err(QuantError::EmptyGroup));
    }

    #[test]
    fn key_and_value_layouts_roundtrip() {
        let mut rng = StdRng::seed_from_u64(5);
        for bits in 2..=4 {
            let (g, hd) = (32usize, 8usize);
            let keys: Vec<f32> = (0..g * hd)
                .map(|_| f16_round(rng.gen_range(-2.0..2.0)))
                .collect();
            let kw = words_for(g as u32, bits) as usize;
            let mut words = vec![0u32; hd * kw];
            let mut params = vec![QParams::default(); hd];
            quantize_key_group(&keys, g, hd, bits, &mut words, &mut params).unwrap();
            let mut back = vec![0f32; g * hd];
            dequantize_key_group(&words, &params, g, hd, bits, &mut back).unwrap();
            for c in 0..hd {
                let col: Vec<f32> = (0..g).map(|t| keys[t * hd + c]).collect();
                let b = bound(&col, params[c], bits);
                for t in 0..g {
                    assert!((back[t * hd + c] - keys[t * hd + c]).abs() <= b);
                }
            }
            let v = &keys[..hd];
            let mut vw = vec![0u32; words_for(hd as u32, bits) as usize];
            let mut vp = vec![QParams::default(); 2];
            quantize_value_row(v, 4, bits, &mut vw, &mut vp).unwrap();
            let mut vb = vec![0f32; hd];
            dequantize_value_row(&vw, &vp, 4, bits, &mut vb).unwrap();
            for j in 0..2 {
                let b = bound(&v[j * 4..j * 4 + 4], vp[j], bits);
                for c in j * 4..j * 4 + 4 {
                    assert!((vb[c] - v[c]).abs() <= b);
                }
            }
            assert!(quantize_value_row(v, 3, bits, &mut vw, &mut vp).is_err());
        }
    }
}
