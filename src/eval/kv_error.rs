//! Replays captured K/V through each cache type and measures what it does to attention
//! (`ottkv kv-error`): reconstruction NMSE of keys and values, and the relative error of the
//! attention output of the second half of the queries, each seeing the cache state it would
//! see when decoded (batch equivalence makes one batched forward equal to that).

use super::attention::{causal_attention, AttnShape};
use super::kvdump::KvDump;
use crate::cache::{CacheConfig, CacheShape, OttCache};
use crate::error::{Error, Result};
use crate::ggml::quantize::roundtrip;
use crate::gguf::GgmlType;
use crate::kind::BlockType;
pub use crate::kind::CacheKind;
use crate::quant::hadamard_blocks;
use serde::Serialize;

/// The cache types `kv-error` reports by default.
pub const DEFAULT_CACHES: &[&str] = &[
    "f16", "q8_0", "q4_0", "ott2", "ott2-p0", "ottk4v2", "kivi2", "ott4", "kivi4",
];

#[derive(Serialize, Clone, Debug)]
pub struct LayerError {
    pub layer: usize,
    pub attn_rel_err: f64,
    pub k_nmse: f64,
    pub v_nmse: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct CacheError {
    pub cache: String,
    /// Mean over layers, query heads and query positions n/2..n-1 of ‖ô − o‖ / ‖o‖.
    pub attn_rel_err: f64,
    /// Mean over layers of Σ‖k̂ − k‖² / Σ‖k‖² over the final cache state.
    pub k_nmse: f64,
    pub v_nmse: f64,
    /// K+V bytes per token, all layers, as allocated after the n tokens.
    pub bytes_per_token: f64,
    pub per_layer: Vec<LayerError>,
}

#[derive(Serialize, Clone, Debug)]
pub struct KvErrorReport {
    pub model: String,
    pub tokens: usize,
    pub results: Vec<CacheError>,
}

/// The reference outputs of one layer: exact attention over the dump's own K/V.
fn shape_of(d: &KvDump) -> AttnShape {
    AttnShape {
        n_tokens: d.n_tokens,
        n_head: d.n_head,
        n_head_kv: d.n_head_kv,
        head_dim: d.head_dim,
    }
}

/// Runs every cache in `caches` over the dump. `progress(cache, layer)` is called as it goes.
pub fn kv_error(
    d: &KvDump,
    caches: &[(String, CacheKind)],
    threads: usize,
    mut progress: impl FnMut(&str, usize),
) -> Result<KvErrorReport> {
    if d.n_tokens < 2 {
        return Err(Error::InvalidArgument(
            "the dump needs at least 2 tokens".into(),
        ));
    }
    let s = shape_of(d);
    let from = d.n_tokens / 2;
    let exact: Vec<Vec<f32>> = (0..d.n_layer)
        .map(|l| {
            progress("exact", l);
            causal_attention(&d.q[l], &d.k[l], &d.v[l], s, from, threads)
        })
        .collect();
    let mut results = Vec::new();
    for (name, kind) in caches {
        let r = match kind {
            CacheKind::Block {
                ty: BlockType::F16, ..
            } => simulate_plain(d, &exact, name, None, threads, &mut progress)?,
            CacheKind::Block { ty, rotate } => simulate_plain(
                d,
                &exact,
                name,
                Some((ty.ggml_type(), *rotate)),
                threads,
                &mut progress,
            )?,
            CacheKind::Ott(cfg) => simulate_ott(d, &exact, name, cfg, threads, &mut progress)?,
        };
        results.push(r);
    }
    Ok(KvErrorReport {
        model: d.model.clone(),
        tokens: d.n_tokens,
        results,
    })
}

/// Mean over (query, head) rows of ‖a − b‖ / ‖b‖.
fn mean_rel_err(approx: &[f32], exact: &[f32], hd: usize) -> f64 {
    let rows = exact.len() / hd;
    let sum: f64 = approx
        .chunks_exact(hd)
        .zip(exact.chunks_exact(hd))
        .map(|(a, e)| {
            let num: f64 = a.iter().zip(e).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let den: f64 = e.iter().map(|y| (*y as f64).powi(2)).sum();
            if den > 0.0 {
                (num / den).sqrt()
            } else {
                num.sqrt()
            }
        })
        .sum();
    sum / rows.max(1) as f64
}

fn nmse(approx: &[f32], exact: &[f32]) -> f64 {
    let num: f64 = approx
        .iter()
        .zip(exact)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = exact.iter().map(|y| (*y as f64).powi(2)).sum();
    if den > 0.0 {
        num / den
    } else {
        num
    }
}

fn summarize(name: &str, per_layer: Vec<LayerError>, bytes_per_token: f64) -> CacheError {
    let n = per_layer.len().max(1) as f64;
    let mean = |f: fn(&LayerError) -> f64| per_layer.iter().map(f).sum::<f64>() / n;
    CacheError {
        cache: name.to_string(),
        attn_rel_err: mean(|l| l.attn_rel_err),
        k_nmse: mean(|l| l.k_nmse),
        v_nmse: mean(|l| l.v_nmse),
        bytes_per_token,
        per_layer,
    }
}

/// f16 or a ggml block type: every token (the current one included) is read back from the
/// quantized cache, as in llama.cpp.
fn simulate_plain(
    d: &KvDump,
    exact: &[Vec<f32>],
    name: &str,
    ggml: Option<(GgmlType, bool)>,
    threads: usize,
    progress: &mut impl FnMut(&str, usize),
) -> Result<CacheError> {
    let s = shape_of(d);
    let hd = d.head_dim;
    let mut per_layer = Vec::new();
    let mut bytes_per_elem = 2.0;
    for (l, exact_l) in exact.iter().enumerate() {
        progress(name, l);
        let (k, v) = match ggml {
            None => (d.k[l].clone(), d.v[l].clone()),
            Some((ty, rotate)) => {
                let t = ty;
                let (blck, tsize) = (t.block_size() as usize, t.type_size() as usize);
                if hd % blck != 0 {
                    return Err(Error::BlockMismatch {
                        cache: name.to_string(),
                        head_dim: hd,
                        block: blck,
                    });
                }
                bytes_per_elem = tsize as f64 / blck as f64;
                let (rk, rv) = if rotate {
                    crate::quant::llama_rotation_blocks(hd)
                } else {
                    (0, 0)
                };
                (
                    ggml_roundtrip(ty.id(), &d.k[l], rk)?,
                    ggml_roundtrip(ty.id(), &d.v[l], rv)?,
                )
            }
        };
        let o = causal_attention(&d.q[l], &k, &v, s, d.n_tokens / 2, threads);
        per_layer.push(LayerError {
            layer: l,
            attn_rel_err: mean_rel_err(&o, exact_l, hd),
            k_nmse: nmse(&k, &d.k[l]),
            v_nmse: nmse(&v, &d.v[l]),
        });
    }
    let bpt = bytes_per_elem * 2.0 * (d.n_layer * d.n_head_kv * hd) as f64;
    Ok(summarize(name, per_layer, bpt))
}

/// Rotates by `rot`-blocks (0: none), quantizes with ggml, dequantizes and rotates back
/// (H is its own inverse), which is what attention over llama.cpp's rotated cache sees.
fn ggml_roundtrip(ty: u32, x: &[f32], rot: usize) -> Result<Vec<f32>> {
    let mut y = x.to_vec();
    if rot > 0 {
        hadamard_blocks(&mut y, rot);
    }
    let mut z = roundtrip(ty, &y)?;
    if rot > 0 {
        hadamard_blocks(&mut z, rot);
    }
    Ok(z)
}

fn simulate_ott(
    d: &KvDump,
    exact: &[Vec<f32>],
    name: &str,
    cfg: &CacheConfig,
    threads: usize,
    progress: &mut impl FnMut(&str, usize),
) -> Result<CacheError> {
    let (n, nh, nkv, hd) = (d.n_tokens, d.n_head, d.n_head_kv, d.head_dim);
    let shape = CacheShape {
        n_layer: d.n_layer,
        n_head_kv: nkv,
        head_dim: hd,
        max_tokens: n,
    };
    let mut cache = OttCache::new(cfg.clone(), shape)?;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; n * nh * hd];
    let mut per_layer = Vec::new();
    for (l, exact_l) in exact.iter().enumerate() {
        progress(name, l);
        cache.forward(
            l, &d.q[l], &d.k[l], &d.v[l], n, nh, scale, &mut out, threads,
        )?;
        let (k, v) = reconstruct(&cache, l, d)?;
        per_layer.push(LayerError {
            layer: l,
            attn_rel_err: mean_rel_err(&out[n / 2 * nh * hd..], exact_l, hd),
            k_nmse: nmse(&k, &d.k[l]),
            v_nmse: nmse(&v, &d.v[l]),
        });
    }
    let bpt = cache.memory().total as f64 / n as f64;
    Ok(summarize(name, per_layer, bpt))
}

/// The cache's view of every token after the run, `[n][n_head_kv][head_dim]`: exact f16 for
/// window and pool tokens, dequantized codes for the rest.
fn reconstruct(cache: &OttCache, layer: usize, d: &KvDump) -> Result<(Vec<f32>, Vec<f32>)> {
    let (n, nkv, hd) = (d.n_tokens, d.n_head_kv, d.head_dim);
    let mut k = vec![0f32; n * nkv * hd];
    let mut v = vec![0f32; n * nkv * hd];
    for h in 0..nkv {
        let head = cache.head(layer, h)?;
        let (dk, dv) = (head.dequantized_keys(), head.dequantized_values());
        for t in 0..n {
            let dst = (t * nkv + h) * hd..(t * nkv + h + 1) * hd;
            let missing = || {
                Error::InvalidArgument(format!(
                    "layer {layer} head {h}: token {t} is not in the cache"
                ))
            };
            let row = |x: &[f32]| x.get(t * hd..(t + 1) * hd).map(<[f32]>::to_vec);
            let kk = head
                .full_precision_key(t)
                .or_else(|| row(&dk))
                .ok_or_else(missing)?;
            let vv = head
                .full_precision_value(t)
                .or_else(|| row(&dv))
                .ok_or_else(missing)?;
            k[dst.clone()].copy_from_slice(&kk);
            v[dst].copy_from_slice(&vv);
        }
    }
    Ok((k, v))
}
