//! The engine's KV caches: llama.cpp's own block types as ggml tensors (written with
//! `ggml_set_rows`, read by `ggml_flash_attn_ext`, as llama.cpp does), or our OTT cache as a
//! pair of custom ops (cache write on one thread, then attention on all of them).

use crate::cache::{CacheShape, OttCache};
use crate::error::{Error, Result};
use crate::ggml::{Context, CustomOp, Graph, Tensor, TensorId};
use crate::gguf::{GgmlType, ModelHparams};
use crate::kind::CacheKind;
use half::f16;
use std::ops::Range;
use std::sync::{Mutex, RwLock};

/// Per-graph inputs the cache needs filled after allocation.
pub(crate) struct KvInputs<'c> {
    /// ggml caches: destination rows (i64 `[n]`) and the causal mask (f16 `[n_kv, n]`).
    pub idxs: Option<Tensor<'c>>,
    pub mask: Option<Tensor<'c>>,
    /// The causal mask narrowed to the sliding window, for the window layers (f16
    /// `[n_kv, n]`), when the model has any.
    pub mask_swa: Option<Tensor<'c>>,
    pub n_kv: usize,
    /// Our cache's window rings: ring cells of the new tokens (i64 `[n]`) and the window
    /// mask over the whole ring (f16 `[cells, n]`).
    pub ring: Option<(Tensor<'c>, Tensor<'c>)>,
}

pub(crate) struct GgmlKv {
    ctx: Context,
    // [hd * n_head_kv, n_ctx] per layer, raw pointers into `ctx`
    k: Vec<TensorId>,
    v: Vec<TensorId>,
    /// Hadamard matrices `[n, n]` f32 for K and V (None: no rotation).
    rot_k: Option<TensorId>,
    rot_v: Option<TensorId>,
    n_ctx: usize,
    bytes: usize,
    /// Sliding window in tokens (0: no layer has one).
    n_swa: usize,
}

fn hadamard_matrix(n: usize) -> Vec<f32> {
    let mut m = vec![0f32; n * n];
    for (i, row) in m.chunks_exact_mut(n).enumerate() {
        row[i] = 1.0;
        crate::quant::hadamard_blocks(row, n);
    }
    m
}

/// Bytes of `n` elements of type `ty` (whole blocks).
fn row_bytes(ty: GgmlType, n: usize) -> usize {
    n / ty.block_size() as usize * ty.type_size() as usize
}

/// Cells of a ggml cache for `n_ctx` tokens: llama.cpp rounds its cache up to whole 256-cell
/// pads, and the same cell count gives the same attended lengths, hence bit-identical flash
/// attention.
fn ggml_cells(n_ctx: usize) -> usize {
    n_ctx.div_ceil(256) * 256
}

/// Bytes of a ggml cache of type `ty` for `hp` at `n_ctx` tokens (K and V, every layer), as
/// `GgmlKv` allocates them.
pub(crate) fn ggml_cache_bytes(ty: GgmlType, hp: &ModelHparams, n_ctx: usize) -> usize {
    let row = hp.head_dim_k as usize * hp.n_head_kv as usize;
    2 * hp.n_layer as usize * row_bytes(ty, row * ggml_cells(n_ctx))
}

/// `n_layers` pairs of zeroed K/V tensors `[row, cells]` of type `ty` in `ctx`.
fn zeroed_rows(
    ctx: &Context,
    ty: GgmlType,
    row: usize,
    cells: usize,
    n_layers: usize,
) -> Result<(Vec<TensorId>, Vec<TensorId>)> {
    let mut k = Vec::with_capacity(n_layers);
    let mut v = Vec::with_capacity(n_layers);
    for _ in 0..n_layers {
        for dst in [&mut k, &mut v] {
            let t = ctx.new_tensor(ty.id(), &[row as i64, cells as i64])?;
            // Never-written cells are masked, but masked-out NaN garbage would still poison
            // the weighted sum (0 × NaN): llama.cpp clears its cache buffer the same way.
            t.zero()?;
            dst.push(t.id());
        }
    }
    Ok((k, v))
}

/// The f16 mask `[n_kv][n]` for `n` queries at positions `n_past..`: query at `p` sees the
/// cell holding position `q` (`pos(cell)`, None: never written) when `q <= p` and, through a
/// window of `w` tokens, `p - q < w` (llama.cpp's standard sliding window).
fn mask_bytes(
    n_past: usize,
    n: usize,
    n_kv: usize,
    w: usize,
    pos: impl Fn(usize) -> Option<usize>,
) -> Vec<u8> {
    let (zero, ninf) = (f16::ZERO.to_le_bytes(), f16::NEG_INFINITY.to_le_bytes());
    let mut m = Vec::with_capacity(n * n_kv * 2);
    for i in 0..n {
        let p = n_past + i;
        for j in 0..n_kv {
            let keep = pos(j).is_some_and(|q| q <= p && p - q < w);
            m.extend_from_slice(if keep { &zero } else { &ninf });
        }
    }
    m
}

/// Writes the new `k`/`v [hd, nkv, n]` into cells `idxs` of `kc`/`vc` and attends `q [hd,
/// nh, n]` over their first `n_kv` cells through `mask` with flash attention, as llama.cpp
/// does; returns `[hd, nh, n]` (ggml's layout after the permute).
#[allow(clippy::too_many_arguments)]
fn flash_over_cells<'c>(
    ctx: &'c Context,
    graph: &Graph<'c>,
    kc: Tensor<'c>,
    vc: Tensor<'c>,
    idxs: Tensor<'c>,
    mask: Tensor<'c>,
    n_kv: usize,
    q: Tensor<'c>,
    k: Tensor<'c>,
    v: Tensor<'c>,
    scale: f32,
) -> Result<Tensor<'c>> {
    let [hd, _, n, _] = q.ne();
    let nkv = k.ne()[1];
    graph.expand(ctx.set_rows(kc, ctx.reshape_2d(k, hd * nkv, n)?, idxs)?);
    graph.expand(ctx.set_rows(vc, ctx.reshape_2d(v, hd * nkv, n)?, idxs)?);
    let view = |c: Tensor<'c>| -> Result<Tensor<'c>> {
        let v = ctx.view_3d(
            c,
            [hd, nkv, n_kv as i64],
            c.row_bytes(hd),
            c.row_bytes(hd * nkv),
            0,
        )?;
        ctx.permute(v, [0, 2, 1, 3])
    };
    let qp = ctx.permute(q, [0, 2, 1, 3])?;
    ctx.flash_attn_f32acc(qp, view(kc)?, view(vc)?, Some(mask), scale)
}

/// Our cache's companion for window layers whose window is shorter than the context: their
/// last `n_swa` tokens (and room for one sub-batch) kept in q8_0, in a ring of cells
/// (position `p` in cell `p % cells`), attended through the window mask with flash attention.
/// Their memory stays bounded by the window whatever the context, as in llama.cpp. q8_0
/// rather than f16: ggml's flash attention reads f16 cells through other kernels for one
/// query (split over the cells) and for a batch (tiled), whose roundings differ, so with f16
/// a batch would not give the logits of the same tokens decoded one by one; its q8_0 kernel
/// is the same for both, and q8_0 is near-lossless (llama.cpp's q8_0 cache: KLD 0.004 on
/// Qwen2.5-Coder-1.5B).
pub(crate) struct WindowKv {
    ctx: Context,
    k: Vec<TensorId>,
    v: Vec<TensorId>,
    /// Per model layer: its index in `k`/`v` (window layers) or None.
    slot: Vec<Option<usize>>,
    cells: usize,
    n_swa: usize,
    bytes: usize,
}

/// Most tokens one sub-batch may add to a window ring (longer ones are split).
const RING_SLACK: usize = 256;
const RING_TYPE: GgmlType = GgmlType::Q8_0;

impl WindowKv {
    /// Cells of the ring: the window plus one sub-batch, in llama.cpp's 256-cell pads.
    pub(crate) fn cells(n_swa: usize) -> usize {
        (n_swa + RING_SLACK).div_ceil(256) * 256
    }

    /// Bytes of the rings of a model's window layers.
    pub(crate) fn bytes_for(hp: &ModelHparams) -> usize {
        let n = hp.swa_layers.iter().filter(|&&s| s).count();
        let row = hp.head_dim_k as usize * hp.n_head_kv as usize;
        2 * n * row_bytes(RING_TYPE, row * Self::cells(hp.n_swa as usize))
    }

    fn new(hp: &ModelHparams) -> Result<Self> {
        let n = hp.swa_layers.iter().filter(|&&s| s).count();
        let row = hp.head_dim_k as usize * hp.n_head_kv as usize;
        let cells = Self::cells(hp.n_swa as usize);
        let bytes = Self::bytes_for(hp);
        if row % RING_TYPE.block_size() as usize != 0 {
            return Err(Error::Unsupported(format!(
                "sliding-window layers with {row} K/V elements per token: the window ring \
                 stores q8_0 blocks of 32"
            )));
        }
        let ctx = Context::new(bytes + Context::overhead(2 * n, 0), false)?;
        let (k, v) = zeroed_rows(&ctx, RING_TYPE, row, cells, n)?;
        let mut next = 0;
        let slot = hp
            .swa_layers
            .iter()
            .map(|&s| {
                s.then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        Ok(Self {
            ctx,
            k,
            v,
            slot,
            cells,
            n_swa: hp.n_swa as usize,
            bytes,
        })
    }

    fn t(&self, id: TensorId) -> Tensor<'_> {
        id.get(&self.ctx)
    }

    /// Which position cell `c` holds once positions `..=last` are written.
    fn pos(&self, c: usize, last: usize) -> Option<usize> {
        (c <= last).then(|| last - (last - c) % self.cells)
    }
}

impl GgmlKv {
    fn new(hp: &ModelHparams, ty: GgmlType, rotate: bool, n_ctx: usize) -> Result<Self> {
        let hd = hp.head_dim_k as usize;
        let blck = ty.block_size() as usize;
        if hd % blck != 0 {
            return Err(Error::BlockMismatch {
                cache: format!("{ty}"),
                head_dim: hd,
                block: blck,
            });
        }
        let row = hd * hp.n_head_kv as usize;
        let bytes = ggml_cache_bytes(ty, hp, n_ctx);
        let n_ctx = ggml_cells(n_ctx);
        let (rk, rv) = if rotate {
            crate::quant::llama_rotation_blocks(hd)
        } else {
            (0, 0)
        };
        let rot_bytes = 4 * (rk * rk + rv * rv);
        let ctx = Context::new(
            bytes + rot_bytes + Context::overhead(2 * hp.n_layer as usize + 4, 0),
            false,
        )?;
        let (k, v) = zeroed_rows(&ctx, ty, row, n_ctx, hp.n_layer as usize)?;
        let rot = |n: usize| -> Result<Option<TensorId>> {
            if n == 0 {
                return Ok(None);
            }
            let t = ctx.new_f32(&[n as i64, n as i64])?;
            t.set_f32(&hadamard_matrix(n))?;
            Ok(Some(t.id()))
        };
        let (rot_k, rot_v) = (rot(rk)?, rot(rv)?);
        let n_swa = if hp.swa_layers.iter().any(|&s| s) {
            hp.n_swa as usize
        } else {
            0
        };
        Ok(Self {
            ctx,
            k,
            v,
            rot_k,
            rot_v,
            n_ctx,
            bytes,
            n_swa,
        })
    }

    fn t(&self, id: TensorId) -> Tensor<'_> {
        id.get(&self.ctx)
    }
}

/// Writes K/V of the new tokens; its output only orders the attention op after it.
struct OttWrite<'a> {
    cache: &'a RwLock<OttCache>,
    layer: usize,
    n: usize,
    err: &'a Mutex<Option<Error>>,
}

impl CustomOp for OttWrite<'_> {
    fn compute(
        &self,
        args: &[&[f32]],
        _: Range<usize>,
        out: &mut [f32],
    ) -> std::result::Result<(), String> {
        out.fill(0.0);
        let mut c = self
            .cache
            .write()
            .map_err(|_| keep(self.err, Error::Poisoned("cache")))?;
        c.append(self.layer, args[0], args[1], self.n)
            .map_err(|e| keep(self.err, e.into()))
    }
    fn fail(&self, msg: String) {
        record(self.err, Error::Ggml(msg));
    }
    fn parallel(&self) -> bool {
        false
    }
}

/// Attention of the new tokens' queries over the cache, rows split over ggml's threads.
struct OttAttend<'a> {
    cache: &'a RwLock<OttCache>,
    layer: usize,
    n: usize,
    n_head: usize,
    scale: f32,
    err: &'a Mutex<Option<Error>>,
}

impl CustomOp for OttAttend<'_> {
    fn compute(
        &self,
        args: &[&[f32]],
        rows: Range<usize>,
        out: &mut [f32],
    ) -> std::result::Result<(), String> {
        if rows.is_empty() {
            return Ok(());
        }
        let c = self
            .cache
            .read()
            .map_err(|_| keep(self.err, Error::Poisoned("cache")))?;
        c.attend(
            self.layer,
            args[0],
            self.n,
            self.n_head,
            self.scale,
            rows,
            out,
        )
        .map_err(|e| keep(self.err, e.into()))
    }
    fn fail(&self, msg: String) {
        record(self.err, Error::Ggml(msg));
    }
    fn parallel(&self) -> bool {
        true
    }
}

/// Records the typed error for `Session` and hands ggml its text.
fn keep(err: &Mutex<Option<Error>>, e: Error) -> String {
    let msg = e.to_string();
    record(err, e);
    msg
}

/// The first error of a compute wins; ggml's report of the same failure comes after it.
fn record(err: &Mutex<Option<Error>>, e: Error) {
    if let Ok(mut slot) = err.lock() {
        slot.get_or_insert(e);
    }
}

pub(crate) struct OttKv {
    cache: RwLock<OttCache>,
    err: Mutex<Option<Error>>,
    /// Window layers kept in rings, when the window is shorter than the context.
    window: Option<WindowKv>,
    /// Per model layer: its layer in `cache`, or None for a layer of `window`.
    ott_layer: Vec<Option<usize>>,
}

/// One graph's custom ops, alive while it is built and computed: per layer of our cache, a
/// write and an attention for each run of tokens between two flush points.
pub(crate) struct OttOps<'a> {
    /// The runs, as ranges of the graph's tokens of this sequence.
    runs: Vec<Range<usize>>,
    writes: Vec<Vec<OttWrite<'a>>>,
    attends: Vec<Vec<OttAttend<'a>>>,
}

impl OttOps<'_> {
    /// Nodes the runs add to a graph beyond one run per layer.
    pub(crate) fn extra_nodes(&self, n_layer: usize) -> usize {
        (self.runs.len() - 1) * n_layer * 8
    }
}

pub(crate) enum Kv {
    Ggml(GgmlKv),
    Ott(Box<OttKv>),
}

/// Whether our cache keeps `hp`'s window layers in rings beside it at `n_ctx` tokens: only
/// where the window can cut a token off; shorter contexts put every layer in our cache.
fn window_cuts(hp: &ModelHparams, n_ctx: usize) -> bool {
    hp.swa_layers.iter().any(|&s| s) && n_ctx > hp.n_swa as usize
}

/// The shape of our cache for `hp` at `n_ctx` tokens (without the layers a window ring
/// holds).
fn ott_shape(hp: &ModelHparams, n_ctx: usize) -> CacheShape {
    let windowed = if window_cuts(hp, n_ctx) {
        hp.swa_layers.iter().filter(|&&s| s).count()
    } else {
        0
    };
    CacheShape {
        n_layer: hp.n_layer as usize - windowed,
        n_head_kv: hp.n_head_kv as usize,
        head_dim: hp.head_dim_k as usize,
        max_tokens: n_ctx,
    }
}

/// Tokens `r` of `x [hd, heads, n]`.
pub(crate) fn tokens<'c>(ctx: &'c Context, x: Tensor<'c>, r: &Range<usize>) -> Result<Tensor<'c>> {
    let ne = x.ne();
    let (nb1, nb2) = (x.row_bytes(ne[0]), x.row_bytes(ne[0] * ne[1]));
    ctx.view_3d(x, [ne[0], ne[1], r.len() as i64], nb1, nb2, r.start * nb2)
}

/// `parts` (non-empty) joined along `dim`, pairwise so that each element is copied
/// log2(parts) times rather than once per later part.
pub(crate) fn join<'c>(
    ctx: &'c Context,
    mut parts: Vec<Tensor<'c>>,
    dim: usize,
) -> Result<Tensor<'c>> {
    while parts.len() > 1 {
        parts = parts
            .chunks(2)
            .map(|p| match p {
                [a, b] => ctx.concat(*a, *b, dim),
                [a] => Ok(*a),
                _ => unreachable!("chunks of 2"),
            })
            .collect::<Result<_>>()?;
    }
    parts
        .pop()
        .ok_or_else(|| Error::InvalidArgument("nothing to join".into()))
}

/// Closed-form bytes our cache `cfg` allocates for `hp` holding `n_tokens` tokens (its window
/// rings included), as `Kv::bytes` reports them.
pub(crate) fn ott_expected_bytes(
    cfg: &crate::cache::CacheConfig,
    hp: &ModelHparams,
    n_tokens: usize,
) -> Result<usize> {
    let shape = ott_shape(hp, n_tokens);
    let ring = if window_cuts(hp, n_tokens) {
        WindowKv::bytes_for(hp)
    } else {
        0
    };
    Ok(crate::cache::expected_memory(cfg, &shape, n_tokens)?.total + ring)
}

impl Kv {
    pub fn new(kind: &CacheKind, hp: &ModelHparams, n_ctx: usize) -> Result<Self> {
        match kind {
            CacheKind::Block { ty, rotate } => {
                Ok(Kv::Ggml(GgmlKv::new(hp, ty.ggml_type(), *rotate, n_ctx)?))
            }
            CacheKind::Ott(cfg) => {
                // Our cache attends over every token it holds; where a window can cut some
                // off, the window layers keep their window in a ring beside it instead.
                let windowed = hp.swa_layers.iter().filter(|&&s| s).count();
                if window_cuts(hp, n_ctx) && windowed == hp.n_layer as usize {
                    return Err(Error::Unsupported(format!(
                        "our cache ({cfg}) on {}: every layer has a {}-token sliding window, \
                         shorter than n_ctx {n_ctx}, which leaves no layer for our cache; use \
                         n_ctx <= {} or a ggml cache (f16, q8_0, q4_0)",
                        hp.arch, hp.n_swa, hp.n_swa
                    )));
                }
                let window = window_cuts(hp, n_ctx)
                    .then(|| WindowKv::new(hp))
                    .transpose()?;
                let mut next = 0;
                let ott_layer = (0..hp.n_layer as usize)
                    .map(|l| match &window {
                        Some(w) if w.slot[l].is_some() => None,
                        _ => {
                            next += 1;
                            Some(next - 1)
                        }
                    })
                    .collect();
                Ok(Kv::Ott(Box::new(OttKv {
                    cache: RwLock::new(OttCache::new(cfg.clone(), ott_shape(hp, n_ctx))?),
                    err: Mutex::new(None),
                    window,
                    ott_layer,
                })))
            }
        }
    }

    /// KV bytes allocated now.
    pub fn bytes(&self) -> usize {
        match self {
            Kv::Ggml(g) => g.bytes,
            Kv::Ott(o) => {
                o.cache.read().map(|c| c.memory().total).unwrap_or(0)
                    + o.window.as_ref().map_or(0, |w| w.bytes)
            }
        }
    }

    /// What our cache decided from the data, and its closed-form memory at `n_tokens` with
    /// those decisions, window rings included (None for the ggml caches, which decide
    /// nothing).
    pub fn choices(&self, n_tokens: usize) -> Option<(crate::cache::CacheChoices, usize)> {
        let Kv::Ott(o) = self else { return None };
        let c = o.cache.read().ok()?;
        let bytes = c.expected_memory_at(n_tokens).ok()?.total;
        Some((
            c.choices(),
            bytes + o.window.as_ref().map_or(0, |w| w.bytes),
        ))
    }

    pub fn reset(&mut self) -> Result<()> {
        let zero = |ctx: &Context, ts: &[TensorId]| -> Result<()> {
            for &t in ts {
                t.get(ctx).zero()?;
            }
            Ok(())
        };
        match self {
            Kv::Ggml(g) => {
                zero(&g.ctx, &g.k)?;
                zero(&g.ctx, &g.v)?;
            }
            Kv::Ott(o) => {
                o.cache
                    .get_mut()
                    .map_err(|_| Error::Poisoned("cache"))?
                    .reset()?;
                *o.err
                    .get_mut()
                    .map_err(|_| Error::Poisoned("cache error"))? = None;
                if let Some(w) = &o.window {
                    zero(&w.ctx, &w.k)?;
                    zero(&w.ctx, &w.v)?;
                }
            }
        }
        Ok(())
    }

    /// How `n` new tokens after `n_past` must be split into graphs: a window ring takes at
    /// most `RING_SLACK` tokens at once; otherwise one graph takes them all (our cache's flush
    /// points are handled inside the graph, see `ops`).
    pub fn plan(&self, n_past: usize, n: usize) -> Result<Vec<Range<usize>>> {
        match self {
            Kv::Ott(o) if o.window.is_some() => {
                debug_assert_eq!(
                    o.cache.read().ok().and_then(|c| c.layer_len(0).ok()),
                    Some(n_past)
                );
                Ok((0..n)
                    .step_by(RING_SLACK)
                    .map(|s| s..(s + RING_SLACK).min(n))
                    .collect())
            }
            _ => Ok(std::iter::once(0..n).collect()),
        }
    }

    /// The ops of one graph of `n` new tokens (only our cache needs them): each query must see
    /// the cache as it would decoded alone, so the tokens are cut at the cache's flush points
    /// into runs, each appended and then attended before the next is appended.
    pub fn ops(&self, n: usize, n_head: usize, scale: f32) -> Result<Option<OttOps<'_>>> {
        let Kv::Ott(o) = self else { return Ok(None) };
        let runs = o
            .cache
            .read()
            .map_err(|_| Error::Poisoned("cache"))?
            .plan_subbatches(0, n)?;
        let layers = o.ott_layer.iter().flatten().copied();
        let per_run = |layer: usize| {
            let writes = runs
                .iter()
                .map(|r| OttWrite {
                    cache: &o.cache,
                    layer,
                    n: r.len(),
                    err: &o.err,
                })
                .collect();
            let attends = runs
                .iter()
                .map(|r| OttAttend {
                    cache: &o.cache,
                    layer,
                    n: r.len(),
                    n_head,
                    scale,
                    err: &o.err,
                })
                .collect();
            (writes, attends)
        };
        let (writes, attends) = layers.map(per_run).unzip();
        Ok(Some(OttOps {
            runs,
            writes,
            attends,
        }))
    }

    /// Graph inputs for a sub-batch of `n` tokens after `n_past`.
    pub fn inputs<'c>(&self, ctx: &'c Context, n_past: usize, n: usize) -> Result<KvInputs<'c>> {
        let input = |ty: GgmlType, ne: &[i64]| -> Result<Tensor<'c>> {
            let t = ctx.new_tensor(ty.id(), ne)?;
            t.set_input();
            Ok(t)
        };
        match self {
            Kv::Ggml(g) => {
                // llama.cpp pads the attended length to 256 cells so graphs repeat; masked
                // cells contribute exactly zero, so the padding only keeps the shapes alike.
                let n_kv = (n_past + n)
                    .div_ceil(256)
                    .max(1)
                    .saturating_mul(256)
                    .min(g.n_ctx);
                let mask_shape = [n_kv as i64, n as i64];
                Ok(KvInputs {
                    idxs: Some(input(GgmlType::I64, &[n as i64])?),
                    mask: Some(input(GgmlType::F16, &mask_shape)?),
                    mask_swa: if g.n_swa > 0 {
                        Some(input(GgmlType::F16, &mask_shape)?)
                    } else {
                        None
                    },
                    n_kv,
                    ring: None,
                })
            }
            Kv::Ott(o) => Ok(KvInputs {
                idxs: None,
                mask: None,
                mask_swa: None,
                n_kv: n_past + n,
                ring: match &o.window {
                    Some(w) => Some((
                        input(GgmlType::I64, &[n as i64])?,
                        input(GgmlType::F16, &[w.cells as i64, n as i64])?,
                    )),
                    None => None,
                },
            }),
        }
    }

    /// Fills the inputs once the graph is allocated.
    pub fn fill_inputs(&self, inp: &KvInputs<'_>, n_past: usize, n: usize) -> Result<()> {
        let cells_of = |f: &dyn Fn(usize) -> usize| -> Vec<u8> {
            (n_past..n_past + n)
                .flat_map(|p| (f(p) as i64).to_le_bytes())
                .collect()
        };
        if let (Some(idxs), Some(mask)) = (inp.idxs, inp.mask) {
            // Cell j holds position j.
            idxs.set_bytes(&cells_of(&|p| p))?;
            mask.set_bytes(&mask_bytes(n_past, n, inp.n_kv, usize::MAX, Some))?;
            if let (Some(ms), Kv::Ggml(g)) = (inp.mask_swa, self) {
                ms.set_bytes(&mask_bytes(n_past, n, inp.n_kv, g.n_swa, Some))?;
            }
        }
        let ring = match self {
            Kv::Ott(o) => o.window.as_ref(),
            Kv::Ggml(_) => None,
        };
        if let (Some((idxs, mask)), Some(w)) = (inp.ring, ring) {
            idxs.set_bytes(&cells_of(&|p| p % w.cells))?;
            let last = n_past + n - 1;
            mask.set_bytes(&mask_bytes(n_past, n, w.cells, w.n_swa, |c| w.pos(c, last)))?;
        }
        Ok(())
    }

    /// Attention of layer `layer` for new `q [hd, nh, n]`, `k`/`v [hd, nkv, n]` (post-RoPE),
    /// returning `[hd * nh, n]`; `swa`: through the sliding window.
    #[allow(clippy::too_many_arguments)]
    pub fn attention<'c>(
        &'c self,
        ctx: &'c Context,
        graph: &Graph<'c>,
        inp: &KvInputs<'c>,
        ops: Option<&'c OttOps<'c>>,
        layer: usize,
        q: Tensor<'c>,
        k: Tensor<'c>,
        v: Tensor<'c>,
        scale: f32,
        swa: bool,
    ) -> Result<Tensor<'c>> {
        let [hd, nh, n, _] = q.ne();
        match self {
            Kv::Ggml(g) => {
                let rot = |x: Tensor<'c>, r: Option<TensorId>| -> Result<Tensor<'c>> {
                    let Some(r) = r else { return Ok(x) };
                    let h = g.t(r);
                    let m = h.ne()[0];
                    let x2 = ctx.reshape_2d(x, m, x.n_elements() as i64 / m)?;
                    let y = ctx.mul_mat_hadamard(h, x2)?;
                    let ne = x.ne();
                    ctx.reshape_3d(y, ne[0], ne[1], ne[2])
                };
                let (q, k, v) = (rot(q, g.rot_k)?, rot(k, g.rot_k)?, rot(v, g.rot_v)?);
                let idxs = inp.idxs.expect("ggml inputs");
                let mask = match (swa, inp.mask_swa) {
                    (true, Some(m)) => m,
                    _ => inp.mask.expect("ggml inputs"),
                };
                let (kc, vc) = (g.t(g.k[layer]), g.t(g.v[layer]));
                let o = flash_over_cells(ctx, graph, kc, vc, idxs, mask, inp.n_kv, q, k, v, scale)?;
                let o = ctx.reshape_2d(o, hd * nh, n)?;
                match g.rot_v {
                    None => Ok(o),
                    Some(r) => {
                        let h = g.t(r);
                        let m = h.ne()[0];
                        let y = ctx.mul_mat_hadamard(
                            h,
                            ctx.reshape_2d(o, m, o.n_elements() as i64 / m)?,
                        )?;
                        ctx.reshape_2d(y, hd * nh, n)
                    }
                }
            }
            Kv::Ott(o) => match (&o.window, o.ott_layer[layer]) {
                (Some(w), None) => {
                    let slot = w.slot[layer].expect("a layer outside our cache has a ring");
                    let (idxs, mask) = inp.ring.expect("ring inputs");
                    let (kc, vc) = (w.t(w.k[slot]), w.t(w.v[slot]));
                    let o =
                        flash_over_cells(ctx, graph, kc, vc, idxs, mask, w.cells, q, k, v, scale)?;
                    ctx.reshape_2d(o, hd * nh, n)
                }
                (_, ott) => {
                    let l = ott.expect("every layer without a ring is in our cache");
                    let ops = ops.expect("our cache builds with its ops");
                    // A run's write takes the previous run's attention as an input, which
                    // orders it after that attention.
                    let mut outs: Vec<Tensor<'c>> = Vec::with_capacity(ops.runs.len());
                    for (i, r) in ops.runs.iter().enumerate() {
                        let mut args = vec![tokens(ctx, k, r)?, tokens(ctx, v, r)?];
                        args.extend(outs.last().copied());
                        let w = ctx.custom_op([1, 1, 1, 1], &args, &ops.writes[l][i])?;
                        outs.push(ctx.custom_op(
                            [hd, nh, r.len() as i64, 1],
                            &[tokens(ctx, q, r)?, w],
                            &ops.attends[l][i],
                        )?);
                    }
                    ctx.reshape_2d(join(ctx, outs, 2)?, hd * nh, n)
                }
            },
        }
    }

    /// The first error a custom op recorded during the last compute, if any.
    pub fn take_error(&self) -> Option<Error> {
        match self {
            Kv::Ott(o) => o.err.lock().ok().and_then(|mut e| e.take()),
            Kv::Ggml(_) => None,
        }
    }
}
