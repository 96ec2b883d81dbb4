//! Memory accounting (OTT.md §6): bytes actually allocated, by segment, and the closed form.

use std::ops::Add;

use super::{CacheConfig, CacheError, CacheShape};
use crate::format::{words_for, OutlierSlot, QParams};

/// Bytes allocated (Vec capacity × element size), by segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Packed key and value codes.
    pub codes: usize,
    /// f16 (scale, min) pairs of key and value groups.
    pub params: usize,
    /// The f16 window (K and V).
    pub window: usize,
    /// f16 K and V of the outlier and extra pools.
    pub pools: usize,
    /// Placeholder masks of quantized groups and positions of pooled tokens.
    pub masks_positions: usize,
    pub total: usize,
}

impl MemoryStats {
    pub fn new(
        codes: usize,
        params: usize,
        window: usize,
        pools: usize,
        masks_positions: usize,
    ) -> Self {
        Self {
            codes,
            params,
            window,
            pools,
            masks_positions,
            total: codes + params + window + pools + masks_positions,
        }
    }

    /// Total bytes per cached token (0 for an empty cache).
    pub fn bytes_per_token(&self, n_tokens: usize) -> f64 {
        if n_tokens == 0 {
            0.0
        } else {
            self.total as f64 / n_tokens as f64
        }
    }

    /// Bits per K or V element of the quantized part alone (codes + params).
    pub fn quantized_bits_per_element(&self, n_quantized_elements: usize) -> f64 {
        if n_quantized_elements == 0 {
            0.0
        } else {
            (self.codes + self.params) as f64 * 8.0 / n_quantized_elements as f64
        }
    }
}

impl Add for MemoryStats {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self::new(
            self.codes + o.codes,
            self.params + o.params,
            self.window + o.window,
            self.pools + o.pools,
            self.masks_positions + o.masks_positions,
        )
    }
}

/// Closed form of [`super::OttCache::memory`] after `n_tokens` tokens went through every layer.
///
/// Per (layer, kv-head), with f = max(0, n − R) / G flushed groups, hd = head_dim:
/// codes = 4·f·(hd·⌈G·b_k/32⌉ + G·⌈hd·b_v/32⌉) with that layer's bits, params = 4·f·(hd + G·hd/Gv)
/// (with `vp=8`: f·(4·hd + 2·G·hd/Gv + 4·hd/Gv)),
/// window = 2·row·min(R + G, max_tokens), pools = 2·row·(P + E + min(S, max_tokens)) with
/// row the bytes of one stored row (2·hd for f16, hd + 2·hd/block for q8),
/// masks_positions = 4·f·⌈G/32⌉ + 8·(P + E), with (P, E) of that layer.
pub fn expected_memory(
    config: &CacheConfig,
    shape: &CacheShape,
    n_tokens: usize,
) -> Result<MemoryStats, CacheError> {
    super::ott::check_shape(config, shape)?;
    let row = config.initial_row_precision(shape.head_dim);
    let mut total = MemoryStats::default();
    for layer in 0..shape.n_layer {
        let one = expected_head_memory(config, shape, layer, row, n_tokens);
        for _ in 0..shape.n_head_kv {
            total = total + one;
        }
    }
    Ok(total)
}

/// The closed form of one (layer, kv head) whose rows are stored in `row` precision (the
/// shape already checked).
pub(crate) fn expected_head_memory(
    config: &CacheConfig,
    shape: &CacheShape,
    layer: usize,
    row: super::RowPrecision,
    n_tokens: usize,
) -> MemoryStats {
    let hd = shape.head_dim;
    let (g, r) = (config.group as usize, config.residual as usize);
    let gv = config.value_group_for(hd as u32) as usize;
    let f = n_tokens.saturating_sub(r) / g;
    let qp = std::mem::size_of::<QParams>();
    let row = row.row_bytes(hd);
    let slot = std::mem::size_of::<OutlierSlot>();
    let (p, e) = config.pools_for(layer as u32);
    let (p, e) = (p as usize, e as usize);
    let (kb, vb) = config.bits_for(layer as u32);
    let kw = words_for(g as u32, kb) as usize;
    let vw = words_for(hd as u32, vb) as usize;
    // Values per token: G rows of vw words and hd/Gv params; per channel: a key-like group.
    let (v_codes, v_params, cols) = if config.values_per_channel(hd as u32) {
        (hd * words_for(g as u32, vb) as usize, hd, 1)
    } else {
        (g * vw, g * (hd / gv), hd / gv)
    };
    // 8-bit value pairs: two bytes each, plus one f16 pair per column of a group.
    let v_param_bytes = if config.value_param_bits == 8 {
        2 * v_params + qp * cols
    } else {
        qp * v_params
    };
    MemoryStats::new(
        4 * f * (hd * kw + v_codes),
        f * (qp * hd + v_param_bytes),
        2 * row * (r + g).min(shape.max_tokens),
        2 * row * (p + e + (config.sink as usize).min(shape.max_tokens)),
        4 * f * g.div_ceil(32) + slot * (p + e),
    )
}

/// Bytes the same tokens take in a plain f16 cache (K and V), for ratios.
pub fn f16_bytes(shape: &CacheShape, n_tokens: usize) -> usize {
    2 * 2 * shape.n_layer * shape.n_head_kv * shape.head_dim * n_tokens
}

/// Total physical memory of this machine in bytes, where the system says (Linux:
/// `/proc/meminfo`); `None` elsewhere, and then only fallible allocation guards the cache.
pub(crate) fn physical_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}
