//! Kernel timings for `ottkv cuda-bench`: decode attention over `ott2` and f16 caches of
//! several sequences, timed with CUDA events, against a measured device-to-device copy.
//!
//! Cache contents are zeros: the kernels have no value-dependent branches (masks are empty
//! here), so their speed does not depend on the values; correctness is the parity tests' job.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use serde::Serialize;

use super::cache::LayerBufs;
use super::device::driver;
use super::launch::{sys, Guarded};
use super::ott_attend::{self, SplitScratch};
use super::{CudaError, Device, F16Attention};
use crate::cache::CacheConfig;
use crate::format::words_for;

/// One measured configuration.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub kernel: String,
    pub batch: usize,
    pub tokens: usize,
    pub ms: f64,
    /// Cache bytes the kernel reads per call.
    pub cache_bytes: usize,
    pub cache_gbps: f64,
    /// cache_gbps over the measured copy bandwidth (read + write bytes per second).
    pub frac_of_copy: f64,
}

/// Times `f` (which enqueues work) with events: mean milliseconds over `iters` after warmup.
fn time_ms(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mk = || {
        dev.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("creating a timing event"))
    };
    let (a, b) = (mk()?, mk()?);
    a.record(&dev.stream)
        .map_err(driver("recording an event"))?;
    for _ in 0..iters {
        f()?;
    }
    b.record(&dev.stream)
        .map_err(driver("recording an event"))?;
    let ms = a.elapsed_ms(&b).map_err(driver("reading an event"))?;
    Ok(ms as f64 / iters as f64)
}

/// Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.
pub fn copy_gbps(dev: &Device, bytes: usize) -> Result<f64, CudaError> {
    let n = bytes / 4;
    let src = dev
        .stream
        .alloc_zeros::<u32>(n)
        .map_err(driver("allocating the copy source"))?;
    let mut dst = dev
        .stream
        .alloc_zeros::<u32>(n)
        .map_err(driver("allocating the copy destination"))?;
    let ms = time_ms(dev, 20, || {
        dev.stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(driver("device-to-device copy"))
    })?;
    Ok(2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9)
}

/// Decode attention (one query token per sequence) over an OTT cache of `tokens` tokens in
/// each of `batch` sequences; returns (ms per call, cache bytes read per call).
#[allow(clippy::too_many_arguments)]
pub fn ott_decode(
    dev: &Arc<Device>,
    config: &CacheConfig,
    batch: usize,
    tokens: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    iters: usize,
) -> Result<(f64, usize), CudaError> {
    ott_attend::check_head_dim(head_dim)?;
    let (g, r) = (config.group as usize, config.residual as usize);
    let n_groups = tokens.saturating_sub(r) / g;
    let win_len = tokens - n_groups * g;
    let (p, e) = config.pools_for(config.untraced_layers); // a traced layer
    let hd = head_dim;
    let geo = crate::format::Geometry {
        head_dim: hd as u32,
        key_group: config.group,
        value_group: config.value_group_for(hd as u32),
        key_bits: config.key_bits,
        value_bits: config.value_bits,
    };
    let dims = sys::ottkv_cache_dims {
        geo: sys::ottkv_geometry {
            head_dim: geo.head_dim,
            key_group: geo.key_group,
            value_group: geo.value_group,
            key_bits: geo.key_bits,
            value_bits: geo.value_bits,
        },
        n_head_kv: n_head_kv as u32,
        key_words: words_for(geo.key_group, geo.key_bits),
        value_words: geo.value_row_words(),
        mask_words: geo.key_group.div_ceil(32),
        max_groups: n_groups.max(1) as u32,
        win_cap: (r + g) as u32,
        sink_cap: 1,
        pool_cap: p.max(1),
        extra_cap: e.max(1),
    };
    let mut bufs = LayerBufs::new(dev, dims, batch)?;
    let heads = batch * n_head_kv;
    bufs.pool_len.upload(dev, 0, &vec![p; heads])?;
    bufs.extra_len.upload(dev, 0, &vec![e; heads])?;
    let rows = batch * n_head;
    let q: Vec<f32> = (0..rows * hd)
        .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
        .collect();
    let mut qd = Guarded::<f32>::new(dev, "queries", q.len())?;
    qd.upload(dev, 0, &q)?;
    let max_vis = n_groups * g + p as usize + e as usize + win_len;
    let plan = ott_attend::plan_splits(
        dev,
        max_vis,
        ott_attend::row_blocks(n_head, n_head_kv) * batch,
    );
    let scratch = SplitScratch::new(dev, rows, plan, hd)?;
    let args = sys::ottkv_attend_args {
        c: bufs.ptrs(dev),
        d: dims,
        q: qd.addr(dev),
        part_o: scratch.part_o.addr(dev),
        part_ml: scratch.part_ml.addr(dev),
        out: scratch.out.addr(dev),
        n_seq: batch as u32,
        n_q: 1,
        n_head: n_head as u32,
        n_groups: n_groups as u32,
        sink_len: 0,
        win_start: 0,
        win_len: win_len as u32,
        n_split: plan.n_split,
        split_len: plan.split_len,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let ms = time_ms(dev, iters, || {
        // SAFETY: `bufs` was allocated from `dims` for `batch` sequences; q and the scratch
        // for batch x n_head rows and this plan; n_groups <= max_groups, win_len < win_cap.
        unsafe { ott_attend::ott_attend(dev, &args)? };
        ott_attend::merge(dev, &scratch, rows, plan, hd)
    })?;
    scratch.check(dev)?;
    bufs.check_guards(dev)?;
    let vnp = hd / geo.value_group as usize;
    let per_head = n_groups
        * 4
        * (hd * dims.key_words as usize
            + hd
            + g * dims.value_words as usize
            + g * vnp
            + dims.mask_words as usize)
        + (p as usize + e as usize + win_len) * hd * 2 * 2;
    Ok((ms, per_head * heads))
}

/// The same decode shapes over a plain f16 cache with our f16 kernel.
pub fn f16_decode(
    dev: &Arc<Device>,
    batch: usize,
    tokens: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    iters: usize,
) -> Result<(f64, usize), CudaError> {
    let mut f = F16Attention::new(dev.clone(), batch, n_head_kv, head_dim, tokens)?;
    f.set_len_unfilled(tokens)?;
    let rows = batch * n_head;
    let q: Vec<f32> = (0..rows * head_dim)
        .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
        .collect();
    let p = f.prepare(&q, 1, n_head, 1.0 / (head_dim as f32).sqrt())?;
    let ms = time_ms(dev, iters, || f.launch(&p))?;
    Ok((ms, f.bytes_read()))
}
