//! A GGUF model's weights as ggml tensors that point into the memory map (nothing is copied or
//! read ahead: pages come in as the matmuls touch them).

use super::check::{check_model, slots};
use crate::error::{Error, Result};
use crate::ggml::repack::{Candidate, ExtraWeights};
use crate::ggml::{MappedWeights, Tensor, TensorId};
use crate::gguf::{GgufFile, ModelHparams};
use std::collections::HashMap;
use std::path::Path;

/// A weight tensor: a ggml tensor owned by `Model` (over the mapping, or a repacked copy).
#[derive(Clone, Copy)]
pub(crate) struct W(TensorId);

pub(crate) struct LayerWeights {
    pub attn_norm: W,
    pub wq: W,
    pub wk: W,
    pub wv: W,
    pub bq: Option<W>,
    pub bk: Option<W>,
    pub bv: Option<W>,
    /// Per-head RMSNorm weights of q and k (qwen3, gemma3), `[head_dim]`.
    pub q_norm: Option<W>,
    pub k_norm: Option<W>,
    pub wo: W,
    /// gemma3: RMSNorm weights of the attention and FFN outputs before their residual adds.
    pub attn_post_norm: Option<W>,
    pub ffn_norm: W,
    pub ffn_post_norm: Option<W>,
    pub ffn_gate: W,
    pub ffn_up: W,
    pub ffn_down: W,
}

/// Architectures the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    /// The `general.architecture` name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Gemma3]
            .into_iter()
            .find(|a| a.name() == name)
    }

    /// Whether q and k go through a per-head RMSNorm before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }
}

/// A loaded model: hyperparameters, the mapping and ggml tensors over it.
pub struct Model {
    weights: MappedWeights,
    /// Matmul weights that ggml's CPU extra buffer types took (repacked copies, as llama.cpp
    /// keeps them); the handles below point there for those, so it lives as long as they do.
    _extra: ExtraWeights,
    pub(crate) tok_embd: W,
    pub(crate) output_norm: W,
    pub(crate) output: W,
    /// Llama 3 RoPE frequency factors `[rope_dim / 2]`, shared by every layer.
    pub(crate) rope_freqs: Option<W>,
    pub(crate) layers: Vec<LayerWeights>,
    pub arch: Arch,
    pub hparams: ModelHparams,
}

// Sessions on several threads share one model.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Model>();
};

impl Model {
    /// Maps `path`, checks everything [`check_model`] checks (hyperparameters, vocabulary,
    /// every tensor's presence, shape and type) and binds the weights as ggml tensors over
    /// the mapping.
    pub fn load(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let checked = check_model(file.gguf())?;
        let (arch, hp) = (checked.arch, checked.hparams);
        let slots = slots(arch, &hp);
        let mut weights = MappedWeights::new(file, slots.len())?;
        // The bound tensor of every slot present in the file, by name.
        let mut bound: HashMap<&str, W> = HashMap::with_capacity(slots.len());
        for s in &slots {
            if let Some(id) = weights.bind(&s.name)? {
                bound.insert(s.name.as_str(), W(id));
            }
        }
        let file = weights.file();
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
        let output_name = if opt("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let mut output = opt("output.weight").unwrap_or(tok_embd);
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
                q_norm: opt(&n("attn_q_norm.weight")),
                k_norm: opt(&n("attn_k_norm.weight")),
                wo: get(&n("attn_output.weight"))?,
                attn_post_norm: opt(&n("post_attention_norm.weight")),
                ffn_norm: get(&n("ffn_norm.weight"))?,
                ffn_post_norm: opt(&n("post_ffw_norm.weight")),
                ffn_gate: get(&n("ffn_gate.weight"))?,
                ffn_up: get(&n("ffn_up.weight"))?,
                ffn_down: get(&n("ffn_down.weight"))?,
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
            weights,
            _extra: extra,
            tok_embd,
            output_norm,
            output,
            rope_freqs: opt("rope_freqs.weight"),
            layers,
            arch,
            hparams: hp,
        })
    }

    /// The tensor behind a weight handle, borrowed from the model.
    pub(crate) fn t(&self, w: W) -> Tensor<'_> {
        w.0.get(self)
    }

    pub fn path(&self) -> &Path {
        self.weights.file().path()
    }

    pub fn file_size(&self) -> u64 {
        self.weights.file().file_size()
    }
}
