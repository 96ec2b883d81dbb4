//! A GGUF model's weights as ggml tensors that point into the memory map (nothing is copied or
//! read ahead: pages come in as the matmuls touch them).

use super::check::{check_model, slots};
use crate::error::{Error, Result};
use crate::ggml::{sys, Context, Tensor};
use crate::gguf::{GgufFile, ModelHparams};
use std::collections::HashMap;
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
    /// Maps `path`, checks everything [`check_model`] checks (hyperparameters, vocabulary,
    /// every tensor's presence, shape and type) and binds the weights as ggml tensors over
    /// the mapping.
    pub fn load(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let checked = check_model(file.gguf())?;
        let (arch, hp) = (checked.arch, checked.hparams);
        let slots = slots(arch, &hp);
        let ctx = Context::new(Context::overhead(slots.len() + 8, 0), true)?;
        // The bound tensor of every slot present in the file, by name.
        let mut bound: HashMap<&str, W> = HashMap::with_capacity(slots.len());
        for s in &slots {
            let Some(info) = file.gguf().tensor(&s.name) else {
                continue;
            };
            let ne: Vec<i64> = info.dims.iter().map(|&d| d as i64).collect();
            let t = ctx.new_tensor(info.ggml_type.id(), &ne)?;
            // SAFETY: the data slice is exactly the tensor's bytes (the parser checked sizes),
            // lives in `file`'s mapping which outlives `ctx` (field order), and ggml only
            // reads weights.
            unsafe { t.bind_external(file.tensor_data(&s.name)?)? };
            let w = NonNull::new(t.as_ptr())
                .ok_or_else(|| Error::Ggml(format!("ggml returned no tensor for {}", s.name)))?;
            bound.insert(s.name.as_str(), W(w));
        }
        // check_model proved every required slot present, so these lookups succeed.
        let get = |name: &str| -> Result<W> {
            bound.get(name).copied().ok_or_else(|| {
                Error::Gguf(crate::gguf::GgufError::TensorNotFound {
                    name: name.to_owned(),
                })
            })
        };
        let opt = |name: &str| bound.get(name).copied();
        let tok_embd = get("token_embd.weight")?;
        let output_norm = get("output_norm.weight")?;
        let output = opt("output.weight").unwrap_or(tok_embd);
        let mut layers = Vec::with_capacity(hp.n_layer as usize);
        for l in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            layers.push(LayerWeights {
                attn_norm: get(&n("attn_norm.weight"))?,
                wq: get(&n("attn_q.weight"))?,
                wk: get(&n("attn_k.weight"))?,
                wv: get(&n("attn_v.weight"))?,
                bq: opt(&n("attn_q.bias")),
                bk: opt(&n("attn_k.bias")),
                bv: opt(&n("attn_v.bias")),
                wo: get(&n("attn_output.weight"))?,
                ffn_norm: get(&n("ffn_norm.weight"))?,
                ffn_gate: get(&n("ffn_gate.weight"))?,
                ffn_up: get(&n("ffn_up.weight"))?,
                ffn_down: get(&n("ffn_down.weight"))?,
            });
        }
        Ok(Model {
            ctx,
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
        let _ = &self.ctx;
        Tensor::from_raw(w.0.as_ptr()).expect("weight pointers are non-null")
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn file_size(&self) -> u64 {
        self.file.file_size()
    }
}
