//! Attention of one query row over one head's mixed cache (OTT.md §5).
//!
//! `attend_row` is the fast path: it never dequantizes the cache, it folds the query into each
//! key group's per-channel scales and works on packed words. `attend_row_ref` is the scalar
//! reference (dequantize, then plain softmax attention) it is tested against; keep both.
//!
//! Score buffer order (both paths): quantized slots, pool, extra pool, visible window tokens.

use half::f16;

use super::HeadCache;
use crate::format::QParams;
use crate::quant::{param_min, param_scale};

/// Reusable per-thread buffers of the fast path.
#[derive(Default)]
pub(crate) struct Scratch {
    scores: Vec<f32>,  // [visible tokens]
    qs: Vec<f32>,      // [head_dim] query folded into one group's scales
    qq: Vec<f32>,      // [head_dim] query pre-multiplied by the softmax scale
    min_acc: Vec<f32>, // [head_dim / value_group]
}

/// Attends `q` (`[head_dim]`) over all quantized slots and pools of `h` and over the first
/// `n_window` window tokens; writes `out` (`[head_dim]`).
pub(crate) fn attend_row(
    h: &HeadCache,
    q: &[f32],
    scale: f32,
    n_window: usize,
    s: &mut Scratch,
    out: &mut [f32],
) {
    let hd = h.head_dim();
    debug_assert!(q.len() == hd && out.len() == hd && n_window <= h.window_len());
    let g = h.group();
    let nq = h.quantized_len();
    let (np, ne) = (h.pool.len(), h.extra.len());
    let total = nq + np + ne + n_window;
    s.scores.clear();
    s.scores.resize(total, f32::NEG_INFINITY);
    s.qq.clear();
    s.qq.extend(q.iter().map(|&x| x * scale));
    s.qs.resize(hd, 0.0);

    let kw = h.key_words();
    for gi in 0..h.n_groups {
        let codes = &h.key_codes[gi * hd * kw..(gi + 1) * hd * kw];
        let params = &h.key_params[gi * hd..(gi + 1) * hd];
        let dst = &mut s.scores[gi * g..(gi + 1) * g];
        match h.geo.key_bits {
            2 => key_scores::<2>(codes, params, &s.qq, &mut s.qs, kw, dst),
            3 => key_scores::<3>(codes, params, &s.qq, &mut s.qs, kw, dst),
            _ => key_scores::<4>(codes, params, &s.qq, &mut s.qs, kw, dst),
        }
        let mw = h.mask_words();
        for (w, &m) in h.masks[gi * mw..(gi + 1) * mw].iter().enumerate() {
            let mut m = m;
            while m != 0 {
                let b = m.trailing_zeros() as usize;
                dst[w * 32 + b] = f32::NEG_INFINITY;
                m &= m - 1;
            }
        }
    }
    let f16_segments = [
        (&h.pool_k, np, nq),
        (&h.extra_k, ne, nq + np),
        (&h.win_k, n_window, nq + np + ne),
    ];
    for (keys, n, off) in f16_segments {
        for t in 0..n {
            let k = &keys[t * hd..(t + 1) * hd];
            s.scores[off + t] = dot_f16(&s.qq, k);
        }
    }

    let max = s.scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    out.fill(0.0);
    if max == f32::NEG_INFINITY {
        return; // nothing visible (cannot happen through OttCache: a query sees itself)
    }
    let mut sum = 0f32;
    for x in s.scores.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }

    let (vw, vnp) = (h.val_words(), h.val_nparams());
    let gv = h.geo.value_group as usize;
    s.min_acc.clear();
    s.min_acc.resize(vnp, 0.0);
    for t in 0..nq {
        let p = s.scores[t];
        if p == 0.0 {
            continue;
        }
        let codes = &h.val_codes[t * vw..(t + 1) * vw];
        let params = &h.val_params[t * vnp..(t + 1) * vnp];
        match h.geo.value_bits {
            2 => value_acc::<2>(codes, params, p, gv, &mut s.min_acc, out),
            3 => value_acc::<3>(codes, params, p, gv, &mut s.min_acc, out),
            _ => value_acc::<4>(codes, params, p, gv, &mut s.min_acc, out),
        }
    }
    for (c, o) in out.iter_mut().enumerate() {
        *o += s.min_acc[c / gv];
    }
    let f16_segments = [
        (&h.pool_v, np, nq),
        (&h.extra_v, ne, nq + np),
        (&h.win_v, n_window, nq + np + ne),
    ];
    for (vals, n, off) in f16_segments {
        for t in 0..n {
            let p = s.scores[off + t];
            for (o, v) in out.iter_mut().zip(&vals[t * hd..(t + 1) * hd]) {
                *o += p * v.to_f32();
            }
        }
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

#[inline]
fn dot_f16(q: &[f32], k: &[f16]) -> f32 {
    q.iter().zip(k).map(|(&a, b)| a * b.to_f32()).sum()
}

/// Scores of one key group: `Σ_c (q_c·scale_c)·code_c + Σ_c q_c·min_c`, one packed word
/// (`32 / B` tokens of one channel) at a time so the inner loop is a fixed-width FMA.
#[inline]
fn key_scores<const B: u32>(
    codes: &[u32],      // [head_dim][kw]
    params: &[QParams], // [head_dim]
    qq: &[f32],         // [head_dim]
    qs: &mut [f32],     // [head_dim]
    kw: usize,
    dst: &mut [f32], // [G]
) {
    let cpw = (32 / B) as usize;
    let mask = (1u32 << B) - 1;
    let mut bias = 0f32;
    for ((s, &q), p) in qs.iter_mut().zip(qq).zip(params) {
        *s = q * param_scale(*p);
        bias += q * param_min(*p);
    }
    let g = dst.len();
    for w in 0..kw {
        let mut acc = [0f32; 16];
        for (c, &s) in qs.iter().enumerate() {
            let word = codes[c * kw + w];
            for (j, a) in acc.iter_mut().enumerate().take(cpw) {
                *a += s * ((word >> (B * j as u32)) & mask) as f32;
            }
        }
        let t0 = w * cpw;
        let n = cpw.min(g - t0);
        for (d, a) in dst[t0..t0 + n].iter_mut().zip(&acc) {
            *d = a + bias;
        }
    }
}

/// Adds `p · scale · code` of one value row to `out` and `p · min` to its group's `min_acc`.
#[inline]
fn value_acc<const B: u32>(
    codes: &[u32],      // [value row words]
    params: &[QParams], // [head_dim / gv]
    p: f32,
    gv: usize,
    min_acc: &mut [f32], // [head_dim / gv]
    out: &mut [f32],     // [head_dim]
) {
    let cpw = (32 / B) as usize;
    let mask = (1u32 << B) - 1;
    if gv % cpw == 0 {
        let wpg = gv / cpw;
        for (j, prm) in params.iter().enumerate() {
            let ps = p * param_scale(*prm);
            min_acc[j] += p * param_min(*prm);
            for wi in 0..wpg {
                let w = j * wpg + wi;
                let word = codes[w];
                let o = &mut out[w * cpw..(w + 1) * cpw];
                for (l, x) in o.iter_mut().enumerate() {
                    *x += ps * ((word >> (B * l as u32)) & mask) as f32;
                }
            }
        }
    } else {
        for (j, prm) in params.iter().enumerate() {
            let ps = p * param_scale(*prm);
            min_acc[j] += p * param_min(*prm);
            for c in j * gv..(j + 1) * gv {
                let code = (codes[c / cpw] >> (B * (c % cpw) as u32)) & mask;
                out[c] += ps * code as f32;
            }
        }
    }
}

/// Dequantized copy of one head, built once and shared by the reference path's rows.
pub(crate) struct Dequantized {
    keys: Vec<f32>,    // [quantized_len][head_dim]
    values: Vec<f32>,  // [quantized_len][head_dim]
    masked: Vec<bool>, // [quantized_len]
}

impl Dequantized {
    pub(crate) fn of(h: &HeadCache) -> Self {
        Self {
            keys: h.dequantized_keys(),
            values: h.dequantized_values(),
            masked: (0..h.quantized_len()).map(|p| h.is_masked(p)).collect(),
        }
    }
}

/// Scalar reference of [`attend_row`]: plain softmax over the dequantized cache.
pub(crate) fn attend_row_ref(
    h: &HeadCache,
    d: &Dequantized,
    q: &[f32],
    scale: f32,
    n_window: usize,
    out: &mut [f32],
) {
    let hd = h.head_dim();
    let to32 = |x: &[f16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
    let mut keys: Vec<f32> = Vec::new(); // [visible][head_dim]
    let mut values: Vec<f32> = Vec::new(); // [visible][head_dim]
    for t in 0..h.quantized_len() {
        if !d.masked[t] {
            keys.extend_from_slice(&d.keys[t * hd..(t + 1) * hd]);
            values.extend_from_slice(&d.values[t * hd..(t + 1) * hd]);
        }
    }
    keys.extend(to32(&h.pool_k));
    keys.extend(to32(&h.extra_k));
    keys.extend(to32(&h.win_k[..n_window * hd]));
    values.extend(to32(&h.pool_v));
    values.extend(to32(&h.extra_v));
    values.extend(to32(&h.win_v[..n_window * hd]));
    let scores: Vec<f32> = keys
        .chunks(hd)
        .map(|k| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    out.fill(0.0);
    let Some(max) = scores.iter().copied().reduce(f32::max) else {
        return;
    };
    let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    for (p, v) in e.iter().zip(values.chunks(hd)) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += p / sum * x;
        }
    }
}
