//! A GGUF model's weights as ggml tensors that point into the memory map (nothing is copied or
//! read ahead: pages come in as the matmuls touch them).

use crate::error::{Error, Result};
use crate::ggml::repack::{Candidate, ExtraWeights};
use crate::ggml::{sys, Context, Tensor};
use crate::gguf::{GgufFile, ModelHparams};
use std::path::Path;
use std::ptr::NonNull;

/// A weight tensor: a ggml tensor owned by `Model`'s context, data in the mapping.
#[derive(Clone, Copy)]
pub(crate) struct W(NonNull<sys::ggml_tensor>);

pub(crate) struct LayerWeights {
    pub attn_norm: W,
    pub wq: W,
    pub wk: W,
    pub wv: W,
    pub bq: Option<W>,
    pub bk: Option<W>,
    pub bv: Option<W>,
    pub wo: W,
    pub ffn_norm: W,
    pub ffn_gate: W,
    pub ffn_up: W,
    pub ffn_down: W,
}

/// Architectures the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// A loaded model: hyperparameters, the mapping and ggml tensors over it.
pub struct Model {
    // Declared before `file`: the tensors point into the mapping, so the context goes first.
    ctx: Context,
    /// Matmul weights that ggml's CPU extra buffer types took (repacked copies, as llama.cpp
    /// keeps them); the handles below point there for those.
    extra: ExtraWeights,
    pub(crate) tok_embd: W,
    pub(crate) output_norm: W,
    pub(crate) output: W,
    pub(crate) layers: Vec<LayerWeights>,
    pub arch: Arch,
    pub hparams: ModelHparams,
    file: GgufFile,
}

// SAFETY: the weight tensors are only read after loading (ggml reads weights, never writes
// them) and the mapping is immutable, so sharing a Model between threads is sound; the
// NonNull pointers are what make the type !Send/!Sync by default.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    /// Maps `path`, checks its architecture and every tensor's presence, type and shape, and
    /// binds the weights as ggml tensors over the mapping.
    pub fn load(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let hp = ModelHparams::from_gguf(file.gguf())?;
        let arch = match hp.arch.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "{}: architecture {other:?} is not supported (llama, qwen2)",
                    path.display()
                )))
            }
        };
        if hp.head_dim_k != hp.head_dim_v || hp.rope_dim != hp.head_dim_k {
            return Err(Error::InvalidArgument(format!(
                "{}: head_dim_k {} / head_dim_v {} / rope_dim {} must be equal",
                path.display(),
                hp.head_dim_k,
                hp.head_dim_v,
                hp.rope_dim
            )));
        }
        let n_tensors = file.gguf().tensors().len();
        let ctx = Context::new(Context::overhead(n_tensors + 8, 0), true)?;
        let (e, hd) = (hp.n_embd as u64, hp.head_dim_k as u64);
        let (q_dim, kv_dim) = (hp.n_head as u64 * hd, hp.n_head_kv as u64 * hd);
        let (ff, vocab) = (hp.n_ff as u64, hp.vocab_size as u64);
        let bind = |name: &str, dims: &[u64], required: bool| -> Result<Option<W>> {
            let Some(info) = file.gguf().tensor(name) else {
                return if required {
                    Err(Error::InvalidArgument(format!(
                        "{}: missing tensor {name}",
                        path.display()
                    )))
                } else {
                    Ok(None)
                };
            };
            if info.dims != dims {
                return Err(Error::InvalidArgument(format!(
                    "{}: tensor {name} has shape {:?}, expected {dims:?}",
                    path.display(),
                    info.dims
                )));
            }
            let ty = info.ggml_type.id();
            // SAFETY: ty is a valid ggml type id (the parser only accepts known ones).
            let cpu = unsafe { &*sys::ggml_get_type_traits_cpu(ty) };
            if dims.len() > 1 && cpu.vec_dot.is_none() && ty != sys::GGML_TYPE_F32 {
                return Err(Error::InvalidArgument(format!(
                    "{}: tensor {name} has type {}, which ggml's CPU backend cannot multiply",
                    path.display(),
                    info.ggml_type.name()
                )));
            }
            let ne: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
            let t = ctx.new_tensor(ty, &ne)?;
            // SAFETY: the data slice is exactly the tensor's bytes (the parser checked sizes),
            // lives in `file`'s mapping which outlives `ctx` (field order), and ggml only
            // reads weights.
            unsafe { t.bind_external(file.tensor_data(name)?)? };
            Ok(Some(W(
                NonNull::new(t.as_ptr()).expect("tensor pointer is non-null")
            )))
        };
        let req = |name: &str, dims: &[u64]| -> Result<W> {
            Ok(bind(name, dims, true)?.expect("required"))
        };
        let tok_embd = req("token_embd.weight", &[e, vocab])?;
        let output_norm = req("output_norm.weight", &[e])?;
        let output_name = if file.gguf().tensor("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let mut output = bind("output.weight", &[e, vocab], false)?.unwrap_or(tok_embd);
        let qwen = arch == Arch::Qwen2;
        let mut layers = Vec::with_capacity(hp.n_layer as usize);
        for l in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            let bias = |s: &str, d: u64| -> Result<Option<W>> { bind(&n(s), &[d], qwen) };
            layers.push(LayerWeights {
                attn_norm: req(&n("attn_norm.weight"), &[e])?,
                wq: req(&n("attn_q.weight"), &[e, q_dim])?,
                wk: req(&n("attn_k.weight"), &[e, kv_dim])?,
                wv: req(&n("attn_v.weight"), &[e, kv_dim])?,
                bq: bias("attn_q.bias", q_dim)?,
                bk: bias("attn_k.bias", kv_dim)?,
                bv: bias("attn_v.bias", kv_dim)?,
                wo: req(&n("attn_output.weight"), &[q_dim, e])?,
                ffn_norm: req(&n("ffn_norm.weight"), &[e])?,
                ffn_gate: req(&n("ffn_gate.weight"), &[e, ff])?,
                ffn_up: req(&n("ffn_up.weight"), &[e, ff])?,
                ffn_down: req(&n("ffn_down.weight"), &[ff, e])?,
            });
        }
        // Every matmul weight goes where llama.cpp would put it (a tied output gets its own
        // copy there, as llama.cpp duplicates it; the embedding lookup keeps the mapping).
        let mut roles: Vec<(&mut W, String)> = vec![(&mut output, output_name.to_string())];
        for (l, lw) in layers.iter_mut().enumerate() {
            for (w, s) in [
                (&mut lw.wq, "attn_q.weight"),
                (&mut lw.wk, "attn_k.weight"),
                (&mut lw.wv, "attn_v.weight"),
                (&mut lw.wo, "attn_output.weight"),
                (&mut lw.ffn_gate, "ffn_gate.weight"),
                (&mut lw.ffn_up, "ffn_up.weight"),
                (&mut lw.ffn_down, "ffn_down.weight"),
            ] {
                roles.push((w, format!("blk.{l}.{s}")));
            }
        }
        let mut cands = Vec::with_capacity(roles.len());
        for (_, name) in &roles {
            let info = file.gguf().tensor(name).expect("bound above");
            cands.push(Candidate {
                ty: info.ggml_type.id(),
                ne: info.dims.iter().map(|&d| d as i64).collect(),
                data: file.tensor_data(name)?,
            });
        }
        let (extra, placed) = ExtraWeights::place(&cands)?;
        for ((w, _), p) in roles.iter_mut().zip(placed) {
            if let Some(p) = p {
                **w = W(p);
            }
        }
        drop(roles);
        if extra.bytes() > 0 {
            log::info!(
                "{}: {:.1} MiB of weights repacked for the CPU's matmul kernels",
                path.display(),
                extra.bytes() as f64 / (1 << 20) as f64
            );
        }
        Ok(Model {
            ctx,
            extra,
            tok_embd,
            output_norm,
            output,
            layers,
            arch,
            hparams: hp,
            file,
        })
    }

    /// The tensor behind a weight handle, borrowed from the model.
    pub(crate) fn t(&self, w: W) -> Tensor<'_> {
        let _ = (&self.ctx, &self.extra);
        Tensor::from_raw(w.0.as_ptr()).expect("weight pointers are non-null")
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn file_size(&self) -> u64 {
        self.file.file_size()
    }
}
