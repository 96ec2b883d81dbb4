//! Storage and outlier tracing of one (layer, kv-head) (OTT.md §2–§4).

use super::config::DOMINANT_BELOW;
use super::probe::{attention_error, Queries, QueryProbe};
use super::rows::{try_vec, RowPrecision, Rows};
use super::{CacheError, Fit, MemoryStats, Rotation, Score};
use crate::format::{words_for, Geometry, OutlierSlot, QParams};
use crate::quant::{
    decode_params8, dequantize_key_group, dequantize_value_row, encode_params8, finite_range,
    hadamard_blocks, least_squares_range, quantize_key_group, quantize_key_group_with,
    quantize_value_row, quantize_value_row_with, range_params,
};

/// One (layer, kv-head): quantized groups, f16 window, outlier and extra pools, tracing state.
///
/// Token positions are implicit: the quantized groups hold positions `0..n_groups·G` (masked
/// placeholder slots included), the window holds the following `window_len` positions. Pool and
/// extra-pool tokens always come from a quantized group, so their positions are below that.
/// Sink tokens (positions `0..sink_len`) are masked slots of the first groups whose exact copy
/// is in `sink_k`/`sink_v`: a sink is just a pool entry that is never evicted, so the flush
/// schedule and the position layout are the same with or without sinks.
///
/// With rotation on (`rot` > 0) every stored V row (window, pools, sinks, quantized) is `H·x`
/// in blocks of `rot` channels, and so is every stored K row when `keys_rotated`; the public
/// accessors rotate back. With the key rotation left to the head (`Rotation::Auto`), keys are
/// stored plain until the first flush decides (`key_rotation_pending`).
#[derive(Clone, Debug)]
pub struct HeadCache {
    pub(crate) geo: Geometry,
    pub(crate) residual: usize,
    pub(crate) pool_cap: usize,
    pub(crate) extra_cap: usize,
    pub(crate) score: Score,
    /// Hadamard block of the stored rows, 0 = not rotated.
    pub(crate) rot: usize,
    /// Stored keys are rotated (values are whenever `rot` > 0).
    pub(crate) keys_rotated: bool,
    /// Keys come in plain and the head decides their rotation itself (`Rotation::Auto`).
    pub(crate) auto_key_rotation: bool,
    /// The first flush decides `keys_rotated`.
    pub(crate) key_rotation_pending: bool,
    pub(crate) sink_cap: usize,
    pub(crate) rows: RowPrecision,
    /// The head chooses `rows` itself (`wb=auto`).
    pub(crate) auto_rows: bool,
    /// The first flush chooses `rows` (f16 or q8_0); until then rows are f16.
    pub(crate) row_precision_pending: bool,
    /// Values per channel: `val_codes` is `[n_groups][head_dim][value words per channel]`,
    /// `val_params` `[n_groups][head_dim]`; else per token as documented below.
    pub(crate) value_per_channel: bool,
    pub(crate) key_codes: Vec<u32>, // [n_groups][head_dim][key words per channel]
    pub(crate) key_params: Vec<QParams>, // [n_groups][head_dim]
    pub(crate) val_codes: Vec<u32>, // [n_groups·G][value row words]
    pub(crate) val_params: Vec<QParams>, // [n_groups·G][head_dim / value_group]
    /// Value pairs in 8 bits each (`vp=8`): `val_params8` has the layout `val_params` has
    /// otherwise and `val_params` stays empty; `val_super` holds one f16 pair per group and
    /// value-group column (`[n_groups][head_dim / value_group]`, `[n_groups][1]` per channel).
    pub(crate) value_params8: bool,
    pub(crate) val_params8: Vec<[u8; 2]>,
    pub(crate) val_super: Vec<QParams>,
    pub(crate) value_fit: Fit,
    pub(crate) key_fit: Fit,
    pub(crate) masks: Vec<u32>, // [n_groups][mask words]; bit set = placeholder slot
    pub(crate) n_groups: usize,
    pub(crate) win_k: Rows,             // [window_len][head_dim]
    pub(crate) win_v: Rows,             // [window_len][head_dim]
    pub(crate) pool: Vec<OutlierSlot>,  // [pool_len], sorted by (score, position)
    pub(crate) pool_k: Rows,            // [pool_len][head_dim]
    pub(crate) pool_v: Rows,            // [pool_len][head_dim]
    pub(crate) extra: Vec<OutlierSlot>, // [extra_len], in eviction order
    pub(crate) extra_k: Rows,           // [extra_len][head_dim]
    pub(crate) extra_v: Rows,           // [extra_len][head_dim]
    pub(crate) sink_k: Rows,            // [sink_len][head_dim], positions 0..sink_len
    pub(crate) sink_v: Rows,            // [sink_len][head_dim]
    pub(crate) stopped_at: Option<u32>,
    /// Queries seen before the first flush, while the key rotation is undecided.
    pub(crate) probe: QueryProbe,
}

/// Where a tracing candidate currently lives.
#[derive(Clone, Copy)]
enum Src {
    Pool(usize),
    Group(usize),
}

/// Per-head settings that are not part of the shared [`Geometry`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadSettings {
    pub residual: usize,
    pub pool_cap: usize,
    pub extra_cap: usize,
    pub score: Score,
    pub window_cap: usize,
    pub rot: usize,
    /// How keys are rotated when `rot` > 0.
    pub key_rotation: Rotation,
    pub sink_cap: usize,
    /// Precision of the rows kept outside quantized groups (window, sinks, pools); `None`:
    /// chosen at the first flush (f16 until then).
    pub rows: Option<RowPrecision>,
    /// Values quantized per channel over the group (laid out as a key group).
    pub value_per_channel: bool,
    /// Value (scale, min) pairs in 8 bits each.
    pub value_params8: bool,
    pub value_fit: Fit,
    pub key_fit: Fit,
}

impl HeadCache {
    /// A head with its window and pools allocated, or [`CacheError::Alloc`] when the memory
    /// is not there (the caller checked the total against the machine's memory first).
    pub(crate) fn try_new(geo: Geometry, st: HeadSettings) -> Result<Self, CacheError> {
        let HeadSettings {
            residual,
            pool_cap,
            extra_cap,
            score,
            window_cap,
            rot,
            key_rotation,
            sink_cap,
            rows,
            value_per_channel,
            value_params8,
            value_fit,
            key_fit,
        } = st;
        let hd = geo.head_dim as usize;
        let row_precision_pending = rows.is_none();
        let rows = rows.unwrap_or(RowPrecision::F16);
        let r = |cap, what| Rows::try_with_capacity(rows, hd, cap, what);
        // Window and pools are bounded, so they are allocated once, exactly; the quantized
        // segments grow by exactly one group per flush (see `flush`).
        Ok(Self {
            geo,
            residual,
            pool_cap,
            extra_cap,
            score,
            rot,
            keys_rotated: rot > 0 && key_rotation == Rotation::On,
            auto_key_rotation: rot > 0 && key_rotation == Rotation::Auto,
            key_rotation_pending: rot > 0 && key_rotation == Rotation::Auto,
            sink_cap,
            rows,
            auto_rows: row_precision_pending,
            row_precision_pending,
            value_per_channel,
            key_codes: Vec::new(),
            key_params: Vec::new(),
            val_codes: Vec::new(),
            val_params: Vec::new(),
            value_params8,
            val_params8: Vec::new(),
            val_super: Vec::new(),
            value_fit,
            key_fit,
            masks: Vec::new(),
            n_groups: 0,
            win_k: r(window_cap, "the f16 window")?,
            win_v: r(window_cap, "the f16 window")?,
            pool: try_vec(pool_cap, "the outlier pool")?,
            pool_k: r(pool_cap, "the outlier pool")?,
            pool_v: r(pool_cap, "the outlier pool")?,
            extra: try_vec(extra_cap, "the extra pool")?,
            extra_k: r(extra_cap, "the extra pool")?,
            extra_v: r(extra_cap, "the extra pool")?,
            sink_k: r(sink_cap, "the sinks")?,
            sink_v: r(sink_cap, "the sinks")?,
            stopped_at: None,
            probe: QueryProbe::default(),
        })
    }

    /// Forgets every token: quantized storage freed, window and pools emptied but kept, and
    /// the choices the head makes itself open again (the next tokens decide them afresh, as
    /// in a new cache). Fails only where rows chosen as q8_0 go back to f16 and that memory
    /// is not there; the head is then left empty with its old row precision.
    pub(crate) fn reset(&mut self) -> Result<(), CacheError> {
        self.key_codes = Vec::new();
        self.key_params = Vec::new();
        self.val_codes = Vec::new();
        self.val_params = Vec::new();
        self.val_params8 = Vec::new();
        self.val_super = Vec::new();
        self.masks = Vec::new();
        self.n_groups = 0;
        for r in self.row_sets_mut() {
            r.clear();
        }
        self.pool.clear();
        self.extra.clear();
        self.stopped_at = None;
        self.probe.clear();
        if self.auto_key_rotation {
            self.keys_rotated = false;
            self.key_rotation_pending = true;
        }
        if self.auto_rows {
            if self.rows != RowPrecision::F16 {
                // Every set allocated before any is replaced, so a failure changes nothing.
                let hd = self.head_dim();
                let fresh = self
                    .row_sets_mut()
                    .map(|r| {
                        Rows::try_with_capacity(RowPrecision::F16, hd, r.capacity(), "the f16 rows")
                    })
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()?;
                for (r, f) in self.row_sets_mut().into_iter().zip(fresh) {
                    *r = f;
                }
                self.rows = RowPrecision::F16;
            }
            self.row_precision_pending = true;
        }
        Ok(())
    }

    /// Every set of rows kept outside the groups (window, pools, sinks; K and V).
    fn row_sets_mut(&mut self) -> [&mut Rows; 8] {
        [
            &mut self.win_k,
            &mut self.win_v,
            &mut self.sink_k,
            &mut self.sink_v,
            &mut self.pool_k,
            &mut self.pool_v,
            &mut self.extra_k,
            &mut self.extra_v,
        ]
    }

    /// Positions whose queries are attended before the first flush (the flush comes with the
    /// append of position R + G − 1): what [`Self::probe`] records.
    pub(crate) fn probe_positions(&self) -> usize {
        self.residual + self.group() - 1
    }

    /// Flushes that `n` more tokens would cause: the window flushes when it reaches R + G
    /// and keeps R.
    pub(crate) fn flushes_for(&self, n: usize) -> usize {
        let to_first = self.residual + self.group() - self.window_len();
        if n < to_first {
            0
        } else {
            1 + (n - to_first) / self.group()
        }
    }

    /// Reserves the quantized storage of `flushes` more groups, so the flushes themselves
    /// cannot fail to allocate; capacities stay exact (each flush uses what it reserved).
    pub(crate) fn reserve_flushes(&mut self, flushes: usize) -> Result<(), CacheError> {
        if flushes == 0 {
            return Ok(());
        }
        let (hd, g) = (self.head_dim(), self.group());
        let (n_vc, n_vp) = self.value_growth();
        let grow = |per: usize| per.checked_mul(flushes);
        let fail = |what: &'static str| CacheError::Alloc {
            what,
            detail: format!("{flushes} more groups of {g} tokens overflow usize"),
        };
        let err = |what: &'static str| {
            move |e: std::collections::TryReserveError| CacheError::Alloc {
                what,
                detail: format!("{flushes} more groups of {g} tokens: {e}"),
            }
        };
        let codes = "quantized codes";
        let params = "quantization parameters";
        self.key_codes
            .try_reserve_exact(grow(hd * self.key_words()).ok_or_else(|| fail(codes))?)
            .map_err(err(codes))?;
        self.key_params
            .try_reserve_exact(grow(hd).ok_or_else(|| fail(params))?)
            .map_err(err(params))?;
        self.val_codes
            .try_reserve_exact(grow(n_vc).ok_or_else(|| fail(codes))?)
            .map_err(err(codes))?;
        if self.value_params8 {
            self.val_params8
                .try_reserve_exact(grow(n_vp).ok_or_else(|| fail(params))?)
                .map_err(err(params))?;
            self.val_super
                .try_reserve_exact(grow(self.val_param_cols()).ok_or_else(|| fail(params))?)
                .map_err(err(params))?;
        } else {
            self.val_params
                .try_reserve_exact(grow(n_vp).ok_or_else(|| fail(params))?)
                .map_err(err(params))?;
        }
        self.masks
            .try_reserve_exact(grow(self.mask_words()).ok_or_else(|| fail("masks"))?)
            .map_err(err("masks"))?;
        Ok(())
    }

    /// (value code words, value params) one flush adds.
    fn value_growth(&self) -> (usize, usize) {
        let (hd, g) = (self.head_dim(), self.group());
        if self.value_per_channel {
            (hd * self.val_channel_words(), hd)
        } else {
            (g * self.val_words(), g * self.val_nparams())
        }
    }

    pub(crate) fn head_dim(&self) -> usize {
        self.geo.head_dim as usize
    }
    pub(crate) fn group(&self) -> usize {
        self.geo.key_group as usize
    }
    pub(crate) fn key_words(&self) -> usize {
        words_for(self.geo.key_group, self.geo.key_bits) as usize
    }
    /// Value code words per channel of one group (per-channel values).
    pub(crate) fn val_channel_words(&self) -> usize {
        words_for(self.geo.key_group, self.geo.value_bits) as usize
    }
    pub(crate) fn val_words(&self) -> usize {
        self.geo.value_row_words() as usize
    }
    pub(crate) fn val_nparams(&self) -> usize {
        self.geo.value_row_params() as usize
    }
    /// Value pairs of one group that share a super pair per column (`vp=8`): a token's value
    /// groups per token, one column per channel.
    pub(crate) fn val_param_cols(&self) -> usize {
        if self.value_per_channel {
            1
        } else {
            self.val_nparams()
        }
    }

    /// Every quantized group's value (scale, min) pairs in the f16 layout the kernels read:
    /// the stored ones, or (`vp=8`) decoded into `scratch`.
    pub(crate) fn value_params<'a>(&'a self, scratch: &'a mut Vec<QParams>) -> &'a [QParams] {
        if !self.value_params8 {
            return &self.val_params;
        }
        let cols = self.val_param_cols();
        let per_group = self.value_growth().1;
        scratch.clear();
        scratch.extend(
            self.val_params8
                .iter()
                .enumerate()
                .map(|(i, &b)| decode_params8(self.val_super[i / per_group * cols + i % cols], b)),
        );
        scratch
    }

    pub(crate) fn mask_words(&self) -> usize {
        self.group().div_ceil(32)
    }

    /// Number of quantized groups.
    pub fn n_groups(&self) -> usize {
        self.n_groups
    }
    /// Tokens (slots) in quantized storage, placeholders included.
    pub fn quantized_len(&self) -> usize {
        self.n_groups * self.group()
    }
    /// Tokens in the f16 window.
    pub fn window_len(&self) -> usize {
        self.win_k.len()
    }
    /// All tokens of this head.
    pub fn len(&self) -> usize {
        self.quantized_len() + self.window_len()
    }
    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The outlier pool, sorted by (score, position).
    pub fn pool(&self) -> &[OutlierSlot] {
        &self.pool
    }
    /// The extra pool, in eviction order.
    pub fn extra(&self) -> &[OutlierSlot] {
        &self.extra
    }
    /// The group at which tracing stopped for good (extra pool would have overflowed).
    pub fn stopped_at(&self) -> Option<u32> {
        self.stopped_at
    }
    /// Tokens kept exact as attention sinks so far (positions `0..sink_len`).
    pub fn sink_len(&self) -> usize {
        self.sink_k.len()
    }
    /// Capacities (pool, extra) in effect for this head.
    pub fn pool_capacity(&self) -> (usize, usize) {
        (self.pool_cap, self.extra_cap)
    }
    /// Whether quantized slot `pos` is a masked placeholder.
    pub fn is_masked(&self, pos: usize) -> bool {
        if pos >= self.quantized_len() {
            return false;
        }
        let (g, t) = (pos / self.group(), pos % self.group());
        self.masks[g * self.mask_words() + t / 32] >> (t % 32) & 1 == 1
    }
    /// Positions of all masked placeholder slots, ascending.
    pub fn masked_positions(&self) -> Vec<usize> {
        (0..self.quantized_len())
            .filter(|&p| self.is_masked(p))
            .collect()
    }
    /// Key of the token at `pos` when it is in the window, a sink or a pool (as stored there).
    pub fn full_precision_key(&self, pos: usize) -> Option<Vec<f32>> {
        self.full_precision(pos, true)
    }
    /// Value of the token at `pos` when it is in the window, a sink or a pool.
    pub fn full_precision_value(&self, pos: usize) -> Option<Vec<f32>> {
        self.full_precision(pos, false)
    }

    fn full_precision(&self, pos: usize, key: bool) -> Option<Vec<f32>> {
        let row = |buf: &Rows, i: usize| {
            let mut r = buf.row_f32(i);
            if key {
                self.unrotate_keys(&mut r);
            } else {
                self.unrotate_values(&mut r);
            }
            r
        };
        if pos >= self.quantized_len() && pos < self.len() {
            let i = pos - self.quantized_len();
            return Some(row(if key { &self.win_k } else { &self.win_v }, i));
        }
        if pos < self.sink_len() {
            return Some(row(if key { &self.sink_k } else { &self.sink_v }, pos));
        }
        if let Some(i) = self.pool.iter().position(|s| s.pos as usize == pos) {
            return Some(row(if key { &self.pool_k } else { &self.pool_v }, i));
        }
        let i = self.extra.iter().position(|s| s.pos as usize == pos)?;
        Some(row(if key { &self.extra_k } else { &self.extra_v }, i))
    }

    /// Key rows `[n][head_dim]` from the stored (possibly rotated) space back to the caller's.
    /// H is its own inverse, so this also rotates caller rows (and queries) into the stored
    /// space.
    pub(crate) fn unrotate_keys(&self, rows: &mut [f32]) {
        if self.keys_rotated {
            hadamard_blocks(rows, self.rot);
        }
    }

    /// Value rows `[n][head_dim]` from the stored space back to the caller's (and back).
    pub(crate) fn unrotate_values(&self, rows: &mut [f32]) {
        if self.rot > 0 {
            hadamard_blocks(rows, self.rot);
        }
    }

    /// Whether the stored keys are rotated (decided at the first flush under
    /// `Rotation::Auto`; until then `false`).
    pub fn keys_rotated(&self) -> bool {
        self.keys_rotated
    }

    /// Precision of the rows kept outside quantized groups (f16 until a pending choice is
    /// made).
    pub fn row_precision(&self) -> RowPrecision {
        self.rows
    }

    /// Whether the head still has to choose its row precision (no flush yet).
    pub fn row_precision_pending(&self) -> bool {
        self.row_precision_pending
    }

    /// Whether the head still has to decide its key rotation (no flush yet).
    pub fn key_rotation_pending(&self) -> bool {
        self.key_rotation_pending
    }

    /// Dequantized keys of all quantized slots (scalar reference): `[quantized_len][head_dim]`,
    /// in the caller's space (rotated back when rotation is on).
    pub fn dequantized_keys(&self) -> Vec<f32> {
        let mut k =
            self.dequantized_channel_groups(&self.key_codes, &self.key_params, self.geo.key_bits);
        self.unrotate_keys(&mut k);
        k
    }

    /// Per-channel groups (`[n_groups][head_dim][words]` codes, `[n_groups][head_dim]` params)
    /// dequantized to `[quantized_len][head_dim]` in the stored space.
    fn dequantized_channel_groups(&self, codes: &[u32], params: &[QParams], bits: u32) -> Vec<f32> {
        let (hd, g) = (self.head_dim(), self.group());
        let w = words_for(self.geo.key_group, bits) as usize;
        let mut out = vec![0f32; self.quantized_len() * hd];
        for gi in 0..self.n_groups {
            dequantize_key_group(
                &codes[gi * hd * w..(gi + 1) * hd * w],
                &params[gi * hd..(gi + 1) * hd],
                g,
                hd,
                bits,
                &mut out[gi * g * hd..(gi + 1) * g * hd],
            )
            .expect("internal layout is consistent");
        }
        out
    }

    /// Dequantized values of all quantized slots: `[quantized_len][head_dim]`, in the caller's
    /// space.
    pub fn dequantized_values(&self) -> Vec<f32> {
        let mut scratch = Vec::new();
        let val_params = self.value_params(&mut scratch);
        if self.value_per_channel {
            let mut v =
                self.dequantized_channel_groups(&self.val_codes, val_params, self.geo.value_bits);
            self.unrotate_values(&mut v);
            return v;
        }
        let (hd, vw, np) = (self.head_dim(), self.val_words(), self.val_nparams());
        let mut out = vec![0f32; self.quantized_len() * hd];
        for (t, o) in out.chunks_mut(hd).enumerate() {
            dequantize_value_row(
                &self.val_codes[t * vw..(t + 1) * vw],
                &val_params[t * np..(t + 1) * np],
                self.geo.value_group as usize,
                self.geo.value_bits,
                o,
            )
            .expect("internal layout is consistent");
        }
        self.unrotate_values(&mut out);
        out
    }

    /// Bytes actually allocated, by segment (sinks count as pool memory).
    pub fn memory(&self) -> MemoryStats {
        let u32s = std::mem::size_of::<u32>();
        let qp = std::mem::size_of::<QParams>();
        let slot = std::mem::size_of::<OutlierSlot>();
        MemoryStats::new(
            (self.key_codes.capacity() + self.val_codes.capacity()) * u32s,
            (self.key_params.capacity() + self.val_params.capacity() + self.val_super.capacity())
                * qp
                + self.val_params8.capacity() * std::mem::size_of::<[u8; 2]>(),
            self.win_k.bytes() + self.win_v.bytes(),
            self.pool_k.bytes()
                + self.pool_v.bytes()
                + self.extra_k.bytes()
                + self.extra_v.bytes()
                + self.sink_k.bytes()
                + self.sink_v.bytes(),
            self.masks.capacity() * u32s + (self.pool.capacity() + self.extra.capacity()) * slot,
        )
    }

    fn score_of(&self, k: impl Iterator<Item = f32>) -> f32 {
        match self.score {
            Score::L1 => k.map(f32::abs).sum(),
            Score::L2 => k.map(|x| x * x).sum::<f32>().sqrt(),
        }
    }

    /// Score of a stored key row: the L1 norm is not rotation-invariant, and the paper's
    /// observation (small-magnitude tokens) is about the model's own keys, so a rotated row is
    /// scored in the caller's space.
    fn score_stored(&self, k: impl Iterator<Item = f32>) -> f32 {
        if !self.keys_rotated {
            return self.score_of(k);
        }
        let mut r: Vec<f32> = k.collect(); // [head_dim]
        self.unrotate_keys(&mut r);
        self.score_of(r.into_iter())
    }

    /// Appends one token whose K and V are finite in f16 (checked by the caller) and flushes
    /// the oldest G tokens when the window reaches R + G. `v` comes in stored form (rotated
    /// when `rot` > 0); `k` in the caller's space when the head decides its key rotation,
    /// else in stored form too. `scratch` holds at least 2·G·hd floats (allocated once per
    /// cache, so a flush never has to find that memory).
    pub(crate) fn push(
        &mut self,
        k: &[f32],
        v: &[f32],
        scratch: &mut [f32],
    ) -> Result<(), CacheError> {
        debug_assert_eq!(k.len(), self.head_dim());
        debug_assert!(self.win_k.len() < self.win_k.capacity());
        if self.keys_rotated && self.auto_key_rotation {
            let mut kr = k.to_vec();
            hadamard_blocks(&mut kr, self.rot);
            self.win_k.push(&kr);
        } else {
            self.win_k.push(k);
        }
        self.win_v.push(v);
        if self.window_len() == self.residual + self.group() {
            self.flush(scratch)?;
        }
        Ok(())
    }

    /// Whether a few channels dominate this head's keys, measured on its first group `kg`
    /// (`[G][head_dim]`, plain keys as the window holds them, the leading `skip` sink slots
    /// left out): q8_0 rows of these keys err more than [`DOMINANT_BELOW`] of the squared
    /// error of the group's per-channel codes. q8_0 scales 32 channels by their largest value,
    /// so it errs where one channel dwarfs the rest of its block; per-channel codes hold such a
    /// channel (nearly constant, or flipping between a few levels) almost exactly.
    fn dominated_by_few_channels(&self, kg: &[f32], skip: usize) -> Result<bool, CacheError> {
        let (hd, g, bits) = (self.head_dim(), self.group(), self.geo.key_bits);
        let skip = skip.min(g);
        if skip == g {
            return Ok(false);
        }
        let sq = |a: &[f32], b: &[f32]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(&x, &y)| f64::from(x - y).powi(2))
                .sum()
        };
        let x = &kg[skip * hd..]; // [G - skip][head_dim]
        let q8 = RowPrecision::new(8, hd);
        let mut rows = Rows::with_capacity(q8, hd, g - skip);
        x.chunks(hd).for_each(|r| rows.push(r));
        let mut back = vec![0f32; x.len()];
        rows.to_f32(0, g - skip, &mut back);
        // Sink slots never join a group's range: give them the first other slot's key.
        let mut group = kg.to_vec();
        for t in 0..skip {
            group.copy_within(skip * hd..(skip + 1) * hd, t * hd);
        }
        let w = words_for(g as u32, bits) as usize;
        let mut codes = vec![0u32; hd * w];
        let mut params = vec![QParams::default(); hd];
        self.quantize_keys(&group, bits, &mut codes, &mut params)?;
        let mut deq = vec![0f32; g * hd];
        dequantize_key_group(&codes, &params, g, hd, bits, &mut deq)?;
        Ok(sq(x, &back) > DOMINANT_BELOW * sq(&group[skip * hd..], &deq[skip * hd..]))
    }

    /// The first group's keys (`kg`: `[G][head_dim]`, plain) as the first flush would store
    /// them, back in the caller's space: sinks and the pool's picks exact, every other slot
    /// through per-channel codes of the (mean-filled) group, rotated first when `rotated`.
    fn first_group_as_stored(&self, kg: &[f32], rotated: bool) -> Result<Vec<f32>, CacheError> {
        let (hd, g, bits) = (self.head_dim(), self.group(), self.geo.key_bits);
        let n_sink = self.sink_cap.min(g);
        let mut selected = vec![false; g];
        selected[..n_sink].iter_mut().for_each(|s| *s = true);
        // The first flush's pool contest: an empty pool, so the group's smallest scores win.
        let mut cand: Vec<(f32, usize)> = (n_sink..g)
            .map(|t| (self.score_of(kg[t * hd..(t + 1) * hd].iter().copied()), t))
            .collect();
        cand.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(_, t) in cand.iter().take(self.pool_cap) {
            selected[t] = true;
        }
        let mut x = kg.to_vec();
        fill_with_mean_of_others(&mut x, &selected, hd);
        if rotated {
            hadamard_blocks(&mut x, self.rot);
        }
        let w = words_for(g as u32, bits) as usize;
        let mut codes = vec![0u32; hd * w];
        let mut params = vec![QParams::default(); hd];
        self.quantize_keys(&x, bits, &mut codes, &mut params)?;
        let mut deq = vec![0f32; g * hd];
        dequantize_key_group(&codes, &params, g, hd, bits, &mut deq)?;
        if rotated {
            hadamard_blocks(&mut deq, self.rot);
        }
        for (t, _) in selected.iter().enumerate().filter(|(_, &s)| s) {
            deq[t * hd..(t + 1) * hd].copy_from_slice(&kg[t * hd..(t + 1) * hd]);
        }
        Ok(deq)
    }

    /// Whether rotated keys serve the queries seen so far better than plain ones: the
    /// attention error of those queries with the first group stored each way (see
    /// [`super::probe`]).
    fn rotation_serves_queries(&self, qs: &Queries) -> Result<bool, CacheError> {
        let (hd, g) = (self.head_dim(), self.group());
        // The window holds R + G tokens here; the queries read up to R + G − 1 of them, and the
        // group itself is G (more than the queries read when R = 0).
        let n = self.probe_positions().max(g).min(self.window_len());
        let mut k = vec![0f32; n * hd]; // [n][head_dim], plain
        let mut v = vec![0f32; n * hd]; // stored form: the error's norm does not mind
        self.win_k.to_f32(0, n, &mut k);
        self.win_v.to_f32(0, n, &mut v);
        let mut err = [0f64; 2];
        for (e, rotated) in err.iter_mut().zip([false, true]) {
            let mut k_hat = k.clone();
            let group = self.first_group_as_stored(&k[..g * hd], rotated)?;
            k_hat[..g * hd].copy_from_slice(&group);
            *e = attention_error(qs, &k, &k_hat, &v, hd);
        }
        Ok(err[1] < err[0])
    }

    /// The choices left to this head (`Rotation::Auto`, `wb=auto`), made at its first flush.
    /// Keys: rotated when that gives the queries attended so far the smaller attention error
    /// (a rotation evens out tokens that stretch a channel's range, but spreads a dominant
    /// channel over every channel of its block); with no queries seen, rotated unless a few
    /// channels dominate them. Rows: f16 where a few channels dominate the keys (q8_0 blocks
    /// would lose the rest of those blocks), else q8_0. Rows are converted to the chosen form.
    fn make_first_flush_choices(&mut self) -> Result<(), CacheError> {
        let (hd, g) = (self.head_dim(), self.group());
        let mut kg = vec![0f32; g * hd]; // [G][head_dim]
        self.win_k.to_f32(0, g, &mut kg);
        let dominated = self.dominated_by_few_channels(&kg, self.sink_cap)?;
        let rotate_keys = match self.probe.take() {
            Some(qs) if self.key_rotation_pending => self.rotation_serves_queries(&qs)?,
            _ => !dominated,
        };
        if self.row_precision_pending {
            self.row_precision_pending = false;
            if !dominated {
                let q8 = RowPrecision::new(8, hd);
                self.rows = q8;
                for r in self.row_sets_mut() {
                    *r = r.converted(q8);
                }
            }
        }
        if self.key_rotation_pending {
            self.key_rotation_pending = false;
            if rotate_keys {
                self.keys_rotated = true;
                let rot = self.rot;
                for rows in [
                    &mut self.win_k,
                    &mut self.sink_k,
                    &mut self.pool_k,
                    &mut self.extra_k,
                ] {
                    rows.map_rows(|r| hadamard_blocks(r, rot));
                }
            }
        }
        Ok(())
    }

    /// Traces outliers in the oldest G window tokens, then quantizes them as one group.
    fn flush(&mut self, scratch: &mut [f32]) -> Result<(), CacheError> {
        let (hd, g) = (self.head_dim(), self.group());
        if self.row_precision_pending || self.key_rotation_pending {
            self.make_first_flush_choices()?;
        }
        let gi = self.n_groups;
        let base = gi * g;
        let (kg, rest) = scratch.split_at_mut(g * hd); // [G][head_dim]
        let vg = &mut rest[..g * hd]; // [G][head_dim]
        self.win_k.to_f32(0, g, kg);
        self.win_v.to_f32(0, g, vg);
        let mut mask = vec![0u32; self.mask_words()]; // [mask words]

        // Slots whose exact copy lives elsewhere (sinks, pool): masked and mean-filled.
        let mut selected = vec![false; g];
        let n_sink = self.sink_cap.saturating_sub(base).min(g);
        for t in 0..n_sink {
            self.sink_k.push_from(&self.win_k, t);
            self.sink_v.push_from(&self.win_v, t);
            selected[t] = true;
            mask[t / 32] |= 1 << (t % 32);
        }
        if self.pool_cap > 0 && self.stopped_at.is_none() {
            // Candidates: the pool and the group, smallest score first, ties by position.
            let mut cand: Vec<(f32, i32, Src)> = Vec::with_capacity(self.pool.len() + g);
            for (i, s) in self.pool.iter().enumerate() {
                let sc = self.score_stored(self.pool_k.row_f32(i).into_iter());
                cand.push((sc, s.pos, Src::Pool(i)));
            }
            for t in n_sink..g {
                let sc = self.score_stored(kg[t * hd..(t + 1) * hd].iter().copied());
                cand.push((sc, (base + t) as i32, Src::Group(t)));
            }
            cand.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let chosen = &cand[..self.pool_cap.min(cand.len())];
            let evicted: Vec<usize> = (0..self.pool.len())
                .filter(|&i| !chosen.iter().any(|c| matches!(c.2, Src::Pool(j) if j == i)))
                .collect();
            if self.extra.len() + evicted.len() > self.extra_cap {
                // Stop rule: this group and later ones go in plainly; pools stay as they are.
                self.stopped_at = Some(gi as u32);
            } else {
                for &i in &evicted {
                    self.extra.push(self.pool[i]);
                    self.extra_k.push_from(&self.pool_k, i);
                    self.extra_v.push_from(&self.pool_v, i);
                }
                let mut new_slots = Vec::with_capacity(self.pool_cap);
                let mut new_k = Rows::with_capacity(self.rows, hd, self.pool_cap);
                let mut new_v = Rows::with_capacity(self.rows, hd, self.pool_cap);
                for c in chosen {
                    match c.2 {
                        Src::Pool(i) => {
                            new_slots.push(self.pool[i]);
                            new_k.push_from(&self.pool_k, i);
                            new_v.push_from(&self.pool_v, i);
                        }
                        Src::Group(t) => {
                            new_slots.push(OutlierSlot {
                                pos: c.1,
                                group: gi as u32,
                            });
                            new_k.push_from(&self.win_k, t);
                            new_v.push_from(&self.win_v, t);
                            selected[t] = true;
                            mask[t / 32] |= 1 << (t % 32);
                        }
                    }
                }
                // clear + extend keeps the exact up-front allocation.
                self.pool.clear();
                self.pool.extend_from_slice(&new_slots);
                self.pool_k.clear();
                self.pool_v.clear();
                for i in 0..new_slots.len() {
                    self.pool_k.push_from(&new_k, i);
                    self.pool_v.push_from(&new_v, i);
                }
            }
        }
        fill_with_mean_of_others(kg, &selected, hd);
        fill_with_mean_of_others(vg, &selected, hd);

        let (kw, vw, np) = (self.key_words(), self.val_words(), self.val_nparams());
        let (kc0, kp0, vc0, vp0) = (
            self.key_codes.len(),
            self.key_params.len(),
            self.val_codes.len(),
            self.val_params.len(),
        );
        // Exact growth: one group each time, so capacity == what is used (see memory());
        // `reserve_flushes` made room already, so these reserves do not allocate.
        let (n_vc, n_vp) = self.value_growth();
        self.key_codes.reserve_exact(hd * kw);
        self.key_codes.resize(kc0 + hd * kw, 0);
        self.key_params.reserve_exact(hd);
        self.key_params.resize(kp0 + hd, QParams::default());
        self.val_codes.reserve_exact(n_vc);
        self.val_codes.resize(vc0 + n_vc, 0);
        if !self.value_params8 {
            self.val_params.reserve_exact(n_vp);
            self.val_params.resize(vp0 + n_vp, QParams::default());
        }
        self.masks.reserve_exact(mask.len());
        self.masks.extend_from_slice(&mask);
        let (mut codes, mut params) = (
            std::mem::take(&mut self.key_codes),
            std::mem::take(&mut self.key_params),
        );
        let done = self.quantize_keys(kg, self.geo.key_bits, &mut codes[kc0..], &mut params[kp0..]);
        (self.key_codes, self.key_params) = (codes, params);
        done?;
        let gv = self.geo.value_group as usize;
        if self.value_params8 || self.value_fit != Fit::MinMax {
            self.quantize_values_fitted(vg, vc0, vp0)?;
        } else if self.value_per_channel {
            quantize_key_group(
                vg,
                g,
                hd,
                self.geo.value_bits,
                &mut self.val_codes[vc0..],
                &mut self.val_params[vp0..],
            )?;
        } else {
            for t in 0..g {
                quantize_value_row(
                    &vg[t * hd..(t + 1) * hd],
                    gv,
                    self.geo.value_bits,
                    &mut self.val_codes[vc0 + t * vw..vc0 + (t + 1) * vw],
                    &mut self.val_params[vp0 + t * np..vp0 + (t + 1) * np],
                )?;
            }
        }
        self.n_groups += 1;
        self.win_k.drain_front(g);
        self.win_v.drain_front(g);
        Ok(())
    }
}

impl HeadCache {
    /// Per-channel codes of a key group (`x`: `[G][head_dim]`) with this head's grid fit.
    fn quantize_keys(
        &self,
        x: &[f32],
        bits: u32,
        codes: &mut [u32],
        params: &mut [QParams],
    ) -> Result<(), CacheError> {
        let (hd, g) = (self.head_dim(), self.group());
        if self.key_fit == Fit::MinMax {
            return Ok(quantize_key_group(x, g, hd, bits, codes, params)?);
        }
        let mut col = vec![0f32; g]; // [G]
        for (c, p) in params.iter_mut().enumerate().take(hd) {
            col.iter_mut()
                .enumerate()
                .for_each(|(t, v)| *v = x[t * hd + c]);
            let (lo, hi) = least_squares_range(&col, bits, finite_range(col.iter().copied())?);
            *p = range_params(lo, hi, bits);
        }
        Ok(quantize_key_group_with(
            x,
            g,
            hd,
            bits,
            &params[..hd],
            codes,
        )?)
    }

    /// Quantizes a flushed group's values (`vg`: `[G][head_dim]`) where their grids are
    /// fitted or their pairs stored in 8 bits: every group's range first (fitted), then the
    /// pairs (in 8 bits those of the whole group at once: they share a super pair per
    /// column), then codes against the pairs as stored. Codes go to `val_codes[vc0..]`, f16
    /// pairs to `val_params[vp0..]`.
    fn quantize_values_fitted(
        &mut self,
        vg: &[f32],
        vc0: usize,
        vp0: usize,
    ) -> Result<(), CacheError> {
        let (hd, g) = (self.head_dim(), self.group());
        let (bits, gv, cols) = (
            self.geo.value_bits,
            self.geo.value_group as usize,
            self.val_param_cols(),
        );
        let groups: Vec<Vec<f32>> = if self.value_per_channel {
            (0..hd)
                .map(|c| (0..g).map(|t| vg[t * hd + c]).collect())
                .collect()
        } else {
            vg.chunks(gv).map(<[f32]>::to_vec).collect()
        };
        let mut ranges = Vec::with_capacity(groups.len());
        for x in &groups {
            let r = finite_range(x.iter().copied())?;
            ranges.push(match self.value_fit {
                Fit::MinMax => r,
                Fit::LeastSquares => least_squares_range(x, bits, r),
            });
        }
        let dec = if self.value_params8 {
            self.encode_values8(&ranges, cols, bits)?
        } else {
            let dec: Vec<QParams> = ranges
                .iter()
                .map(|&(lo, hi)| range_params(lo, hi, bits))
                .collect();
            self.val_params[vp0..vp0 + dec.len()].copy_from_slice(&dec);
            dec
        };
        if self.value_per_channel {
            quantize_key_group_with(vg, g, hd, bits, &dec, &mut self.val_codes[vc0..])?;
        } else {
            let (vw, np) = (self.val_words(), self.val_nparams());
            for t in 0..g {
                quantize_value_row_with(
                    &vg[t * hd..(t + 1) * hd],
                    gv,
                    bits,
                    &dec[t * np..(t + 1) * np],
                    &mut self.val_codes[vc0 + t * vw..vc0 + (t + 1) * vw],
                )?;
            }
        }
        Ok(())
    }

    /// Appends one group's 8-bit pairs and super pairs; returns the decoded pairs.
    fn encode_values8(
        &mut self,
        ranges: &[(f32, f32)],
        cols: usize,
        bits: u32,
    ) -> Result<Vec<QParams>, CacheError> {
        let (p0, s0) = (self.val_params8.len(), self.val_super.len());
        self.val_params8.reserve_exact(ranges.len());
        self.val_params8.resize(p0 + ranges.len(), [0; 2]);
        self.val_super.reserve_exact(cols);
        self.val_super.resize(s0 + cols, QParams::default());
        Ok(encode_params8(
            ranges,
            cols,
            bits,
            &mut self.val_super[s0..],
            &mut self.val_params8[p0..],
        )?)
    }
}

/// Replaces the selected rows of `x` (`[G][head_dim]`) by the mean of the unselected rows, so
/// that outliers leaving for the pool no longer stretch the group's range (OTT.md §4.4).
fn fill_with_mean_of_others(x: &mut [f32], selected: &[bool], hd: usize) {
    let n_keep = selected.iter().filter(|&&s| !s).count();
    if n_keep == selected.len() {
        return;
    }
    let mut mean = vec![0f32; hd]; // [head_dim]
    for (row, _) in x.chunks(hd).zip(selected).filter(|(_, &s)| !s) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    // With every slot selected there is nothing to average; 0 is as good as any (all masked).
    if n_keep > 0 {
        mean.iter_mut().for_each(|m| *m /= n_keep as f32);
    }
    for (row, _) in x.chunks_mut(hd).zip(selected).filter(|(_, &s)| s) {
        row.copy_from_slice(&mean);
    }
}
