//! Ranges that minimise a group's squared error instead of spanning its extremes.
//!
//! Min/max quantization spends its few levels on the group's two most extreme values: with
//! 2 bits over 64 roughly normal values the step is about 1.6σ (squared error 0.21σ²), where
//! the best uniform grid clips the tails and steps about 1σ (0.12σ²). [`least_squares_range`]
//! alternates the two halves of that optimum, as Lloyd's algorithm does for a uniform grid:
//! codes for the current grid, then the grid `lo + s·q` that fits those codes best in the
//! least-squares sense. Each half lowers the error, so a few rounds from the min/max grid are
//! never worse than it.

use super::max_code;

/// Rounds of the alternation; the error changes little after the third.
const ROUNDS: usize = 4;

/// Squared error of `x` on the grid `lo + s·q`, q in `0..=levels`.
fn grid_error(x: &[f32], lo: f32, s: f32, levels: f32) -> f32 {
    x.iter()
        .map(|&v| {
            let q = if s > 0.0 {
                ((v - lo) / s).round().clamp(0.0, levels)
            } else {
                0.0
            };
            let e = v - (lo + s * q);
            e * e
        })
        .sum()
}

/// `(lo, hi)` whose uniform grid of `2^bits` levels quantizes `x` with the least squared
/// error found (min/max unless a fitted grid does better); `hi` may sit inside the group's
/// range, and codes then clamp. `(mn, mx)` is the group's range ([`super::finite_range`]).
pub fn least_squares_range(x: &[f32], bits: u32, (mn, mx): (f32, f32)) -> (f32, f32) {
    if mx <= mn || x.len() < 2 {
        return (mn, mx);
    }
    let levels = max_code(bits) as f32;
    let (mut lo, mut s) = (mn, (mx - mn) / levels);
    let mut best = (mn, mx, grid_error(x, lo, s, levels));
    for _ in 0..ROUNDS {
        // Codes of the current grid, then the (lo, s) that fit them best.
        let (mut n, mut sq, mut sqq, mut sx, mut sqx) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for &v in x {
            let q = ((v - lo) / s).round().clamp(0.0, levels) as f64;
            n += 1.0;
            sq += q;
            sqq += q * q;
            sx += v as f64;
            sqx += q * v as f64;
        }
        let det = n * sqq - sq * sq;
        if det <= 0.0 {
            break; // every value on one code: nothing to fit
        }
        let s_new = ((n * sqx - sq * sx) / det) as f32;
        let lo_new = ((sx - s_new as f64 * sq) / n) as f32;
        if !(s_new > 0.0 && s_new.is_finite() && lo_new.is_finite()) {
            break;
        }
        (lo, s) = (lo_new, s_new);
        let e = grid_error(x, lo, s, levels);
        if e < best.2 {
            best = (lo, lo + s * levels, e);
        } else {
            break;
        }
    }
    (best.0, best.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// On normal-ish groups the fitted grid errs clearly less than min/max, and never more on
    /// any group (uniform, constant, two-valued, heavy-tailed included).
    #[test]
    fn never_worse_than_min_max_and_better_on_normal_values() {
        let mut rng = StdRng::seed_from_u64(11);
        for bits in 2..=4 {
            let levels = max_code(bits) as f32;
            let (mut fit_sum, mut mm_sum) = (0f32, 0f32);
            for case in 0..400 {
                let x: Vec<f32> = (0..64)
                    .map(|i| match case % 4 {
                        // Sum of uniforms: close to normal.
                        0 | 1 => (0..6).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>(),
                        2 => rng.gen_range(-3.0f32..5.0),
                        _ => {
                            if i % 2 == 0 {
                                1.5
                            } else {
                                -0.5
                            }
                        }
                    })
                    .collect();
                let mn = x.iter().copied().fold(f32::INFINITY, f32::min);
                let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (lo, hi) = least_squares_range(&x, bits, (mn, mx));
                let fit = grid_error(&x, lo, (hi - lo) / levels, levels);
                let mm = grid_error(&x, mn, (mx - mn) / levels, levels);
                assert!(fit <= mm, "bits {bits} case {case}: {fit} > {mm}");
                if case % 4 < 2 {
                    fit_sum += fit;
                    mm_sum += mm;
                }
            }
            // The narrower the code, the more clipping the tails buys.
            let most = [0.0, 0.0, 0.75, 0.85, 0.95][bits as usize];
            println!(
                "bits {bits}: fitted / min-max squared error {:.3}",
                fit_sum / mm_sum
            );
            assert!(
                fit_sum < most * mm_sum,
                "bits {bits}: {fit_sum} vs {mm_sum}"
            );
        }
        assert_eq!(least_squares_range(&[2.0; 8], 2, (2.0, 2.0)), (2.0, 2.0));
    }

    /// Quantizing against given pairs reproduces the min/max quantizers exactly when given
    /// their own pairs, so the fitted paths differ from them only by the grid.
    #[test]
    fn quantizing_with_given_pairs_matches_the_min_max_quantizers() {
        use crate::format::{words_for, QParams};
        use crate::quant::{
            finite_range, quantize_key_group, quantize_key_group_with, quantize_value_row,
            quantize_value_row_with, range_params,
        };
        let mut rng = StdRng::seed_from_u64(3);
        let (g, hd, gv) = (32, 16, 8);
        for bits in 2..=4 {
            let x: Vec<f32> = (0..g * hd).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
            let kw = words_for(g as u32, bits) as usize;
            let (mut w1, mut w2) = (vec![0u32; hd * kw], vec![0u32; hd * kw]);
            let mut p1 = vec![QParams::default(); hd];
            quantize_key_group(&x, g, hd, bits, &mut w1, &mut p1).unwrap();
            let p2: Vec<QParams> = (0..hd)
                .map(|c| {
                    let (lo, hi) = finite_range((0..g).map(|t| x[t * hd + c])).unwrap();
                    range_params(lo, hi, bits)
                })
                .collect();
            assert_eq!(p1, p2);
            quantize_key_group_with(&x, g, hd, bits, &p2, &mut w2).unwrap();
            assert_eq!(w1, w2, "keys, {bits} bits");
            let row = &x[..hd];
            let vw = words_for(hd as u32, bits) as usize;
            let (mut v1, mut v2) = (vec![0u32; vw], vec![0u32; vw]);
            let mut q1 = vec![QParams::default(); hd / gv];
            quantize_value_row(row, gv, bits, &mut v1, &mut q1).unwrap();
            quantize_value_row_with(row, gv, bits, &q1, &mut v2).unwrap();
            assert_eq!(v1, v2, "values, {bits} bits");
        }
    }
}
