//! `OttCache`: all layers and kv-heads, the batch schedule and the engine-facing calls.

use std::borrow::Cow;
use std::ops::Range;

use half::f16;

use super::attn::{attend_block, attend_row_ref, with_scratch, Dequantized};
use super::config::WINDOW_BITS_AUTO;
use super::head::HeadSettings;
use super::memory::physical_memory;
use super::rows::try_vec;
use super::{CacheConfig, CacheError, HeadCache, MemoryStats, Rotation, RowPrecision};
use crate::format::Geometry;
use crate::quant::hadamard_blocks;

/// Shape of the model's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    pub n_layer: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Most tokens any layer may hold; appending past it is an error.
    pub max_tokens: usize,
}

/// Largest head size accepted (keeps hostile shapes from asking for huge scratch buffers).
pub const MAX_HEAD_DIM: usize = 1 << 14;

/// Checks a shape against a config; shared by `OttCache::new` and `expected_memory`.
pub(crate) fn check_shape(config: &CacheConfig, shape: &CacheShape) -> Result<(), CacheError> {
    config.validate()?;
    let bad = |m: String| Err(CacheError::Shape(m));
    if shape.n_layer == 0 || shape.n_head_kv == 0 || shape.head_dim == 0 || shape.max_tokens == 0 {
        return bad(format!("all dimensions must be positive: {shape:?}"));
    }
    if shape.head_dim > MAX_HEAD_DIM {
        return bad(format!("head_dim {} above {MAX_HEAD_DIM}", shape.head_dim));
    }
    // Pool positions are stored as i32 (format::OutlierSlot).
    if shape.max_tokens > i32::MAX as usize {
        return bad(format!("max_tokens {} above i32::MAX", shape.max_tokens));
    }
    let gv = config.value_group_for(shape.head_dim as u32) as usize;
    if !config.values_per_channel(shape.head_dim as u32) && shape.head_dim % gv != 0 {
        return bad(format!(
            "head_dim {} is not a multiple of the value group {gv} (Gv = min(G, head_dim) unless set)",
            shape.head_dim
        ));
    }
    if let Some(o) = config
        .overrides
        .iter()
        .find(|o| o.layer as usize >= shape.n_layer)
    {
        return bad(format!(
            "override for layer {} but n_layer is {}",
            o.layer, shape.n_layer
        ));
    }
    let elems = shape
        .n_layer
        .checked_mul(shape.n_head_kv)
        .and_then(|x| x.checked_mul(shape.head_dim))
        .and_then(|x| x.checked_mul(shape.max_tokens))
        .and_then(|x| x.checked_mul(4));
    if elems.is_none() {
        return bad(format!("{shape:?} overflows usize"));
    }
    Ok(())
}

/// K and V rows `[n][n_head_kv][head_dim]` as the heads take them (rotated or not).
type StoredKv<'a> = (Cow<'a, [f32]>, Cow<'a, [f32]>);

/// Checks `n` new tokens' `k`/`v` (`[n][n_head_kv][head_dim]`) for a layer that holds `len`
/// tokens: lengths, token budget, and values finite in f16 in every form they may be stored
/// in (rotated by blocks of `rot`, 0 = not; a rotation can push a finite row over f16's
/// range). Returns the rows as the heads take them: values rotated when `rot` > 0, keys
/// rotated under `Rotation::On`, plain under `Rotation::Auto` (each head rotates its own once
/// it has decided; both forms are checked here). Shared by every cache implementation so they
/// refuse alike.
#[allow(clippy::too_many_arguments)]
pub(crate) fn checked_kv<'a>(
    shape: &CacheShape,
    rot: usize,
    keys: Rotation,
    layer: usize,
    len: usize,
    k: &'a [f32],
    v: &'a [f32],
    n: usize,
) -> Result<StoredKv<'a>, CacheError> {
    let row = shape.n_head_kv * shape.head_dim;
    let want = n
        .checked_mul(row)
        .ok_or(CacheError::Shape(format!("{n} tokens overflow usize")))?;
    OttCache::check_len("k [n][n_head_kv][head_dim]", want, k.len())?;
    OttCache::check_len("v [n][n_head_kv][head_dim]", want, v.len())?;
    if n > shape.max_tokens - len {
        return Err(CacheError::Overflow {
            layer,
            len,
            n,
            max_tokens: shape.max_tokens,
        });
    }
    let rotated = |x: &[f32]| {
        let mut y = x.to_vec();
        hadamard_blocks(&mut y, rot);
        y
    };
    // Non-finite (or f16-overflowing) tokens are rejected: kept in f16 they would turn every
    // later attention output into NaN anyway, and quantized they would poison their group.
    let finite = |tensor: &'static str, x: &[f32]| match x
        .iter()
        .position(|&a| !f16::from_f32(a).is_finite())
    {
        Some(i) => Err(CacheError::NonFinite {
            layer,
            tensor,
            token: i / row,
            head: i % row / shape.head_dim,
            channel: i % shape.head_dim,
            value: x[i],
        }),
        None => Ok(()),
    };
    let (k, v) = match (rot, keys) {
        (0, _) | (_, Rotation::Off) => (Cow::Borrowed(k), Cow::Borrowed(v)),
        (_, Rotation::On) => (Cow::Owned(rotated(k)), Cow::Owned(rotated(v))),
        (_, Rotation::Auto) => {
            finite("k", &rotated(k))?;
            (Cow::Borrowed(k), Cow::Owned(rotated(v)))
        }
    };
    finite("k", &k)?;
    finite("v", &v)?;
    Ok((k, v))
}

/// Choices a cache made from the data (see [`OttCache::choices`]); (layer, kv head) pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheChoices {
    pub heads: usize,
    pub n_head_kv: u32,
    /// Heads that decided their key rotation (`rot=auto`), and those that rotate.
    pub key_rotation_decided: usize,
    pub keys_rotated: Vec<(u32, u32)>,
    /// Heads that chose their row precision (`wb=auto`), and those that kept f16.
    pub rows_decided: usize,
    pub f16_rows: Vec<(u32, u32)>,
}

impl CacheChoices {
    /// True when the config left nothing to decide.
    pub fn is_empty(&self) -> bool {
        self.key_rotation_decided == 0 && self.rows_decided == 0
    }
}

impl std::fmt::Display for CacheChoices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names the smaller side: "keys rotated in 88/90 heads, not in [2.0 19.0]".
        let part = |what: &str, yes: &[(u32, u32)], decided: usize| {
            let names = |v: &[(u32, u32)]| {
                v.iter()
                    .map(|(l, h)| format!("{l}.{h}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let n_layer_heads = self.heads;
            let all: Vec<(u32, u32)> = (0..n_layer_heads as u32)
                .map(|i| (i / self.n_head_kv, i % self.n_head_kv))
                .filter(|at| !yes.contains(at))
                .collect();
            if yes.len() * 2 > decided && decided == n_layer_heads {
                format!(
                    "{what} in {}/{decided} heads, not in [{}]",
                    yes.len(),
                    names(&all)
                )
            } else {
                format!("{what} in {}/{decided} heads [{}]", yes.len(), names(yes))
            }
        };
        let mut parts = Vec::new();
        if self.key_rotation_decided > 0 {
            parts.push(part(
                "keys rotated",
                &self.keys_rotated,
                self.key_rotation_decided,
            ));
        }
        if self.rows_decided > 0 {
            parts.push(part("f16 rows", &self.f16_rows, self.rows_decided));
        }
        if parts.is_empty() {
            return write!(f, "nothing decided yet");
        }
        write!(f, "{} (layer.head)", parts.join("; "))
    }
}

/// Bytes a new cache allocates before its first token, at most: per head the window, pools,
/// sinks and the head itself; the flush scratch; the per-layer lengths. `None` when that
/// overflows usize.
fn creation_bytes(config: &CacheConfig, shape: &CacheShape) -> Option<usize> {
    let hd = shape.head_dim;
    let row = config.initial_row_precision(hd).row_bytes(hd);
    let window = (config.residual as usize + config.group as usize).min(shape.max_tokens);
    // Pools vary per layer with the overrides: the largest bounds them all.
    let pool = config
        .overrides
        .iter()
        .filter_map(|o| o.pool)
        .chain([config.pool])
        .max()
        .unwrap_or(0) as usize;
    let extra = config
        .overrides
        .iter()
        .filter_map(|o| o.extra)
        .chain([config.extra])
        .max()
        .unwrap_or(0) as usize;
    let sink = (config.sink as usize).min(shape.max_tokens);
    let rows = window
        .checked_add(pool)?
        .checked_add(extra)?
        .checked_add(sink)?;
    let per_head = rows
        .checked_mul(2 * row)?
        .checked_add((pool + extra) * std::mem::size_of::<crate::format::OutlierSlot>())?
        .checked_add(std::mem::size_of::<HeadCache>())?;
    let scratch = 2 * config.group as usize * hd * std::mem::size_of::<f32>();
    shape
        .n_layer
        .checked_mul(shape.n_head_kv)?
        .checked_mul(per_head)?
        .checked_add(scratch)?
        .checked_add(shape.n_layer.checked_mul(std::mem::size_of::<usize>())?)
}

/// The OTT KV cache of one sequence.
#[derive(Clone, Debug)]
pub struct OttCache {
    config: CacheConfig,
    shape: CacheShape,
    geo: Geometry,
    heads: Vec<HeadCache>, // [n_layer][n_head_kv]
    lens: Vec<usize>,      // [n_layer]
    /// A flush's working copy of its group: `[2][G][head_dim]` (keys, then values).
    scratch: Vec<f32>,
}

impl OttCache {
    /// Builds an empty cache; window and pools are allocated now, quantized storage grows by
    /// exactly one group per flush, so `memory()` always reports what is really held. What
    /// is allocated now is checked against the machine's memory first and reserved
    /// fallibly: a shape that cannot be held is [`CacheError::Alloc`], not an abort.
    pub fn new(config: CacheConfig, shape: CacheShape) -> Result<Self, CacheError> {
        check_shape(&config, &shape)?;
        let bytes = creation_bytes(&config, &shape).ok_or_else(|| CacheError::Alloc {
            what: "the cache",
            detail: format!("the window and pools of {shape:?} overflow usize"),
        })?;
        if let Some(ram) = physical_memory().filter(|&ram| bytes > ram) {
            return Err(CacheError::Alloc {
                what: "the cache",
                detail: format!(
                    "its window and pools take {bytes} bytes before the first token, more \
                     than this machine's {ram} bytes of memory"
                ),
            });
        }
        let geo_of = |(key_bits, value_bits)| Geometry {
            head_dim: shape.head_dim as u32,
            key_group: config.group,
            value_group: config.value_group_for(shape.head_dim as u32),
            key_bits,
            value_bits,
        };
        let geo = geo_of((config.key_bits, config.value_bits));
        let window_cap = (config.residual as usize + config.group as usize).min(shape.max_tokens);
        let mut heads = try_vec(shape.n_layer * shape.n_head_kv, "the per-head state")?;
        let mut lens = try_vec(shape.n_layer, "the per-layer lengths")?;
        lens.resize(shape.n_layer, 0);
        let mut scratch = try_vec(
            2 * config.group as usize * shape.head_dim,
            "the flush scratch",
        )?;
        scratch.resize(2 * config.group as usize * shape.head_dim, 0.0);
        for layer in 0..shape.n_layer {
            let (p, e) = config.pools_for(layer as u32);
            let st = HeadSettings {
                residual: config.residual as usize,
                pool_cap: p as usize,
                extra_cap: e as usize,
                score: config.score,
                window_cap,
                rot: config.rotation_block(shape.head_dim as u32) as usize,
                key_rotation: config.rotate,
                sink_cap: (config.sink as usize).min(shape.max_tokens),
                rows: (config.window_bits != WINDOW_BITS_AUTO)
                    .then(|| RowPrecision::new(config.window_bits, shape.head_dim)),
                value_per_channel: config.values_per_channel(shape.head_dim as u32),
                value_params8: config.value_param_bits == 8,
                value_fit: config.value_fit,
                key_fit: config.key_fit,
            };
            for _ in 0..shape.n_head_kv {
                heads.push(HeadCache::try_new(
                    geo_of(config.bits_for(layer as u32)),
                    st,
                )?);
            }
        }
        Ok(Self {
            lens,
            config,
            shape,
            geo,
            heads,
            scratch,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }
    pub fn shape(&self) -> &CacheShape {
        &self.shape
    }
    /// Layout of one (layer, kv-head)'s quantized storage, without per-layer bit overrides
    /// (see [`Self::layer_geometry`]).
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    /// Layout of the quantized storage of `layer`'s heads (per-layer bits applied).
    pub fn layer_geometry(&self, layer: usize) -> Result<Geometry, CacheError> {
        Ok(self.head(layer, 0)?.geo)
    }
    /// Tokens in layer 0 (after a full forward pass, every layer holds the same number).
    pub fn len(&self) -> usize {
        self.lens[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Tokens in one layer.
    pub fn layer_len(&self, layer: usize) -> Result<usize, CacheError> {
        self.check_layer(layer)?;
        Ok(self.lens[layer])
    }
    /// Drops all tokens and the quantized storage (window and pools stay allocated).
    /// Forgets every token and every choice the cache made from them. In place, except that
    /// heads whose rows it chose to keep as q8_0 get their f16 rows back (the memory they
    /// started with), which is the one way this can fail.
    pub fn reset(&mut self) -> Result<(), CacheError> {
        self.lens.iter_mut().for_each(|l| *l = 0);
        self.heads.iter_mut().try_for_each(HeadCache::reset)
    }
    /// Bytes actually allocated, by segment, over all layers and heads.
    pub fn memory(&self) -> MemoryStats {
        self.heads
            .iter()
            .map(HeadCache::memory)
            .fold(MemoryStats::default(), |a, b| a + b)
    }
    /// State of one (layer, kv-head), for inspection.
    pub fn head(&self, layer: usize, kv_head: usize) -> Result<&HeadCache, CacheError> {
        self.check_layer(layer)?;
        if kv_head >= self.shape.n_head_kv {
            return Err(CacheError::Shape(format!(
                "kv-head {kv_head} >= n_head_kv {}",
                self.shape.n_head_kv
            )));
        }
        Ok(&self.heads[layer * self.shape.n_head_kv + kv_head])
    }

    fn check_layer(&self, layer: usize) -> Result<(), CacheError> {
        if layer < self.shape.n_layer {
            Ok(())
        } else {
            Err(CacheError::Layer {
                layer,
                n_layer: self.shape.n_layer,
            })
        }
    }

    fn layer_heads(&self, layer: usize) -> &[HeadCache] {
        let n = self.shape.n_head_kv;
        &self.heads[layer * n..(layer + 1) * n]
    }

    /// Splits `n` new tokens of `layer` at flush points: each range after the first starts at
    /// a token whose append triggers a flush. Appending a range, then attending it causally,
    /// gives each query the cache state it would have seen when decoded alone. More tokens
    /// than the layer has room for are [`CacheError::Overflow`], as appending them would be.
    pub fn plan_subbatches(&self, layer: usize, n: usize) -> Result<Vec<Range<usize>>, CacheError> {
        let starts = self.subbatch_starts(layer, n)?;
        let mut out = Vec::with_capacity(starts.len());
        let mut it = starts.peekable();
        while let Some(s) = it.next() {
            out.push(s..it.peek().copied().unwrap_or(n));
        }
        Ok(out)
    }

    /// The first token of each range [`Self::plan_subbatches`] would return, computed in
    /// closed form (the count is known before anything is allocated for it).
    pub fn subbatch_starts(&self, layer: usize, n: usize) -> Result<SubbatchStarts, CacheError> {
        self.check_layer(layer)?;
        let len = self.lens[layer];
        if n > self.shape.max_tokens - len {
            return Err(CacheError::Overflow {
                layer,
                len,
                n,
                max_tokens: self.shape.max_tokens,
            });
        }
        let g = self.config.group as usize;
        let trigger = self.config.residual as usize + g;
        // The token whose append makes the window reach R + G, then every G tokens.
        let j0 = trigger - 1 - self.layer_heads(layer)[0].window_len();
        let first = if j0 == 0 { g } else { j0 };
        let count = match n {
            0 => 0,
            _ if first < n => 2 + (n - 1 - first) / g,
            _ => 1,
        };
        Ok(SubbatchStarts {
            next: 0,
            first,
            step: g,
            left: count,
        })
    }

    fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), CacheError> {
        if expected == got {
            Ok(())
        } else {
            Err(CacheError::Length {
                what,
                expected,
                got,
            })
        }
    }

    /// What the cache decided per (layer, kv head) where its config leaves it to the data
    /// (`rot=auto`, `wb=auto`): made at each head's first flush, fixed afterwards.
    pub fn choices(&self) -> CacheChoices {
        let nkv = self.shape.n_head_kv;
        let mut c = CacheChoices {
            heads: self.heads.len(),
            n_head_kv: nkv as u32,
            ..Default::default()
        };
        for (i, h) in self.heads.iter().enumerate() {
            let at = ((i / nkv) as u32, (i % nkv) as u32);
            if h.auto_key_rotation {
                c.key_rotation_decided += usize::from(!h.key_rotation_pending());
                if h.keys_rotated() {
                    c.keys_rotated.push(at);
                }
            }
            if self.config.window_bits == WINDOW_BITS_AUTO {
                c.rows_decided += usize::from(!h.row_precision_pending());
                if !h.row_precision_pending() && h.row_precision() == RowPrecision::F16 {
                    c.f16_rows.push(at);
                }
            }
        }
        c
    }

    /// The closed form of [`Self::memory`] at `n_tokens` tokens in every layer, with the row
    /// precision each head has chosen (f16 where it has not chosen yet).
    pub fn expected_memory_at(&self, n_tokens: usize) -> Result<MemoryStats, CacheError> {
        let shape = CacheShape {
            max_tokens: self.shape.max_tokens.max(n_tokens),
            ..self.shape
        };
        check_shape(&self.config, &shape)?;
        let nkv = self.shape.n_head_kv;
        Ok(self
            .heads
            .iter()
            .enumerate()
            .map(|(i, h)| {
                super::memory::expected_head_memory(
                    &self.config,
                    &shape,
                    i / nkv,
                    h.row_precision(),
                    n_tokens,
                )
            })
            .fold(MemoryStats::default(), |a, b| a + b))
    }

    /// Hadamard block of stored rows (0 = none).
    fn rot(&self) -> usize {
        self.config.rotation_block(self.shape.head_dim as u32) as usize
    }

    /// Checks `k`/`v` (`[n][n_head_kv][head_dim]`) and the token budget before anything
    /// changes; returns them as they will be stored (rotated or not).
    fn check_kv<'a>(
        &self,
        layer: usize,
        k: &'a [f32],
        v: &'a [f32],
        n: usize,
    ) -> Result<StoredKv<'a>, CacheError> {
        self.check_layer(layer)?;
        checked_kv(
            &self.shape,
            self.rot(),
            self.config.rotate,
            layer,
            self.lens[layer],
            k,
            v,
            n,
        )
    }

    /// Appends `n` tokens to `layer` (`k`, `v`: `[n][n_head_kv][head_dim]`, post-RoPE),
    /// flushing as they come. Nothing changes when it returns an error.
    pub fn append(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        n: usize,
    ) -> Result<(), CacheError> {
        let (k, v) = self.check_kv(layer, k, v, n)?;
        self.reserve(layer, n)?;
        self.append_checked(layer, &k, &v, n)
    }

    /// Reserves the quantized storage `n` more tokens of `layer` will need, so that appending
    /// them cannot fail halfway for want of memory.
    fn reserve(&mut self, layer: usize, n: usize) -> Result<(), CacheError> {
        let nkv = self.shape.n_head_kv;
        for head in &mut self.heads[layer * nkv..(layer + 1) * nkv] {
            let f = head.flushes_for(n);
            head.reserve_flushes(f)?;
        }
        Ok(())
    }

    /// Appends rows already in stored form (see [`Self::check_kv`]) for which
    /// [`Self::reserve`] made room.
    fn append_checked(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        n: usize,
    ) -> Result<(), CacheError> {
        let (nkv, hd) = (self.shape.n_head_kv, self.shape.head_dim);
        let heads = &mut self.heads[layer * nkv..(layer + 1) * nkv];
        for t in 0..n {
            for (h, head) in heads.iter_mut().enumerate() {
                let o = (t * nkv + h) * hd;
                head.push(&k[o..o + hd], &v[o..o + hd], &mut self.scratch)?;
            }
        }
        self.lens[layer] += n;
        Ok(())
    }

    /// Checks an attend call; returns (rows in this batch, kv-head group size).
    fn check_attend(
        &self,
        layer: usize,
        q: &[f32],
        n: usize,
        n_head: usize,
        rows: &Range<usize>,
        out: &[f32],
    ) -> Result<usize, CacheError> {
        self.check_layer(layer)?;
        let nkv = self.shape.n_head_kv;
        if n_head == 0 || n_head % nkv != 0 {
            return Err(CacheError::Heads {
                n_head,
                n_head_kv: nkv,
            });
        }
        let hd = self.shape.head_dim;
        let total = n.checked_mul(n_head).ok_or(CacheError::Shape(format!(
            "{n} x {n_head} rows overflow usize"
        )))?;
        Self::check_len("q [n][n_head][head_dim]", total * hd, q.len())?;
        if rows.start > rows.end || rows.end > total {
            return Err(CacheError::Rows {
                start: rows.start,
                end: rows.end,
                rows: total,
            });
        }
        Self::check_len("out [rows][head_dim]", rows.len() * hd, out.len())?;
        let len = self.lens[layer];
        if n > len {
            return Err(CacheError::SubBatch { n, window: len });
        }
        // Every query of the sub-batch must see all quantized slots: only its first token may
        // have been flushed into a group (with R = 0).
        let nq = self.layer_heads(layer)[0].quantized_len();
        if nq > len - n + 1 {
            return Err(CacheError::SubBatch {
                n,
                window: self.layer_heads(layer)[0].window_len(),
            });
        }
        Ok(n_head / nkv)
    }

    /// Attention of the last `n` appended tokens of `layer` (the current sub-batch, appended
    /// by [`Self::append`]) for the flattened (token, head) rows `rows` of
    /// `q: [n][n_head][head_dim]`; writes `out: [rows.len()][head_dim]`. Query token i sees the
    /// cache up to and including its own position. Disjoint row ranges may run on different
    /// threads (`&self`); this is the fast path.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        layer: usize,
        q: &[f32],
        n: usize,
        n_head: usize,
        scale: f32,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        let rep = self.check_attend(layer, q, n, n_head, &rows, out)?;
        self.record_probes(layer, q, n, n_head, scale, &rows);
        let hd = self.shape.head_dim;
        let len = self.lens[layer];
        let heads = self.layer_heads(layer);
        // Rotated cache: q·k = (Hq)·(Hk), and Σ p·(Hv) = H·(Σ p·v), so the rows of this call
        // are rotated once here (used by the heads whose keys are rotated) and the outputs
        // rotated back once below.
        let rot = self.rot();
        let q_plain = &q[rows.start * hd..rows.end * hd]; // [rows][head_dim]
        let q_rot: Vec<f32> = if heads.iter().any(HeadCache::keys_rotated) {
            let mut qr = q_plain.to_vec();
            hadamard_blocks(&mut qr, rot);
            qr
        } else {
            Vec::new()
        };
        let out_all = &mut *out;
        with_scratch(|s1, s| {
            // Blocks of consecutive rows with the same token and kv head: their query heads
            // share every unpacked code word (GQA).
            let (mut r, mut out) = (rows.start, &mut *out_all);
            while r < rows.end {
                let (i, h) = (r / n_head, r % n_head);
                let end = (i * n_head + (h / rep + 1) * rep).min(rows.end);
                let (o, rest) = out.split_at_mut((end - r) * hd);
                let head = &heads[h / rep];
                let n_window = len - n + i + 1 - head.quantized_len();
                let q_rows = if head.keys_rotated() {
                    &q_rot[..]
                } else {
                    q_plain
                };
                let qb = &q_rows[(r - rows.start) * hd..(end - rows.start) * hd];
                attend_block(head, qb, scale, n_window, s1, s, o);
                (r, out) = (end, rest);
            }
        });
        if rot > 0 {
            hadamard_blocks(out_all, rot);
        }
        Ok(())
    }

    /// Hands the queries of `rows` to the heads still deciding their key rotation, for the
    /// positions attended before their first flush (checked by `check_attend`).
    fn record_probes(
        &self,
        layer: usize,
        q: &[f32],
        n: usize,
        n_head: usize,
        scale: f32,
        rows: &Range<usize>,
    ) {
        let heads = self.layer_heads(layer);
        if !heads.iter().any(HeadCache::key_rotation_pending) {
            return;
        }
        let (hd, rep) = (self.shape.head_dim, n_head / self.shape.n_head_kv);
        let first = self.lens[layer] - n;
        for r in rows.clone() {
            let (pos, h) = (first + r / n_head, r % n_head);
            let head = &heads[h / rep];
            if head.key_rotation_pending() && pos < head.probe_positions() {
                let positions = head.probe_positions();
                head.probe.record(
                    pos,
                    h % rep,
                    rep,
                    positions,
                    &q[r * hd..(r + 1) * hd],
                    scale,
                );
            }
        }
    }

    /// Scalar reference of [`Self::attend`]: dequantizes and computes plainly.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_ref(
        &self,
        layer: usize,
        q: &[f32],
        n: usize,
        n_head: usize,
        scale: f32,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        let rep = self.check_attend(layer, q, n, n_head, &rows, out)?;
        self.record_probes(layer, q, n, n_head, scale, &rows);
        let hd = self.shape.head_dim;
        let len = self.lens[layer];
        let heads = self.layer_heads(layer);
        let mut deq: Vec<Option<Dequantized>> = (0..heads.len()).map(|_| None).collect();
        for (r, o) in rows.zip(out.chunks_mut(hd)) {
            let (i, h) = (r / n_head, r % n_head);
            let kv = h / rep;
            let head = &heads[kv];
            let d = deq[kv].get_or_insert_with(|| Dequantized::of(head));
            let n_window = len - n + i + 1 - head.quantized_len();
            attend_row_ref(head, d, &q[r * hd..(r + 1) * hd], scale, n_window, o);
        }
        Ok(())
    }

    /// Attention over the sub-batch rows, split into `threads` contiguous row ranges.
    #[allow(clippy::too_many_arguments)]
    fn attend_threads(
        &self,
        layer: usize,
        q: &[f32],
        n: usize,
        n_head: usize,
        scale: f32,
        out: &mut [f32],
        threads: usize,
    ) -> Result<(), CacheError> {
        let rows = n * n_head;
        // More threads than cores only adds spawning (and a huge count could fail to spawn).
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let threads = threads.clamp(1, rows.max(1)).min(cores);
        if threads == 1 {
            return self.attend(layer, q, n, n_head, scale, 0..rows, out);
        }
        let per = rows.div_ceil(threads);
        let hd = self.shape.head_dim;
        std::thread::scope(|sc| {
            let handles: Vec<_> = out
                .chunks_mut(per * hd)
                .enumerate()
                .map(|(c, o)| {
                    let r0 = c * per;
                    let r1 = r0 + o.len() / hd;
                    sc.spawn(move || self.attend(layer, q, n, n_head, scale, r0..r1, o))
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
    }

    /// Full layer step for `n` new tokens: `q: [n][n_head][head_dim]`,
    /// `k`, `v: [n][n_head_kv][head_dim]` (f32, post-RoPE), `out: [n][n_head][head_dim]`.
    /// Equivalent (to float rounding; in practice bit-identical) to n single-token calls.
    /// Everything is checked before the cache changes.
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
        threads: usize,
    ) -> Result<(), CacheError> {
        self.forward_impl(layer, q, k, v, n, n_head, scale, out, Some(threads))
    }

    /// [`Self::forward`] with the scalar reference attention, single-threaded.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_ref(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        n_head: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        self.forward_impl(layer, q, k, v, n, n_head, scale, out, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_impl(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        n_head: usize,
        scale: f32,
        out: &mut [f32],
        threads: Option<usize>,
    ) -> Result<(), CacheError> {
        let (k, v) = self.check_kv(layer, k, v, n)?;
        let nkv = self.shape.n_head_kv;
        if n_head == 0 || n_head % nkv != 0 {
            return Err(CacheError::Heads {
                n_head,
                n_head_kv: nkv,
            });
        }
        let hd = self.shape.head_dim;
        let qrow = n_head * hd;
        Self::check_len("q [n][n_head][head_dim]", n * qrow, q.len())?;
        Self::check_len("out [n][n_head][head_dim]", n * qrow, out.len())?;
        let kvrow = nkv * hd;
        let plan = self.plan_subbatches(layer, n)?;
        self.reserve(layer, n)?;
        for r in plan {
            self.append_checked(
                layer,
                &k[r.start * kvrow..r.end * kvrow],
                &v[r.start * kvrow..r.end * kvrow],
                r.len(),
            )?;
            let (qs, os) = (
                &q[r.start * qrow..r.end * qrow],
                &mut out[r.start * qrow..r.end * qrow],
            );
            let m = r.len();
            match threads {
                Some(t) => self.attend_threads(layer, qs, m, n_head, scale, os, t)?,
                None => self.attend_ref(layer, qs, m, n_head, scale, 0..m * n_head, os)?,
            }
        }
        Ok(())
    }
}

/// The first token of each sub-batch of a plan (see [`OttCache::subbatch_starts`]): 0, then
/// `first`, `first + step`, ... below the batch size.
#[derive(Clone, Debug)]
pub struct SubbatchStarts {
    next: usize,
    first: usize,
    step: usize,
    left: usize,
}

impl Iterator for SubbatchStarts {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let s = self.next;
        self.next = if s == 0 { self.first } else { s + self.step };
        Some(s)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for SubbatchStarts {}
