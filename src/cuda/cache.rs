//! `CudaOttCache`: the OTT cache of one sequence on the device, with the interface and the
//! results of the CPU [`OttCache`](crate::cache::OttCache).
//!
//! Inputs and outputs are host f32 rows, as for the CPU cache. Rotation (when configured) and
//! the non-finite check are done on the host with the CPU's own code, so the device receives
//! exactly the stored form the CPU cache stores. The quantized storage is allocated for
//! `max_tokens` up front (a device cache is not grown by reallocation), so
//! [`CudaOttCache::memory`] reports more than the CPU cache does for a short sequence.

use std::ops::Range;
use std::sync::Arc;

use half::f16;

use super::launch::{sys, Guarded};
use super::ott_attend::{self, SplitScratch};
use super::{ott_flush, CudaError, Device};
use crate::cache::{
    expected_memory, CacheConfig, CacheError, CacheShape, HeadCache, MemoryStats, Rows,
};
use crate::format::{words_for, Geometry, OutlierSlot, QParams, NO_GROUP};
use crate::quant::hadamard_blocks;

/// Device storage of one layer, all kv heads (shapes in `kernels/ottkv_launch.h`).
pub(crate) struct LayerBufs {
    pub key_codes: Guarded<u32>,
    pub key_params: Guarded<u32>,
    pub val_codes: Guarded<u32>,
    pub val_params: Guarded<u32>,
    pub masks: Guarded<u32>,
    pub win_k: Guarded<u16>,
    pub win_v: Guarded<u16>,
    pub sink_k: Guarded<u16>,
    pub sink_v: Guarded<u16>,
    pub pool_k: Guarded<u16>,
    pub pool_v: Guarded<u16>,
    pub extra_k: Guarded<u16>,
    pub extra_v: Guarded<u16>,
    pub pool_len: Guarded<u32>,
    pub extra_len: Guarded<u32>,
    pub stopped_at: Guarded<u32>,
    pub pool_slots: Guarded<u32>,  // [H][pool rows][2] (pos, group)
    pub extra_slots: Guarded<u32>, // [H][extra rows][2]
    pub dims: sys::ottkv_cache_dims,
}

impl LayerBufs {
    /// Zeroed storage for `n_seq` sequences (the cache uses 1; the benchmark more).
    pub(crate) fn new(
        dev: &Device,
        dims: sys::ottkv_cache_dims,
        n_seq: usize,
    ) -> Result<Self, CudaError> {
        let d = &dims;
        let (hd, g) = (d.geo.head_dim as usize, d.geo.key_group as usize);
        let h = n_seq * d.n_head_kv as usize;
        let mg = d.max_groups as usize;
        let vnp = hd / d.geo.value_group as usize;
        let rows = |cap: u32| h * cap as usize * hd;
        let mut b = Self {
            key_codes: Guarded::new(dev, "key codes", h * mg * hd * d.key_words as usize)?,
            key_params: Guarded::new(dev, "key params", h * mg * hd)?,
            val_codes: Guarded::new(dev, "value codes", h * mg * g * d.value_words as usize)?,
            val_params: Guarded::new(dev, "value params", h * mg * g * vnp)?,
            masks: Guarded::new(dev, "masks", h * mg * d.mask_words as usize)?,
            win_k: Guarded::new(dev, "window keys", rows(d.win_cap))?,
            win_v: Guarded::new(dev, "window values", rows(d.win_cap))?,
            sink_k: Guarded::new(dev, "sink keys", rows(d.sink_cap))?,
            sink_v: Guarded::new(dev, "sink values", rows(d.sink_cap))?,
            pool_k: Guarded::new(dev, "pool keys", rows(d.pool_cap))?,
            pool_v: Guarded::new(dev, "pool values", rows(d.pool_cap))?,
            extra_k: Guarded::new(dev, "extra pool keys", rows(d.extra_cap))?,
            extra_v: Guarded::new(dev, "extra pool values", rows(d.extra_cap))?,
            pool_len: Guarded::new(dev, "pool lengths", h)?,
            extra_len: Guarded::new(dev, "extra pool lengths", h)?,
            stopped_at: Guarded::new(dev, "tracing stop groups", h)?,
            pool_slots: Guarded::new(dev, "pool slots", h * d.pool_cap as usize * 2)?,
            extra_slots: Guarded::new(dev, "extra pool slots", h * d.extra_cap as usize * 2)?,
            dims,
        };
        b.stopped_at.upload(dev, 0, &vec![NO_GROUP; h])?;
        Ok(b)
    }

    pub(crate) fn ptrs(&self, dev: &Device) -> sys::ottkv_cache_ptrs {
        sys::ottkv_cache_ptrs {
            key_codes: self.key_codes.addr(dev),
            key_params: self.key_params.addr(dev),
            val_codes: self.val_codes.addr(dev),
            val_params: self.val_params.addr(dev),
            masks: self.masks.addr(dev),
            win_k: self.win_k.addr(dev),
            win_v: self.win_v.addr(dev),
            sink_k: self.sink_k.addr(dev),
            sink_v: self.sink_v.addr(dev),
            pool_k: self.pool_k.addr(dev),
            pool_v: self.pool_v.addr(dev),
            extra_k: self.extra_k.addr(dev),
            extra_v: self.extra_v.addr(dev),
            pool_len: self.pool_len.addr(dev),
            extra_len: self.extra_len.addr(dev),
        }
    }

    pub(crate) fn check_guards(&self, dev: &Device) -> Result<(), CudaError> {
        for b in [
            &self.key_codes,
            &self.key_params,
            &self.val_codes,
            &self.val_params,
            &self.masks,
            &self.pool_len,
            &self.extra_len,
            &self.stopped_at,
            &self.pool_slots,
            &self.extra_slots,
        ] {
            b.check(dev)?;
        }
        for b in [
            &self.win_k,
            &self.win_v,
            &self.sink_k,
            &self.sink_v,
            &self.pool_k,
            &self.pool_v,
            &self.extra_k,
            &self.extra_v,
        ] {
            b.check(dev)?;
        }
        Ok(())
    }

    fn memory(&self) -> MemoryStats {
        MemoryStats::new(
            self.key_codes.bytes() + self.val_codes.bytes(),
            self.key_params.bytes() + self.val_params.bytes(),
            self.win_k.bytes() + self.win_v.bytes(),
            self.pool_k.bytes()
                + self.pool_v.bytes()
                + self.extra_k.bytes()
                + self.extra_v.bytes()
                + self.sink_k.bytes()
                + self.sink_v.bytes(),
            self.masks.bytes()
                + self.pool_slots.bytes()
                + self.extra_slots.bytes()
                + self.pool_len.bytes()
                + self.extra_len.bytes()
                + self.stopped_at.bytes(),
        )
    }
}

/// Host-side schedule of one layer (the same for all its kv heads).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LayerState {
    pub n_groups: usize,
    pub win_start: usize,
    pub win_len: usize,
    pub sink_len: usize,
    pub len: usize,
    pub pool_cap: u32,
    pub extra_cap: u32,
}

/// The full state of one (layer, kv-head), in the CPU's representation, for comparisons:
/// f16 rows as bit patterns, the window oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaHeadState {
    pub n_groups: usize,
    pub key_codes: Vec<u32>,      // [n_groups][head_dim][key words]
    pub key_params: Vec<QParams>, // [n_groups][head_dim]
    pub val_codes: Vec<u32>,      // [n_groups·G][value words]
    pub val_params: Vec<QParams>, // [n_groups·G][head_dim / value_group]
    pub masks: Vec<u32>,          // [n_groups][mask words]
    pub win_k: Vec<u16>,          // [window_len][head_dim]
    pub win_v: Vec<u16>,          // [window_len][head_dim]
    pub sink_k: Vec<u16>,         // [sink_len][head_dim]
    pub sink_v: Vec<u16>,         // [sink_len][head_dim]
    pub pool: Vec<OutlierSlot>,   // [pool_len]
    pub pool_k: Vec<u16>,         // [pool_len][head_dim]
    pub pool_v: Vec<u16>,         // [pool_len][head_dim]
    pub extra: Vec<OutlierSlot>,  // [extra_len]
    pub extra_k: Vec<u16>,        // [extra_len][head_dim]
    pub extra_v: Vec<u16>,        // [extra_len][head_dim]
    pub stopped_at: Option<u32>,
}

/// f16 bit patterns of f16 rows (f16 -> f32 -> f16 is exact; q8 rows never reach here).
fn bits(x: &Rows, hd: usize) -> Vec<u16> {
    let mut f = vec![0f32; x.len() * hd];
    x.to_f32(0, x.len(), &mut f);
    f.iter().map(|&v| f16::from_f32(v).to_bits()).collect()
}

impl CudaHeadState {
    /// The same facts read from a CPU head.
    pub fn from_cpu(h: &HeadCache) -> Self {
        let hd = h.head_dim();
        Self {
            n_groups: h.n_groups,
            key_codes: h.key_codes.clone(),
            key_params: h.key_params.clone(),
            val_codes: h.val_codes.clone(),
            val_params: h.val_params.clone(),
            masks: h.masks.clone(),
            win_k: bits(&h.win_k, hd),
            win_v: bits(&h.win_v, hd),
            sink_k: bits(&h.sink_k, hd),
            sink_v: bits(&h.sink_v, hd),
            pool: h.pool.clone(),
            pool_k: bits(&h.pool_k, hd),
            pool_v: bits(&h.pool_v, hd),
            extra: h.extra.clone(),
            extra_k: bits(&h.extra_k, hd),
            extra_v: bits(&h.extra_v, hd),
            stopped_at: h.stopped_at,
        }
    }
}

fn qparams(words: Vec<u32>) -> Vec<QParams> {
    words
        .into_iter()
        .map(|w| QParams {
            scale: (w & 0xffff) as u16,
            min: (w >> 16) as u16,
        })
        .collect()
}

fn slots(words: Vec<u32>) -> Vec<OutlierSlot> {
    words
        .chunks_exact(2)
        .map(|s| OutlierSlot {
            pos: s[0] as i32,
            group: s[1],
        })
        .collect()
}

/// Settings the CPU cache has and the kernels do not implement yet: a typed error, not a
/// silently different cache.
fn unsupported(config: &CacheConfig, n_layer: usize, head_dim: usize) -> Result<(), CudaError> {
    if config.window_bits != 16 {
        return Err(CudaError::Unsupported(format!(
            "wb={} (window, sinks and pools are f16 on CUDA)",
            config.window_bits
        )));
    }
    if config.rotate == crate::cache::Rotation::Auto {
        return Err(CudaError::Unsupported(
            "rot=auto (per-head key rotation); keys and values rotate together on CUDA".into(),
        ));
    }
    if config.value_param_bits != 16 {
        return Err(CudaError::Unsupported(format!(
            "vp={} (value (scale, min) pairs are f16 on CUDA)",
            config.value_param_bits
        )));
    }
    if config.key_fit != crate::cache::Fit::MinMax {
        return Err(CudaError::Unsupported(
            "kf=ls (least-squares key grids); keys span min..max on CUDA".into(),
        ));
    }
    if config.value_fit != crate::cache::Fit::MinMax {
        return Err(CudaError::Unsupported(
            "vf=ls (least-squares value grids); values span min..max on CUDA".into(),
        ));
    }
    if config.values_per_channel(head_dim as u32) {
        return Err(CudaError::Unsupported(
            "per-channel values (va=c); values are per token on CUDA".into(),
        ));
    }
    if let Some(l) =
        (0..n_layer as u32).find(|&l| config.bits_for(l) != (config.key_bits, config.value_bits))
    {
        return Err(CudaError::Unsupported(format!(
            "per-layer bits (layer {l}: {:?}); one key and one value width for all layers on CUDA",
            config.bits_for(l)
        )));
    }
    Ok(())
}

/// Per-flush scratch shared by all layers (flushes run one after another on one stream).
pub(crate) struct FlushScratch {
    pub kv: Guarded<f32>,
    pub cand: Guarded<f32>,
    pub score: Guarded<f32>,
    pub rank: Guarded<u32>,
    pub sel: Guarded<u32>,
    pub pool_slots: Guarded<u32>,
    pub pool_kv: Guarded<u16>,
}

/// The OTT cache of one sequence on a CUDA device.
pub struct CudaOttCache {
    dev: Arc<Device>,
    config: CacheConfig,
    shape: CacheShape,
    geo: Geometry,
    rot: usize,
    sink_cap: usize,
    layers: Vec<(LayerBufs, LayerState)>,
    flush: FlushScratch,
}

impl std::fmt::Debug for CudaOttCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaOttCache")
            .field("config", &self.config.to_string())
            .field("shape", &self.shape)
            .field("len", &self.len())
            .finish()
    }
}

impl CudaOttCache {
    /// Allocates every layer for `shape.max_tokens` tokens.
    pub fn new(
        dev: Arc<Device>,
        config: CacheConfig,
        shape: CacheShape,
    ) -> Result<Self, CudaError> {
        expected_memory(&config, &shape, 0)?; // the CPU cache's checks of config and shape
        unsupported(&config, shape.n_layer, shape.head_dim)?;
        ott_attend::check_head_dim(shape.head_dim)?;
        let hd = shape.head_dim;
        let geo = Geometry {
            head_dim: hd as u32,
            key_group: config.group,
            value_group: config.value_group_for(hd as u32),
            key_bits: config.key_bits,
            value_bits: config.value_bits,
        };
        let (g, r) = (config.group as usize, config.residual as usize);
        let max_groups = shape.max_tokens.saturating_sub(r) / g;
        let win_cap = (r + g).min(shape.max_tokens);
        let sink_cap = (config.sink as usize).min(shape.max_tokens);
        let nkv = shape.n_head_kv;
        let cap32 = |x: usize| -> Result<u32, CudaError> {
            u32::try_from(x.max(1)).map_err(|_| CudaError::Shape(format!("{x} rows above u32")))
        };
        let mut layers = Vec::with_capacity(shape.n_layer);
        let mut pmax = 1usize;
        for layer in 0..shape.n_layer {
            let (p, e) = config.pools_for(layer as u32);
            pmax = pmax.max(p as usize);
            let dims = sys::ottkv_cache_dims {
                geo: sys::ottkv_geometry {
                    head_dim: geo.head_dim,
                    key_group: geo.key_group,
                    value_group: geo.value_group,
                    key_bits: geo.key_bits,
                    value_bits: geo.value_bits,
                },
                n_head_kv: nkv as u32,
                key_words: words_for(geo.key_group, geo.key_bits),
                value_words: geo.value_row_words(),
                mask_words: geo.key_group.div_ceil(32),
                max_groups: cap32(max_groups)?,
                win_cap: cap32(win_cap)?,
                sink_cap: cap32(sink_cap)?,
                pool_cap: cap32(p as usize)?,
                extra_cap: cap32(e as usize)?,
            };
            let bufs = LayerBufs::new(&dev, dims, 1)?;
            let st = LayerState {
                pool_cap: p,
                extra_cap: e,
                ..Default::default()
            };
            layers.push((bufs, st));
        }
        let flush = FlushScratch {
            kv: Guarded::new(&dev, "flush group", nkv * 2 * g * hd)?,
            cand: Guarded::new(&dev, "flush candidates", nkv * (pmax + g) * hd)?,
            score: Guarded::new(&dev, "flush scores", nkv * (pmax + g))?,
            rank: Guarded::new(&dev, "flush ranks", nkv * (pmax + g))?,
            sel: Guarded::new(&dev, "flush selection", nkv * g)?,
            pool_slots: Guarded::new(&dev, "flush pool staging", nkv * pmax * 2)?,
            pool_kv: Guarded::new(&dev, "flush pool rows", nkv * 2 * pmax * hd)?,
        };
        Ok(Self {
            rot: config.rotation_block(hd as u32) as usize,
            dev,
            config,
            shape,
            geo,
            sink_cap,
            layers,
            flush,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }
    pub fn shape(&self) -> &CacheShape {
        &self.shape
    }
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }
    /// Tokens in layer 0.
    pub fn len(&self) -> usize {
        self.layers[0].1.len
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device bytes allocated, by segment (quantized storage for `max_tokens`).
    pub fn memory(&self) -> MemoryStats {
        let mut m = self
            .layers
            .iter()
            .map(|(b, _)| b.memory())
            .fold(MemoryStats::default(), |a, b| a + b);
        let f = &self.flush;
        let scratch = f.kv.bytes()
            + f.cand.bytes()
            + f.score.bytes()
            + f.rank.bytes()
            + f.sel.bytes()
            + f.pool_slots.bytes()
            + f.pool_kv.bytes();
        m = m + MemoryStats::new(0, 0, 0, 0, scratch);
        m
    }

    fn layer(&self, layer: usize) -> Result<&(LayerBufs, LayerState), CudaError> {
        self.layers.get(layer).ok_or(
            CacheError::Layer {
                layer,
                n_layer: self.shape.n_layer,
            }
            .into(),
        )
    }

    /// Rows as the device stores them (rotated when rotation is on), after the CPU cache's
    /// checks: lengths, token budget, finite in f16.
    fn check_kv(
        &self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), CudaError> {
        let (_, st) = self.layer(layer)?;
        let (k, v) = crate::cache::checked_kv(
            &self.shape,
            self.rot,
            self.config.rotate,
            layer,
            st.len,
            k,
            v,
            n,
        )?;
        Ok((k.into_owned(), v.into_owned()))
    }

    /// Appends `n` tokens (`k`, `v`: `[n][n_head_kv][head_dim]`, post-RoPE), flushing on the
    /// device as they come. Nothing changes when it returns a shape or value error.
    pub fn append(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        n: usize,
    ) -> Result<(), CudaError> {
        let (k, v) = self.check_kv(layer, k, v, n)?;
        self.append_checked(layer, &k, &v, n)
    }

    fn append_checked(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        n: usize,
    ) -> Result<(), CudaError> {
        let (nkv, hd) = (self.shape.n_head_kv, self.shape.head_dim);
        let trigger = self.config.residual as usize + self.config.group as usize;
        let mut t = 0;
        while t < n {
            let (bufs, st) = &mut self.layers[layer];
            let cap = bufs.dims.win_cap as usize;
            // Tokens up to the next flush (or the window's end when no flush can come).
            let room = trigger.min(cap) - st.win_len;
            let m = room.min(n - t);
            for h in 0..nkv {
                let mut rk = Vec::with_capacity(m * hd);
                let mut rv = Vec::with_capacity(m * hd);
                for j in t..t + m {
                    let o = (j * nkv + h) * hd;
                    rk.extend(k[o..o + hd].iter().map(|&x| f16::from_f32(x).to_bits()));
                    rv.extend(v[o..o + hd].iter().map(|&x| f16::from_f32(x).to_bits()));
                }
                // ring slots of the new tokens, in at most two runs
                let first = (st.win_start + st.win_len) % cap;
                let run1 = m.min(cap - first);
                let base = h * cap * hd;
                bufs.win_k
                    .upload(&self.dev, base + first * hd, &rk[..run1 * hd])?;
                bufs.win_v
                    .upload(&self.dev, base + first * hd, &rv[..run1 * hd])?;
                if run1 < m {
                    bufs.win_k.upload(&self.dev, base, &rk[run1 * hd..])?;
                    bufs.win_v.upload(&self.dev, base, &rv[run1 * hd..])?;
                }
            }
            st.win_len += m;
            st.len += m;
            t += m;
            if st.win_len == trigger {
                self.flush(layer)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, layer: usize) -> Result<(), CudaError> {
        let g = self.config.group as usize;
        let (bufs, st) = &mut self.layers[layer];
        let n_sink = self.sink_cap.saturating_sub(st.n_groups * g).min(g);
        ott_flush::run(
            &self.dev,
            bufs,
            st,
            &self.flush,
            n_sink,
            &self.config,
            self.rot,
        )?;
        st.n_groups += 1;
        st.win_start = (st.win_start + g) % bufs.dims.win_cap as usize;
        st.win_len -= g;
        st.sink_len += n_sink;
        Ok(())
    }

    /// The same split as [`crate::cache::OttCache::plan_subbatches`].
    pub fn plan_subbatches(&self, layer: usize, n: usize) -> Result<Vec<Range<usize>>, CudaError> {
        let (_, st) = self.layer(layer)?;
        let trigger = self.config.residual as usize + self.config.group as usize;
        let mut wl = st.win_len;
        let (mut out, mut start) = (Vec::new(), 0);
        for j in 0..n {
            wl += 1;
            if wl == trigger {
                if j > start {
                    out.push(start..j);
                    start = j;
                }
                wl = self.config.residual as usize;
            }
        }
        if n > start {
            out.push(start..n);
        }
        Ok(out)
    }

    /// Attention of the last `n` appended tokens of `layer` for the (token, head) rows `rows`
    /// of `q: [n][n_head][head_dim]`, into `out: [rows.len()][head_dim]`; the semantics of
    /// [`crate::cache::OttCache::attend`]. All rows of the batch are computed on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        n: usize,
        n_head: usize,
        scale: f32,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        let (bufs, st) = self.layer(layer)?;
        let (nkv, hd) = (self.shape.n_head_kv, self.shape.head_dim);
        if n_head == 0 || n_head % nkv != 0 {
            return Err(CacheError::Heads {
                n_head,
                n_head_kv: nkv,
            }
            .into());
        }
        let total = n * n_head;
        if q.len() != total * hd {
            return Err(CacheError::Length {
                what: "q [n][n_head][head_dim]",
                expected: total * hd,
                got: q.len(),
            }
            .into());
        }
        if rows.start > rows.end || rows.end > total {
            return Err(CacheError::Rows {
                start: rows.start,
                end: rows.end,
                rows: total,
            }
            .into());
        }
        if out.len() != rows.len() * hd {
            return Err(CacheError::Length {
                what: "out [rows][head_dim]",
                expected: rows.len() * hd,
                got: out.len(),
            }
            .into());
        }
        // As OttCache::check_attend: every query sees all quantized slots (only the batch's
        // first token may already sit in a group, with R = 0); n also bounds the grid.
        let nq = st.n_groups * self.geo.key_group as usize;
        if n == 0 || n > st.len || nq > st.len - n + 1 || n > 65535 {
            return Err(CacheError::SubBatch {
                n,
                window: st.win_len,
            }
            .into());
        }
        let mut qs = q.to_vec(); // [n][n_head][head_dim], in stored space
        if self.rot > 0 {
            hadamard_blocks(&mut qs, self.rot);
        }
        let dev = &*self.dev;
        let max_vis = st.n_groups * self.geo.key_group as usize
            + st.sink_len
            + st.pool_cap as usize
            + st.extra_cap as usize
            + st.win_len;
        let plan = ott_attend::plan_splits(dev, max_vis, ott_attend::row_blocks(n_head, nkv) * n);
        let mut qd = Guarded::<f32>::new(dev, "queries", qs.len())?;
        qd.upload(dev, 0, &qs)?;
        let scratch = SplitScratch::new(dev, total, plan, hd)?;
        let args = sys::ottkv_attend_args {
            c: bufs.ptrs(dev),
            d: bufs.dims,
            q: qd.addr(dev),
            part_o: scratch.part_o.addr(dev),
            part_ml: scratch.part_ml.addr(dev),
            out: scratch.out.addr(dev),
            n_seq: 1,
            n_q: n as u32,
            n_head: n_head as u32,
            n_groups: st.n_groups as u32,
            sink_len: st.sink_len as u32,
            win_start: st.win_start as u32,
            win_len: st.win_len as u32,
            n_split: plan.n_split,
            split_len: plan.split_len,
            scale,
        };
        // SAFETY: the layer buffers were allocated from `bufs.dims` for one sequence; q and
        // the scratch were just allocated for n tokens x n_head rows and this plan.
        unsafe { ott_attend::ott_attend(dev, &args)? };
        ott_attend::merge(dev, &scratch, total, plan, hd)?;
        let got = scratch.out.download(dev, rows.start * hd..rows.end * hd)?;
        if dev.checked() {
            qd.check(dev)?;
            scratch.check(dev)?;
        }
        out.copy_from_slice(&got);
        if self.rot > 0 {
            hadamard_blocks(out, self.rot);
        }
        Ok(())
    }

    /// Full layer step, as [`crate::cache::OttCache::forward`]: split at flush points,
    /// append, attend.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        n_head: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<(), CudaError> {
        let (k, v) = self.check_kv(layer, k, v, n)?;
        let nkv = self.shape.n_head_kv;
        if n_head == 0 || n_head % nkv != 0 {
            return Err(CacheError::Heads {
                n_head,
                n_head_kv: nkv,
            }
            .into());
        }
        let hd = self.shape.head_dim;
        let (qrow, kvrow) = (n_head * hd, nkv * hd);
        for (what, got) in [("q [n][n_head][head_dim]", q.len()), ("out", out.len())] {
            if got != n * qrow {
                return Err(CacheError::Length {
                    what,
                    expected: n * qrow,
                    got,
                }
                .into());
            }
        }
        for r in self.plan_subbatches(layer, n)? {
            self.append_checked(
                layer,
                &k[r.start * kvrow..r.end * kvrow],
                &v[r.start * kvrow..r.end * kvrow],
                r.len(),
            )?;
            let m = r.len();
            self.attend(
                layer,
                &q[r.start * qrow..r.end * qrow],
                m,
                n_head,
                scale,
                0..m * n_head,
                &mut out[r.start * qrow..r.end * qrow],
            )?;
        }
        Ok(())
    }

    /// Downloads one (layer, kv-head) in the CPU's representation.
    pub fn head_state(&self, layer: usize, kv_head: usize) -> Result<CudaHeadState, CudaError> {
        let (b, st) = self.layer(layer)?;
        if kv_head >= self.shape.n_head_kv {
            return Err(CudaError::Shape(format!("kv-head {kv_head} out of range")));
        }
        let dev = &*self.dev;
        let d = &b.dims;
        let (h, hd, g) = (kv_head, self.shape.head_dim, self.geo.key_group as usize);
        let mg = d.max_groups as usize;
        let ng = st.n_groups;
        let per = |n_per_group: usize| h * mg * n_per_group..(h * mg + ng) * n_per_group;
        let kw = d.key_words as usize;
        let vw = d.value_words as usize;
        let vnp = hd / self.geo.value_group as usize;
        let one =
            |x: &Guarded<u32>| -> Result<u32, CudaError> { Ok(x.download(dev, h..h + 1)?[0]) };
        let (np, ne) = (one(&b.pool_len)? as usize, one(&b.extra_len)? as usize);
        let stopped = one(&b.stopped_at)?;
        let rows = |x: &Guarded<u16>, cap: u32, n: usize| {
            let base = h * cap as usize * hd;
            x.download(dev, base..base + n * hd)
        };
        let cap = d.win_cap as usize;
        let ring = |x: &Guarded<u16>| -> Result<Vec<u16>, CudaError> {
            let all = x.download(dev, h * cap * hd..(h + 1) * cap * hd)?;
            Ok((0..st.win_len)
                .flat_map(|j| {
                    let s = (st.win_start + j) % cap;
                    all[s * hd..(s + 1) * hd].to_vec()
                })
                .collect())
        };
        let slot_rows = |x: &Guarded<u32>, cap: u32, n: usize| {
            let base = h * cap as usize * 2;
            x.download(dev, base..base + n * 2).map(slots)
        };
        Ok(CudaHeadState {
            n_groups: ng,
            key_codes: b.key_codes.download(dev, per(hd * kw))?,
            key_params: qparams(b.key_params.download(dev, per(hd))?),
            val_codes: b.val_codes.download(dev, per(g * vw))?,
            val_params: qparams(b.val_params.download(dev, per(g * vnp))?),
            masks: b.masks.download(dev, per(d.mask_words as usize))?,
            win_k: ring(&b.win_k)?,
            win_v: ring(&b.win_v)?,
            sink_k: rows(&b.sink_k, d.sink_cap, st.sink_len)?,
            sink_v: rows(&b.sink_v, d.sink_cap, st.sink_len)?,
            pool: slot_rows(&b.pool_slots, d.pool_cap, np)?,
            pool_k: rows(&b.pool_k, d.pool_cap, np)?,
            pool_v: rows(&b.pool_v, d.pool_cap, np)?,
            extra: slot_rows(&b.extra_slots, d.extra_cap, ne)?,
            extra_k: rows(&b.extra_k, d.extra_cap, ne)?,
            extra_v: rows(&b.extra_v, d.extra_cap, ne)?,
            stopped_at: (stopped != NO_GROUP).then_some(stopped),
        })
    }

    /// Fails when any kernel wrote outside a buffer of the cache (guard regions).
    pub fn check_guards(&self) -> Result<(), CudaError> {
        for (b, _) in &self.layers {
            b.check_guards(&self.dev)?;
        }
        let f = &self.flush;
        f.kv.check(&self.dev)?;
        f.cand.check(&self.dev)?;
        f.score.check(&self.dev)?;
        f.rank.check(&self.dev)?;
        f.sel.check(&self.dev)?;
        f.pool_slots.check(&self.dev)?;
        f.pool_kv.check(&self.dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_the_kernels_lack_are_typed_errors() {
        for spec in [
            "ott2:wb=8",
            "ott2:va=c",
            "ott2:k@1=4",
            "ott2:v@0=4",
            "ott3c",
            "ott3:rot=auto",
        ] {
            let c: CacheConfig = spec.parse().unwrap();
            let e = unsupported(&c, 2, 64).unwrap_err();
            assert!(matches!(e, CudaError::Unsupported(_)), "{spec}: {e}");
        }
        // every spec the parity tests use is one the CUDA cache takes
        for spec in [
            "ott2",
            "ott3",
            "ott4",
            "ottk4v2",
            "kivi2",
            "ott2:t=0,rot=1,sink=4,p=6",
            "ott:g=16,r=0,p=3,e=2,t=0,rot=1,sink=20",
        ] {
            let c: CacheConfig = spec.parse().unwrap();
            assert!(unsupported(&c, 3, 64).is_ok(), "{spec}");
        }
    }
}
