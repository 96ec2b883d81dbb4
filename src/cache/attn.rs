//! Attention of query rows over one head's mixed cache (OTT.md §5).
//!
//! `attend_block` is the fast path: it never dequantizes the cache, it folds the query into
//! each key group's per-channel scales and works on packed words, and it takes all query heads
//! of one kv head at once (GQA) so that every code word is unpacked once for all of them. It
//! has kernels for 2-bit keys and values (the product); other bit widths go through
//! `attend_row`, the earlier one-row-at-a-time fast path. `attend_row_ref` is the scalar
//! reference (dequantize, then plain softmax attention) both are tested against; keep all.
//!
//! Only portable code: x86-64 builds target SSE2, so the kernels are written for LLVM's
//! auto-vectoriser (constant trip counts, accumulators in fixed arrays, weights broadcast
//! ahead of the hot loops) rather than with intrinsics.
//!
//! Score buffer order (all paths): quantized slots, sinks, pool, extra pool, visible window
//! tokens. The fast paths work in the head's stored space (rotated when rotation is on: the
//! caller rotates q and the output); the reference works in the caller's space throughout.

use std::cell::RefCell;

use half::{f16, slice::HalfFloatSliceExt};

use super::HeadCache;
use crate::format::QParams;
use crate::quant::{code_at, param_min, param_scale};

/// Reusable per-thread buffers of the fast path.
#[derive(Default)]
pub(crate) struct Scratch {
    scores: Vec<f32>,   // [visible tokens]
    qs: Vec<f32>,       // [head_dim] query folded into one group's scales
    qq: Vec<f32>,       // [head_dim] query pre-multiplied by the softmax scale
    min_acc: Vec<f32>,  // [head_dim / value_group]
    kf: Vec<f32>,       // [tokens outside groups][head_dim] their K, then their V
    vdec: Vec<QParams>, // value pairs decoded from 8 bits (`vp=8`)
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
    let (ns, np, ne) = (h.sink_len(), h.pool.len(), h.extra.len());
    let total = nq + ns + np + ne + n_window;
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
    let nf = ns + np + ne + n_window;
    unpacked_rows(h, true, n_window, &mut s.kf);
    for (d, k) in s.scores[nq..nq + nf].iter_mut().zip(s.kf.chunks_exact(hd)) {
        *d = dot(&s.qq, k);
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

    let val_params = h.value_params(&mut s.vdec);
    if h.value_per_channel {
        let cw = h.val_channel_words();
        for gi in 0..h.n_groups {
            let codes = &h.val_codes[gi * hd * cw..(gi + 1) * hd * cw];
            let params = &val_params[gi * hd..(gi + 1) * hd];
            let p = &s.scores[gi * g..(gi + 1) * g];
            match h.geo.value_bits {
                2 => value_channel_acc::<2>(codes, params, p, cw, out),
                3 => value_channel_acc::<3>(codes, params, p, cw, out),
                _ => value_channel_acc::<4>(codes, params, p, cw, out),
            }
        }
    } else {
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
            let params = &val_params[t * vnp..(t + 1) * vnp];
            match h.geo.value_bits {
                2 => value_acc::<2>(codes, params, p, gv, &mut s.min_acc, out),
                3 => value_acc::<3>(codes, params, p, gv, &mut s.min_acc, out),
                _ => value_acc::<4>(codes, params, p, gv, &mut s.min_acc, out),
            }
        }
        for (c, o) in out.iter_mut().enumerate() {
            *o += s.min_acc[c / gv];
        }
    }
    unpacked_rows(h, false, n_window, &mut s.kf);
    for (&p, v) in s.scores[nq..nq + nf].iter().zip(s.kf.chunks_exact(hd)) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

#[inline]
fn dot(q: &[f32], k: &[f32]) -> f32 {
    q.iter().zip(k).map(|(&a, &b)| a * b).sum()
}

/// K (`key`) or V rows kept outside quantized groups, in score-buffer order (sinks, pool,
/// extra pool, the first `n_window` window tokens), as f32 into `out`.
fn unpacked_rows(h: &HeadCache, key: bool, n_window: usize, out: &mut Vec<f32>) {
    let hd = h.head_dim();
    let segs = if key {
        [&h.sink_k, &h.pool_k, &h.extra_k, &h.win_k]
    } else {
        [&h.sink_v, &h.pool_v, &h.extra_v, &h.win_v]
    };
    let n: usize = segs[..3].iter().map(|r| r.len()).sum::<usize>() + n_window;
    out.clear();
    out.resize(n * hd, 0.0);
    let mut off = 0;
    for (i, seg) in segs.iter().enumerate() {
        let rows = if i == 3 { n_window } else { seg.len() };
        seg.to_f32(0, rows, &mut out[off..off + rows * hd]);
        off += rows * hd;
    }
}

/// Scores of one key group: `Σ_c (q_c·scale_c)·code_c + Σ_c q_c·min_c`, 32 tokens of one
/// channel (`B` packed words, read as one 128-bit stream) at a time so the inner loop is a
/// fixed-width FMA and 3-bit codes that straddle words need no special case.
#[inline]
fn key_scores<const B: u32>(
    codes: &[u32],      // [head_dim][kw]
    params: &[QParams], // [head_dim]
    qq: &[f32],         // [head_dim]
    qs: &mut [f32],     // [head_dim]
    kw: usize,
    dst: &mut [f32], // [G]
) {
    let mask = (1u128 << B) - 1;
    let mut bias = 0f32;
    for ((s, &q), p) in qs.iter_mut().zip(qq).zip(params) {
        *s = q * param_scale(*p);
        bias += q * param_min(*p);
    }
    let g = dst.len();
    for (ci, w0) in (0..kw).step_by(B as usize).enumerate() {
        let mut acc = [0f32; 32];
        for (c, &s) in qs.iter().enumerate() {
            let run = &codes[c * kw + w0..c * kw + kw.min(w0 + B as usize)];
            let stream = run
                .iter()
                .enumerate()
                .fold(0u128, |x, (i, &w)| x | u128::from(w) << (32 * i));
            for (j, a) in acc.iter_mut().enumerate() {
                *a += s * ((stream >> (B * j as u32)) & mask) as f32;
            }
        }
        let t0 = ci * 32;
        let n = 32.min(g - t0);
        for (d, a) in dst[t0..t0 + n].iter_mut().zip(&acc) {
            *d = a + bias;
        }
    }
}

/// Adds one per-channel value group's share to `out`: `scale_c·Σ_t p_t·code_ct + min_c·Σ_t p_t`,
/// 32 tokens of a channel (`B` words as one 128-bit stream) at a time, as [`key_scores`].
#[inline]
fn value_channel_acc<const B: u32>(
    codes: &[u32],      // [head_dim][cw]
    params: &[QParams], // [head_dim]
    p: &[f32],          // [G] softmax numerators, 0 on masked slots
    cw: usize,
    out: &mut [f32], // [head_dim]
) {
    let mask = (1u128 << B) - 1;
    let psum: f32 = p.iter().sum();
    for (c, (o, prm)) in out.iter_mut().zip(params).enumerate() {
        let mut acc = [0f32; 32];
        for (ci, w0) in (0..cw).step_by(B as usize).enumerate() {
            let run = &codes[c * cw + w0..c * cw + cw.min(w0 + B as usize)];
            let stream = run
                .iter()
                .enumerate()
                .fold(0u128, |x, (i, &w)| x | u128::from(w) << (32 * i));
            let pt = &p[ci * 32..p.len().min(ci * 32 + 32)];
            for (j, (a, &pp)) in acc.iter_mut().zip(pt).enumerate() {
                *a += pp * ((stream >> (B * j as u32)) & mask) as f32;
            }
        }
        *o += param_scale(*prm) * acc.iter().sum::<f32>() + param_min(*prm) * psum;
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
    if 32 % B == 0 && gv % cpw == 0 {
        // Whole words per value group (2- and 4-bit codes).
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
            for (c, o) in out.iter_mut().enumerate().skip(j * gv).take(gv) {
                *o += ps * f32::from(code_at(codes, B, c));
            }
        }
    }
}

thread_local! {
    // One scratch per thread, reused across calls: decode calls `attend` once per layer and
    // token, and re-allocating (often above malloc's mmap threshold) cost more than the work.
    static SCRATCH: RefCell<(Scratch, BlockScratch)> = RefCell::default();
}

/// Runs `f` with this thread's reusable scratch buffers.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Scratch, &mut BlockScratch) -> R) -> R {
    SCRATCH.with(|s| {
        let (a, b) = &mut *s.borrow_mut();
        f(a, b)
    })
}

/// Reusable buffers of the block fast path ([`attend_block`]).
#[derive(Default)]
pub(crate) struct BlockScratch {
    scores: Vec<f32>,       // [rows][visible tokens]
    kp: Vec<f32>,           // [n_groups·head_dim][2] key (scale, min)
    km: Vec<f32>,           // [n_groups·head_dim] key minimums alone, for contiguous dot products
    vp: Vec<f32>,           // [quantized_len·(head_dim / value_group)][2] value (scale, min)
    ph: Vec<f16>,           // staging for the bulk f16 → f32 conversion of kp / vp
    qq: Vec<f32>,           // [rows][head_dim] query times the softmax scale
    qs: Vec<[[f32; 4]; 4]>, // [sub-block][head_dim][row][lane] q folded into a group's scales
    bias: Vec<f32>,         // [rows] Σ_c q_c·min_c of one key group
    kf: Vec<f32>,           // [f16 tokens][head_dim] pool, extra pool and window keys
    vf: Vec<f32>,           // [f16 tokens][head_dim] the same tokens' values
    pw: Vec<[[f32; 4]; 4]>, // [VALUE_BLOCK][head_dim / value_group][row][lane] p_t·scale_t
    mins: Vec<[f32; 4]>,    // [head_dim / value_group][row] Σ_t p_t·min_t of a sub-block
    sums: Vec<f32>,         // [rows] softmax denominators
}

/// Tokens per block of the value accumulation.
const VALUE_BLOCK: usize = 64;

/// f32 bit patterns of the four 2-bit codes of every byte, least-significant code first: four
/// codes become four floats with one table load instead of four shift/mask/convert steps.
const LUT2: [[u32; 4]; 256] = {
    const BITS: [u32; 4] = [0, 0x3f80_0000, 0x4000_0000, 0x4040_0000]; // 0.0, 1.0, 2.0, 3.0
    let mut t = [[0u32; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 4 {
            t[b][j] = BITS[(b >> (2 * j)) & 3];
            j += 1;
        }
        b += 1;
    }
    t
};

#[inline(always)]
fn unpack4(byte: u32) -> [f32; 4] {
    LUT2[(byte & 0xff) as usize].map(f32::from_bits)
}

/// `exp(x)` for softmax arguments (`x <= 0`; `-inf` and anything below about −87.3 give
/// exactly 0), branch- and select-free so that LLVM vectorises it: libm's `expf` per score was
/// a quarter of decode time. Cephes' range reduction and degree-6 polynomial, relative error
/// ~2e-7 where the result is a normal float.
#[inline(always)]
fn exp_softmax(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer in the low bits
                                     // At −88 the exponent below comes out as n = −127, whose power of two has an all-zero bit
                                     // pattern: 0.0 exactly (also for −inf, the masked slots). Skips a compare-and-select.
    let xc = if x > -88.0 { x } else { -88.0 };
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32; // n in [-127, 0]
    e * f32::from_bits(((ni + 127) as u32) << 23)
}

/// Max of a slice with 8 independent lanes (vectorises; order does not matter for max).
fn max_lanes(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let m = it
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    lanes.iter().fold(m, |a, &b| a.max(b))
}

/// `x ← exp(x − max)` in place; returns the sum, accumulated in 8 fixed lanes so the result
/// does not depend on how rows are grouped or threaded.
fn exp_sum(x: &mut [f32], max: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp_softmax(*v - max);
    }
    let mut lanes = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

/// `Σ a_i·b_i` in 8 fixed lanes: a plain `.sum()` is one serial add chain that LLVM may not
/// reorder, which made the few f16 tokens cost as much as thousands of quantized ones.
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Sub-blocks `(first row, rows)` of at most 4 rows: the kernels keep `M` rows of
/// accumulators in registers, so M is a compile-time constant.
fn sub_blocks(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut r0 = 0;
    std::iter::from_fn(move || {
        let left = rows - r0;
        let m = match left {
            0 => return None,
            1 => 1,
            2 | 3 => 2,
            _ => 4,
        };
        r0 += m;
        Some((r0 - m, m))
    })
}

/// Scores of `M` rows for one 16-token word `w` of a 2-bit key group:
/// `Σ_c qs[c][m]·code[c][t]`.
#[inline(always)]
fn key_word<const M: usize>(
    codes: &[u32], // [head_dim][kw]
    kw: usize,
    w: usize,
    qs: &[[[f32; 4]; 4]], // [head_dim][row][lane], the first M rows used
) -> [[f32; 16]; M] {
    let mut acc = [[0f32; 16]; M];
    let lo = key_half::<M, 0>(codes, kw, w, qs);
    let hi = key_half::<M, 8>(codes, kw, w, qs);
    for i in 0..M {
        acc[i][..8].copy_from_slice(&lo[i]);
        acc[i][8..].copy_from_slice(&hi[i]);
    }
    acc
}

/// Tokens `OFF..OFF + 8` of [`key_word`]: 8 tokens so that 4 rows of accumulators fit the 16
/// SSE registers without spilling; constant trip counts so they stay in registers; the query
/// weights come pre-broadcast (load, multiply, add: no shuffles). Codes are unpacked here, on
/// the integer ports, rather than staged through memory. Not inlined: LLVM vectorises it
/// reliably only on its own.
#[inline(never)]
fn key_half<const M: usize, const OFF: usize>(
    codes: &[u32], // [head_dim][kw]
    kw: usize,
    w: usize,
    qs: &[[[f32; 4]; 4]], // [head_dim][row][lane]
) -> [[f32; 8]; M] {
    let mut a = [[0f32; 8]; M];
    for (cw, q) in codes.chunks_exact(kw).zip(qs) {
        let word = cw[w] >> (2 * OFF);
        let (lo, hi) = (unpack4(word), unpack4(word >> 8));
        for i in 0..M {
            let s = &q[i];
            for j in 0..4 {
                a[i][j] += s[j] * lo[j];
                a[i][4 + j] += s[j] * hi[j];
            }
        }
    }
    a
}

/// `Σ_t pw[t][j][m]·code[t][c]` for the 8 channels `8·chunk..8·chunk+8` (value group `j`) of
/// `M` rows over a block of quantized 2-bit value rows. The weights come pre-broadcast to 4
/// lanes: each product is then load, multiply, add, with no shuffles or register copies.
/// Not inlined, as [`key_half`].
#[inline(never)]
fn value_chunk<const M: usize>(
    codes: &[u32], // [tokens][value row words]
    vw: usize,
    pw: &[[[f32; 4]; 4]], // [tokens][n_vgroups][row][lane], the first M rows used
    n_vgroups: usize,
    chunk: usize,
    j: usize,
) -> [[f32; 8]; M] {
    let mut acc = [[0f32; 8]; M];
    let (wi, shift) = (chunk / 2, 16 * (chunk % 2) as u32);
    for (row, w) in codes.chunks_exact(vw).zip(pw.chunks_exact(n_vgroups)) {
        let half = row[wi] >> shift;
        let (lo, hi) = (unpack4(half), unpack4(half >> 8));
        let w = &w[j];
        for i in 0..M {
            let p = &w[i];
            for c in 0..4 {
                acc[i][c] += p[c] * lo[c];
                acc[i][4 + c] += p[c] * hi[c];
            }
        }
    }
    acc
}

/// Converts `(scale, min)` pairs to f32 in bulk (`half` uses F16C when the CPU has it).
fn params_f32(params: &[QParams], staging: &mut Vec<f16>, out: &mut Vec<f32>) {
    staging.clear();
    staging.extend(
        params
            .iter()
            .flat_map(|p| [f16::from_bits(p.scale), f16::from_bits(p.min)]),
    );
    out.clear();
    out.resize(staging.len(), 0.0);
    staging.convert_to_f32_slice(out);
}

/// Whether [`attend_block`] has a specialised kernel for this head's layout; otherwise it
/// falls back to [`attend_row`] per row. 3-bit keys (`ott3`) take the block path too: their
/// scores come from the per-row [`key_scores`] kernel, the values from the block kernel.
/// 4-bit keys could as well; they stay on the row path so that `ottk4v2`'s results are
/// bit-identical to what was measured before.
fn block_kernel_fits(h: &HeadCache) -> bool {
    let gv = h.geo.value_group as usize;
    (h.geo.key_bits == 2 || h.geo.key_bits == 3)
        && h.geo.value_bits == 2
        && !h.value_per_channel
        && gv % 8 == 0
        && h.group() % 16 == 0
}

/// Attends `rows` query rows that share one kv head and one causal horizon (GQA: the query
/// heads of one kv head, for one token): `q`, `out`: `[rows][head_dim]`. Each packed code word
/// is unpacked once for all rows, and each row's arithmetic is the same whatever the
/// grouping, so results do not depend on how rows are split over calls or threads.
pub(crate) fn attend_block(
    h: &HeadCache,
    q: &[f32],
    scale: f32,
    n_window: usize,
    s1: &mut Scratch,
    s: &mut BlockScratch,
    out: &mut [f32],
) {
    let hd = h.head_dim();
    let rows = q.len() / hd;
    debug_assert!(q.len() == rows * hd && out.len() == q.len() && n_window <= h.window_len());
    if !block_kernel_fits(h) {
        for (qr, o) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
            attend_row(h, qr, scale, n_window, s1, o);
        }
        return;
    }
    let g = h.group();
    let nq = h.quantized_len();
    let nf = h.sink_len() + h.pool.len() + h.extra.len() + n_window;
    let total = nq + nf;
    s.scores.clear();
    s.scores.resize(rows * total, 0.0);
    s.qq.clear();
    s.qq.extend(q.iter().map(|&x| x * scale));
    s.sums.clear();
    s.sums.resize(rows, 0.0);

    // Quantized keys, one group at a time.
    let kw = h.key_words();
    params_f32(&h.key_params, &mut s.ph, &mut s.kp);
    s.km.clear();
    s.km.extend(s.kp.iter().skip(1).step_by(2));
    let n_sub = sub_blocks(rows).count();
    s.qs.resize(n_sub * hd, [[0.0; 4]; 4]);
    s.bias.resize(rows, 0.0);
    let mw = h.mask_words();
    let key_bits = h.geo.key_bits;
    for gi in 0..h.n_groups {
        if key_bits == 2 {
            let kp = &s.kp[gi * hd * 2..(gi + 1) * hd * 2];
            for (b, (r0, m)) in sub_blocks(rows).enumerate() {
                for (c, sc) in kp.chunks_exact(2).enumerate() {
                    for i in 0..m {
                        s.qs[b * hd + c][i] = [s.qq[(r0 + i) * hd + c] * sc[0]; 4];
                    }
                }
                for i in 0..m {
                    let qr = &s.qq[(r0 + i) * hd..(r0 + i + 1) * hd];
                    s.bias[r0 + i] = dot_lanes(qr, &s.km[gi * hd..(gi + 1) * hd]);
                }
            }
            let codes = &h.key_codes[gi * hd * kw..(gi + 1) * hd * kw]; // [head_dim][kw]
            for w in 0..kw {
                let t0 = gi * g + w * 16;
                for (b, (r0, m)) in sub_blocks(rows).enumerate() {
                    let qs = &s.qs[b * hd..(b + 1) * hd];
                    let mut put = |i: usize, a: &[f32; 16]| {
                        let d = &mut s.scores[(r0 + i) * total + t0..(r0 + i) * total + t0 + 16];
                        for (d, a) in d.iter_mut().zip(a) {
                            *d = a + s.bias[r0 + i];
                        }
                    };
                    match m {
                        4 => key_word::<4>(codes, kw, w, qs)
                            .iter()
                            .enumerate()
                            .for_each(|(i, a)| put(i, a)),
                        2 => key_word::<2>(codes, kw, w, qs)
                            .iter()
                            .enumerate()
                            .for_each(|(i, a)| put(i, a)),
                        _ => key_word::<1>(codes, kw, w, qs)
                            .iter()
                            .enumerate()
                            .for_each(|(i, a)| put(i, a)),
                    }
                }
            }
        } else {
            let codes = &h.key_codes[gi * hd * kw..(gi + 1) * hd * kw];
            let params = &h.key_params[gi * hd..(gi + 1) * hd];
            s1.qs.resize(hd, 0.0);
            for r in 0..rows {
                let qq = &s.qq[r * hd..(r + 1) * hd];
                let dst = &mut s.scores[r * total + gi * g..r * total + (gi + 1) * g];
                debug_assert_eq!(key_bits, 3);
                key_scores::<3>(codes, params, qq, &mut s1.qs, kw, dst);
            }
        }
        for (wi, &m) in h.masks[gi * mw..(gi + 1) * mw].iter().enumerate() {
            let mut m = m;
            while m != 0 {
                let t = gi * g + wi * 32 + m.trailing_zeros() as usize;
                for r in 0..rows {
                    s.scores[r * total + t] = f32::NEG_INFINITY;
                }
                m &= m - 1;
            }
        }
    }

    // Tokens outside quantized groups: sinks, pool, extra pool, visible window, converted
    // once for all rows.
    unpacked_rows(h, true, n_window, &mut s.kf);
    unpacked_rows(h, false, n_window, &mut s.vf);
    debug_assert_eq!(s.kf.len(), nf * hd);
    for r in 0..rows {
        let qr = &s.qq[r * hd..(r + 1) * hd];
        let dst = &mut s.scores[r * total + nq..(r + 1) * total];
        for (d, k) in dst.iter_mut().zip(s.kf.chunks_exact(hd)) {
            *d = dot_lanes(qr, k);
        }
    }

    // One softmax per row over the union.
    out.fill(0.0);
    for r in 0..rows {
        let sr = &mut s.scores[r * total..(r + 1) * total];
        let max = max_lanes(sr);
        if max == f32::NEG_INFINITY {
            sr.fill(0.0); // nothing visible (cannot happen through OttCache)
            continue;
        }
        s.sums[r] = exp_sum(sr, max);
    }

    // Quantized values: Σ_t p_t·scale_t·code + Σ_t p_t·min_t per value group, in blocks of
    // VALUE_BLOCK tokens so that the broadcast weights stay in L1 across the channel chunks.
    let (vw, nvg) = (h.val_words(), h.val_nparams());
    let gv = h.geo.value_group as usize;
    params_f32(
        &h.value_params(&mut s1.vdec)[..nq * nvg],
        &mut s.ph,
        &mut s.vp,
    );
    s.pw.resize(VALUE_BLOCK * nvg, [[0.0; 4]; 4]);
    for (r0, m) in sub_blocks(rows) {
        // [n_vgroups][row]: the min sums of all rows advance together, in token order.
        s.mins.clear();
        s.mins.resize(nvg, [0.0; 4]);
        for t0 in (0..nq).step_by(VALUE_BLOCK) {
            let t1 = (t0 + VALUE_BLOCK).min(nq);
            for t in t0..t1 {
                let mut pt = [0f32; 4];
                for (i, p) in pt.iter_mut().enumerate().take(m) {
                    *p = s.scores[(r0 + i) * total + t];
                }
                let prm = &s.vp[t * nvg * 2..(t + 1) * nvg * 2];
                let w = &mut s.pw[(t - t0) * nvg..(t - t0 + 1) * nvg];
                for ((w, mn), sm) in w.iter_mut().zip(&mut s.mins).zip(prm.chunks_exact(2)) {
                    *w = std::array::from_fn(|i| [pt[i] * sm[0]; 4]);
                    *mn = std::array::from_fn(|i| mn[i] + pt[i] * sm[1]);
                }
            }
            let codes = &h.val_codes[t0 * vw..t1 * vw];
            let pw = &s.pw[..(t1 - t0) * nvg];
            for chunk in 0..hd / 8 {
                let j = chunk * 8 / gv;
                let mut add = |i: usize, a: &[f32; 8]| {
                    let o = &mut out[(r0 + i) * hd + chunk * 8..(r0 + i) * hd + chunk * 8 + 8];
                    for (o, a) in o.iter_mut().zip(a) {
                        *o += a;
                    }
                };
                match m {
                    4 => value_chunk::<4>(codes, vw, pw, nvg, chunk, j)
                        .iter()
                        .enumerate()
                        .for_each(|(i, a)| add(i, a)),
                    2 => value_chunk::<2>(codes, vw, pw, nvg, chunk, j)
                        .iter()
                        .enumerate()
                        .for_each(|(i, a)| add(i, a)),
                    _ => value_chunk::<1>(codes, vw, pw, nvg, chunk, j)
                        .iter()
                        .enumerate()
                        .for_each(|(i, a)| add(i, a)),
                }
            }
        }
        for i in 0..m {
            let o = &mut out[(r0 + i) * hd..(r0 + i + 1) * hd];
            for (c, x) in o.iter_mut().enumerate() {
                *x += s.mins[c / gv][i];
            }
        }
    }

    // f16 values, then the softmax denominator.
    for r in 0..rows {
        let p = &s.scores[r * total + nq..(r + 1) * total];
        let o = &mut out[r * hd..(r + 1) * hd];
        for (&pt, v) in p.iter().zip(s.vf.chunks_exact(hd)) {
            for (x, &vv) in o.iter_mut().zip(v) {
                *x += pt * vv;
            }
        }
        if s.sums[r] > 0.0 {
            let inv = 1.0 / s.sums[r];
            o.iter_mut().for_each(|x| *x *= inv);
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

/// Scalar reference of [`attend_row`]: plain softmax over the dequantized cache, all in the
/// caller's space (`q` and `out` unrotated; stored rows rotated back first), so that it also
/// checks the fast path's rotation of q and of the output.
pub(crate) fn attend_row_ref(
    h: &HeadCache,
    d: &Dequantized,
    q: &[f32],
    scale: f32,
    n_window: usize,
    out: &mut [f32],
) {
    let hd = h.head_dim();
    let to32 = |x: &super::rows::Rows, n: usize, key: bool| -> Vec<f32> {
        let mut r = vec![0f32; n * hd];
        x.to_f32(0, n, &mut r);
        if key {
            h.unrotate_keys(&mut r);
        } else {
            h.unrotate_values(&mut r);
        }
        r
    };
    let mut keys: Vec<f32> = Vec::new(); // [visible][head_dim]
    let mut values: Vec<f32> = Vec::new(); // [visible][head_dim]
    for t in 0..h.quantized_len() {
        if !d.masked[t] {
            keys.extend_from_slice(&d.keys[t * hd..(t + 1) * hd]);
            values.extend_from_slice(&d.values[t * hd..(t + 1) * hd]);
        }
    }
    for (k, v, n) in [
        (&h.sink_k, &h.sink_v, h.sink_k.len()),
        (&h.pool_k, &h.pool_v, h.pool_k.len()),
        (&h.extra_k, &h.extra_v, h.extra_k.len()),
        (&h.win_k, &h.win_v, n_window),
    ] {
        keys.extend(to32(k, n, true));
        values.extend(to32(v, n, false));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheConfig, CacheShape, OttCache};

    /// Same bound as tests/cache_attention.rs FAST_VS_REF_ABS (different summation order).
    const FAST_VS_REF_ABS: f32 = 1e-4;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn exp_softmax_matches_libm_and_is_zero_when_masked() {
        assert_eq!(exp_softmax(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_softmax(-200.0), 0.0);
        assert_eq!(exp_softmax(0.0), 1.0);
        let mut x = 0f32;
        while x > -87.0 {
            let (a, b) = (exp_softmax(x), x.exp());
            assert!((a - b).abs() <= 4e-7 * b, "{x}: {a} vs {b}");
            x -= 0.013;
        }
    }

    /// Row blocks of every size the sub-block split produces (GQA 1..8, so 4+4, 4+2+1, …),
    /// several value groups per row (Gv 16 at head_dim 64), any row range.
    #[test]
    fn block_path_matches_reference_for_all_gqa_widths_and_row_ranges() {
        for (n_kv, rep, spec) in [
            (2, 8, "ott2:t=0"),
            (1, 7, "ott2:t=0,gv=16"),
            (2, 3, "ott2:t=0,g=32,r=8"),
            (3, 1, "ott2:t=0,gv=8"),
            // 3-bit keys: per-row key kernel inside the block path; rotation and sinks.
            (2, 3, "ott3:t=0,g=64,r=8"),
            (1, 7, "ott2:k=3,t=0,rot=1,s=4,gv=16"),
        ] {
            let (hd, t) = (64, 700);
            let n_head = n_kv * rep;
            let mut seed = 5u64;
            let mut g = |n: usize| (0..n).map(|_| 2.0 * lcg(&mut seed)).collect::<Vec<f32>>();
            let (k, v, q) = (g(t * n_kv * hd), g(t * n_kv * hd), g(n_head * hd));
            let config: CacheConfig = spec.parse().unwrap();
            let shape = CacheShape {
                n_layer: 1,
                n_head_kv: n_kv,
                head_dim: hd,
                max_tokens: t,
            };
            let mut c = OttCache::new(config, shape).unwrap();
            c.append(0, &k, &v, t).unwrap();
            let mut want = vec![0f32; n_head * hd];
            c.attend_ref(0, &q, 1, n_head, 0.125, 0..n_head, &mut want)
                .unwrap();
            for (a, b) in [
                (0, n_head),
                (1, n_head),
                (0, n_head - 1),
                (2, n_head.min(5)),
            ] {
                if a >= b {
                    continue;
                }
                let mut got = vec![0f32; (b - a) * hd];
                c.attend(0, &q, 1, n_head, 0.125, a..b, &mut got).unwrap();
                let diff = got
                    .iter()
                    .zip(&want[a * hd..b * hd])
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff <= FAST_VS_REF_ABS,
                    "{spec} rep {rep} rows {a}..{b}: {diff}"
                );
            }
        }
    }
}
