//! The engine's KV caches: llama.cpp's own block types as ggml tensors (written with
//! `ggml_set_rows`, read by `ggml_flash_attn_ext`, as llama.cpp does), or our OTT cache as a
//! pair of custom ops (cache write on one thread, then attention on all of them).

use crate::cache::{CacheShape, OttCache};
use crate::error::{Error, Result};
use crate::ggml::{sys, Context, CustomOp, Graph, Tensor};
use crate::gguf::ModelHparams;
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
}

pub(crate) struct GgmlKv {
    ctx: Context,
    // [hd * n_head_kv, n_ctx] per layer, raw pointers into `ctx`
    k: Vec<*mut sys::ggml_tensor>,
    v: Vec<*mut sys::ggml_tensor>,
    /// Hadamard matrices `[n, n]` f32 for K and V (None: no rotation).
    rot_k: Option<*mut sys::ggml_tensor>,
    rot_v: Option<*mut sys::ggml_tensor>,
    n_ctx: usize,
    bytes: usize,
    /// Sliding window in tokens (0: no layer has one).
    n_swa: usize,
}

// SAFETY: the raw tensor pointers all point into `ctx`, which GgmlKv owns and moves with it;
// nothing in here is tied to a thread.
unsafe impl Send for GgmlKv {}

fn hadamard_matrix(n: usize) -> Vec<f32> {
    let mut m = vec![0f32; n * n];
    for (i, row) in m.chunks_exact_mut(n).enumerate() {
        row[i] = 1.0;
        crate::quant::hadamard_blocks(row, n);
    }
    m
}

impl GgmlKv {
    fn new(hp: &ModelHparams, ty: sys::ggml_type, rotate: bool, n_ctx: usize) -> Result<Self> {
        let hd = hp.head_dim_k as usize;
        // SAFETY: ty is one of our ggml type constants.
        let blck = unsafe { sys::ggml_blck_size(ty) } as usize;
        if hd % blck != 0 {
            return Err(Error::InvalidArgument(format!(
                "head_dim {hd} is not a multiple of the {blck}-element block of this cache type (llama.cpp refuses it too)"
            )));
        }
        let row = hd * hp.n_head_kv as usize;
        // llama.cpp rounds its cache up to whole 256-cell pads; the same cell count gives the
        // same attended lengths, hence bit-identical flash attention.
        let n_ctx = n_ctx.div_ceil(256) * 256;
        let (rk, rv) = if rotate {
            crate::quant::llama_rotation_blocks(hd)
        } else {
            (0, 0)
        };
        // SAFETY: pure size computation.
        let bytes =
            2 * hp.n_layer as usize * unsafe { sys::ggml_row_size(ty, (row * n_ctx) as i64) };
        let rot_bytes = 4 * (rk * rk + rv * rv);
        let ctx = Context::new(
            bytes + rot_bytes + Context::overhead(2 * hp.n_layer as usize + 4, 0),
            false,
        )?;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..hp.n_layer {
            for dst in [&mut k, &mut v] {
                let t = ctx.new_tensor(ty, &[row as i64, n_ctx as i64])?;
                // Never-written cells are masked, but masked-out NaN garbage would still poison
                // the weighted sum (0 × NaN): llama.cpp clears its cache buffer the same way.
                t.zero()?;
                dst.push(t.as_ptr());
            }
        }
        let rot = |n: usize| -> Result<Option<*mut sys::ggml_tensor>> {
            if n == 0 {
                return Ok(None);
            }
            let t = ctx.new_f32(&[n as i64, n as i64])?;
            t.set_f32(&hadamard_matrix(n))?;
            Ok(Some(t.as_ptr()))
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

    fn t<'c>(&'c self, p: *mut sys::ggml_tensor) -> Tensor<'c> {
        let _ = &self.ctx;
        Tensor::from_raw(p).expect("cache tensors are non-null")
    }
}

/// Writes K/V of the new tokens; its output only orders the attention op after it.
struct OttWrite<'a> {
    cache: &'a RwLock<OttCache>,
    layer: usize,
    n: usize,
    err: &'a Mutex<Option<String>>,
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
            .map_err(|_| "cache lock poisoned".to_string())?;
        c.append(self.layer, args[0], args[1], self.n)
            .map_err(|e| e.to_string())
    }
    fn fail(&self, msg: String) {
        record(self.err, msg);
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
    err: &'a Mutex<Option<String>>,
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
            .map_err(|_| "cache lock poisoned".to_string())?;
        c.attend(
            self.layer,
            args[0],
            self.n,
            self.n_head,
            self.scale,
            rows,
            out,
        )
        .map_err(|e| e.to_string())
    }
    fn fail(&self, msg: String) {
        record(self.err, msg);
    }
    fn parallel(&self) -> bool {
        true
    }
}

fn record(err: &Mutex<Option<String>>, msg: String) {
    if let Ok(mut e) = err.lock() {
        e.get_or_insert(msg);
    }
}

pub(crate) struct OttKv {
    cache: RwLock<OttCache>,
    err: Mutex<Option<String>>,
}

/// One sub-batch's custom ops, alive while its graph is built and computed.
pub(crate) struct OttOps<'a> {
    writes: Vec<OttWrite<'a>>,
    attends: Vec<OttAttend<'a>>,
}

pub(crate) enum Kv {
    Ggml(GgmlKv),
    Ott(OttKv),
}

impl Kv {
    pub fn new(kind: &CacheKind, hp: &ModelHparams, n_ctx: usize) -> Result<Self> {
        match kind {
            CacheKind::Block { ty, rotate } => Ok(Kv::Ggml(GgmlKv::new(
                hp,
                ty.ggml_type().id() as sys::ggml_type,
                *rotate,
                n_ctx,
            )?)),
            CacheKind::Ott(cfg) => {
                // Our cache attends over every token it holds; a window that can cut some off
                // (a window layer, more cells than the window) would need masking inside its
                // groups, which it does not have.
                if hp.swa_layers.iter().any(|&s| s) && n_ctx > hp.n_swa as usize {
                    return Err(Error::Unsupported(format!(
                        "our cache ({cfg}) with sliding-window attention: {} has a {}-token \
                         window on {} of {} layers and n_ctx {n_ctx} exceeds it; use n_ctx \
                         <= {} or a ggml cache (f16, q8_0, q4_0)",
                        hp.arch,
                        hp.n_swa,
                        hp.swa_layers.iter().filter(|&&s| s).count(),
                        hp.n_layer,
                        hp.n_swa
                    )));
                }
                let shape = CacheShape {
                    n_layer: hp.n_layer as usize,
                    n_head_kv: hp.n_head_kv as usize,
                    head_dim: hp.head_dim_k as usize,
                    max_tokens: n_ctx,
                };
                Ok(Kv::Ott(OttKv {
                    cache: RwLock::new(OttCache::new(cfg.clone(), shape)?),
                    err: Mutex::new(None),
                }))
            }
        }
    }

    /// KV bytes allocated now.
    pub fn bytes(&self) -> usize {
        match self {
            Kv::Ggml(g) => g.bytes,
            Kv::Ott(o) => o.cache.read().map(|c| c.memory().total).unwrap_or(0),
        }
    }

    /// What our cache decided from the data, and its closed-form memory at `n_tokens` with
    /// those decisions (None for the ggml caches, which decide nothing).
    pub fn choices(&self, n_tokens: usize) -> Option<(crate::cache::CacheChoices, usize)> {
        let Kv::Ott(o) = self else { return None };
        let c = o.cache.read().ok()?;
        let bytes = c.expected_memory_at(n_tokens).ok()?.total;
        Some((c.choices(), bytes))
    }

    pub fn reset(&mut self) -> Result<()> {
        match self {
            Kv::Ggml(g) => {
                for &t in g.k.iter().chain(&g.v) {
                    Tensor::from_raw(t)?.zero()?;
                }
            }
            Kv::Ott(o) => {
                o.cache
                    .get_mut()
                    .map_err(|_| Error::InvalidArgument("cache lock poisoned".into()))?
                    .reset();
                *o.err
                    .get_mut()
                    .map_err(|_| Error::InvalidArgument("lock poisoned".into()))? = None;
            }
        }
        Ok(())
    }

    /// How `n` new tokens after `n_past` must be split so every query sees the cache state it
    /// would see when decoded alone (our cache flushes between tokens; ggml caches never do).
    pub fn plan(&self, n_past: usize, n: usize) -> Result<Vec<Range<usize>>> {
        match self {
            Kv::Ggml(_) => Ok(std::iter::once(0..n).collect()),
            Kv::Ott(o) => {
                let c = o
                    .cache
                    .read()
                    .map_err(|_| Error::InvalidArgument("cache lock poisoned".into()))?;
                debug_assert_eq!(c.layer_len(0).unwrap_or(0), n_past);
                Ok(c.plan_subbatches(0, n)?)
            }
        }
    }

    /// The ops object for one sub-batch of `n` tokens (only our cache needs one).
    pub fn ops(&self, n_layer: usize, n: usize, n_head: usize, scale: f32) -> Option<OttOps<'_>> {
        let Kv::Ott(o) = self else { return None };
        Some(OttOps {
            writes: (0..n_layer)
                .map(|layer| OttWrite {
                    cache: &o.cache,
                    layer,
                    n,
                    err: &o.err,
                })
                .collect(),
            attends: (0..n_layer)
                .map(|layer| OttAttend {
                    cache: &o.cache,
                    layer,
                    n,
                    n_head,
                    scale,
                    err: &o.err,
                })
                .collect(),
        })
    }

    /// Graph inputs for a sub-batch of `n` tokens after `n_past`.
    pub fn inputs<'c>(&self, ctx: &'c Context, n_past: usize, n: usize) -> Result<KvInputs<'c>> {
        match self {
            Kv::Ggml(g) => {
                // llama.cpp pads the attended length to 256 cells so graphs repeat; masked
                // cells contribute exactly zero, so the padding only keeps the shapes alike.
                let n_kv = (n_past + n)
                    .div_ceil(256)
                    .max(1)
                    .saturating_mul(256)
                    .min(g.n_ctx);
                let idxs = ctx.new_tensor(sys::GGML_TYPE_I64, &[n as i64])?;
                let mask = ctx.new_tensor(sys::GGML_TYPE_F16, &[n_kv as i64, n as i64])?;
                idxs.set_input();
                mask.set_input();
                let mask_swa = if g.n_swa > 0 {
                    let m = ctx.new_tensor(sys::GGML_TYPE_F16, &[n_kv as i64, n as i64])?;
                    m.set_input();
                    Some(m)
                } else {
                    None
                };
                Ok(KvInputs {
                    idxs: Some(idxs),
                    mask: Some(mask),
                    mask_swa,
                    n_kv,
                })
            }
            Kv::Ott(_) => Ok(KvInputs {
                idxs: None,
                mask: None,
                mask_swa: None,
                n_kv: n_past + n,
            }),
        }
    }

    /// Fills the inputs once the graph is allocated.
    pub fn fill_inputs(&self, inp: &KvInputs<'_>, n_past: usize, n: usize) -> Result<()> {
        if let (Some(idxs), Some(mask)) = (inp.idxs, inp.mask) {
            let ids: Vec<u8> = (n_past..n_past + n)
                .flat_map(|p| (p as i64).to_le_bytes())
                .collect();
            idxs.set_bytes(&ids)?;
            // [n][n_kv]: query i (position n_past + i) sees cells 0..=n_past + i (cell j holds
            // position j); through a window of w tokens only those with n_past + i - j < w,
            // as llama.cpp's standard sliding window.
            let (zero, ninf) = (f16::ZERO.to_le_bytes(), f16::NEG_INFINITY.to_le_bytes());
            let build = |window: usize| {
                let mut m = Vec::with_capacity(n * inp.n_kv * 2);
                for i in 0..n {
                    let p = n_past + i;
                    for j in 0..inp.n_kv {
                        let keep = j <= p && p - j < window;
                        m.extend_from_slice(if keep { &zero } else { &ninf });
                    }
                }
                m
            };
            mask.set_bytes(&build(usize::MAX))?;
            if let (Some(ms), Kv::Ggml(g)) = (inp.mask_swa, self) {
                ms.set_bytes(&build(g.n_swa))?;
            }
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
        let nkv = k.ne()[1];
        match self {
            Kv::Ggml(g) => {
                let rot = |x: Tensor<'c>, r: Option<*mut sys::ggml_tensor>| -> Result<Tensor<'c>> {
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
                graph.expand(ctx.set_rows(kc, ctx.reshape_2d(k, hd * nkv, n)?, idxs)?);
                graph.expand(ctx.set_rows(vc, ctx.reshape_2d(v, hd * nkv, n)?, idxs)?);
                let view = |c: Tensor<'c>| -> Result<Tensor<'c>> {
                    let v = ctx.view_3d(
                        c,
                        [hd, nkv, inp.n_kv as i64],
                        c.row_bytes(hd),
                        c.row_bytes(hd * nkv),
                        0,
                    )?;
                    ctx.permute(v, [0, 2, 1, 3])
                };
                let qp = ctx.permute(q, [0, 2, 1, 3])?;
                let o = ctx.flash_attn_f32acc(qp, view(kc)?, view(vc)?, Some(mask), scale)?;
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
            Kv::Ott(_) => {
                let ops = ops.expect("our cache builds with its ops");
                let w = ctx.custom_op([1, 1, 1, 1], &[k, v], &ops.writes[layer])?;
                let o = ctx.custom_op([hd, nh, n, 1], &[q, w], &ops.attends[layer])?;
                ctx.reshape_2d(o, hd * nh, n)
            }
        }
    }

    /// The first error a custom op recorded during the last compute, if any.
    pub fn take_error(&self) -> Option<String> {
        match self {
            Kv::Ott(o) => o.err.lock().ok().and_then(|mut e| e.take()),
            Kv::Ggml(_) => None,
        }
    }
}
