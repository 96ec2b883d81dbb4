//! Process memory as the kernel reports it.

/// Peak resident set size of this process in bytes (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size in bytes (`VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

use crate::cache::{expected_memory, CacheShape};
use crate::error::Result;
use crate::gguf::ModelHparams;
use crate::kind::CacheKind;

/// The cache types `ottkv inspect` sizes.
pub const INSPECT_CACHES: &[&str] = &["f16", "q8_0", "q4_0", "ott2"];

/// K+V bytes per token over all layers after `n_tokens` tokens: llama.cpp's types from their
/// block sizes, ours from the cache's closed-form allocation (window and pools included).
pub fn kv_bytes_per_token(cache: &str, h: &ModelHparams, n_tokens: usize) -> Result<f64> {
    let per_token_elems =
        h.n_layer as f64 * h.n_head_kv as f64 * (h.head_dim_k + h.head_dim_v) as f64;
    Ok(match cache.parse::<CacheKind>()? {
        CacheKind::Block { ty, .. } => {
            let t = ty.ggml_type();
            per_token_elems * t.type_size() as f64 / t.block_size() as f64
        }
        CacheKind::Ott(cfg) => {
            let shape = CacheShape {
                n_layer: h.n_layer as usize,
                n_head_kv: h.n_head_kv as usize,
                head_dim: h.head_dim_k as usize,
                max_tokens: n_tokens.max(1),
            };
            expected_memory(&cfg, &shape, n_tokens)?.total as f64 / n_tokens.max(1) as f64
        }
    })
}
