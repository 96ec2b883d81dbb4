//! Everything checked about a model file in Rust before ggml or libllama sees it.
//!
//! Our engine and libllama share ggml, and ggml answers an operation it cannot do with an
//! abort, not an error: a norm weight that is not f32 dies in `binary_op: unsupported types`,
//! a matrix of a type without a CPU dot product in `mul_mat`. libllama adds asserts of its own
//! on hyperparameters and on the vocabulary. So a model is only handed on once its metadata
//! ([`ModelHparams`], [`check_vocab`]) and every tensor's name, shape and type per role have
//! been checked here; a tensor neither engine would use the same way is refused too (libllama
//! builds optional tensors such as a fused `attn_qkv` or output biases into its graph with
//! asserts of their own, which our engine would silently ignore). Likewise a hyperparameter
//! that changes libllama's graph in a way ours does not follow (YaRN or LongRoPE scaling, a
//! RoPE attention factor, per-layer head sizes) is refused, naming it.

use std::collections::HashSet;

use super::weights::Arch;
use crate::error::Result;
use crate::gguf::{check_vocab, GgmlType, Gguf, GgufError, ModelHparams, Value, VocabInfo};

/// How the forward pass uses a tensor, which decides the types ggml can take for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// `ggml_get_rows` source, and the output matrix when there is no `output.weight`.
    Embedding,
    /// `ggml_mul_mat` weight.
    Matrix,
    /// Second operand of `ggml_mul` / `ggml_add` with f32 activations (norms, biases).
    Vector,
}

/// One tensor the forward pass reads.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub name: String,
    /// ne, innermost first.
    pub dims: Vec<u64>,
    pub role: Role,
    pub required: bool,
}

/// What a checked model file holds.
#[derive(Clone, Debug)]
pub struct CheckedModel {
    pub arch: Arch,
    pub hparams: ModelHparams,
    pub vocab: VocabInfo,
}

fn bad(tensor: &str, reason: String) -> GgufError {
    GgufError::BadTensor {
        tensor: tensor.to_owned(),
        reason,
    }
}

/// Keys that make libllama build a different model than ours (experts, multi-token-prediction
/// layers), each of which it checks with asserts: present and non-zero, they are refused.
const UNSUPPORTED_COUNTS: &[(&str, &str)] = &[
    (
        "expert_count",
        "mixture-of-experts models are not supported",
    ),
    (
        "expert_used_count",
        "mixture-of-experts models are not supported",
    ),
    (
        "expert_group_count",
        "mixture-of-experts models are not supported",
    ),
    (
        "expert_group_used_count",
        "mixture-of-experts models are not supported",
    ),
    (
        "nextn_predict_layers",
        "multi-token-prediction layers are not supported",
    ),
];
/// ggml-backend.cpp's `TENSOR_ALIGNMENT`.
const TENSOR_ALIGNMENT: u32 = 32;
/// libllama asserts that the RoPE scaling type is one of these.
const ROPE_SCALING_TYPES: &[&str] = &["none", "linear", "yarn", "longrope"];
/// The RoPE scaling types our graph applies as libllama does (a plain frequency scale).
const ROPE_SCALING_RUN: &[&str] = &["none", "linear"];
/// Head and RoPE sizes libllama reads for sliding-window layers; our graph has one size for
/// every layer, so each must equal its full-attention counterpart when present.
const SWA_SHAPE_KEYS: &[(&str, &str)] = &[
    ("attention.key_length_swa", "attention.key_length"),
    ("attention.value_length_swa", "attention.value_length"),
    ("rope.dimension_count_swa", "rope.dimension_count"),
];

/// The tensors of `arch` with these hyperparameters, in file order of a converted model.
pub(crate) fn slots(arch: Arch, hp: &ModelHparams) -> Vec<Slot> {
    let (e, hd) = (u64::from(hp.n_embd), u64::from(hp.head_dim_k));
    let (q_dim, kv_dim) = (u64::from(hp.n_head) * hd, u64::from(hp.n_head_kv) * hd);
    let (ff, vocab) = (u64::from(hp.n_ff), u64::from(hp.vocab_size));
    let slot = |name: String, dims: &[u64], role, required| Slot {
        name,
        dims: dims.to_vec(),
        role,
        required,
    };
    let mut out = vec![
        slot(
            "token_embd.weight".into(),
            &[e, vocab],
            Role::Embedding,
            true,
        ),
        slot("output_norm.weight".into(), &[e], Role::Vector, true),
        slot("output.weight".into(), &[e, vocab], Role::Matrix, false),
    ];
    if arch == Arch::Llama {
        // Llama 3's frequency factors: libllama passes them to every layer's RoPE.
        out.push(slot(
            "rope_freqs.weight".into(),
            &[u64::from(hp.rope_dim / 2)],
            Role::Vector,
            false,
        ));
    }
    let qwen = arch == Arch::Qwen2;
    let gemma = arch == Arch::Gemma3;
    for l in 0..hp.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}");
        out.push(slot(n("attn_norm.weight"), &[e], Role::Vector, true));
        out.push(slot(n("attn_q.weight"), &[e, q_dim], Role::Matrix, true));
        out.push(slot(n("attn_k.weight"), &[e, kv_dim], Role::Matrix, true));
        out.push(slot(n("attn_v.weight"), &[e, kv_dim], Role::Matrix, true));
        if qwen {
            out.push(slot(n("attn_q.bias"), &[q_dim], Role::Vector, true));
            out.push(slot(n("attn_k.bias"), &[kv_dim], Role::Vector, true));
            out.push(slot(n("attn_v.bias"), &[kv_dim], Role::Vector, true));
        }
        if arch.has_qk_norm() {
            out.push(slot(n("attn_q_norm.weight"), &[hd], Role::Vector, true));
            out.push(slot(n("attn_k_norm.weight"), &[hd], Role::Vector, true));
        }
        out.push(slot(
            n("attn_output.weight"),
            &[q_dim, e],
            Role::Matrix,
            true,
        ));
        if gemma {
            out.push(slot(
                n("post_attention_norm.weight"),
                &[e],
                Role::Vector,
                true,
            ));
        }
        out.push(slot(n("ffn_norm.weight"), &[e], Role::Vector, true));
        out.push(slot(n("ffn_gate.weight"), &[e, ff], Role::Matrix, true));
        out.push(slot(n("ffn_up.weight"), &[e, ff], Role::Matrix, true));
        out.push(slot(n("ffn_down.weight"), &[ff, e], Role::Matrix, true));
        if gemma {
            out.push(slot(n("post_ffw_norm.weight"), &[e], Role::Vector, true));
        }
    }
    out
}

/// Whether ggml's CPU backend can take `ty` as the weight of `ggml_mul_mat` (it has a vector
/// dot product for it) and as the source of `ggml_get_rows`. A test checks the list against
/// ggml's own type traits.
pub fn cpu_can_multiply(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | Q1_0
            | Q2_0
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | MXFP4
            | NVFP4
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | IQ2_XXS
            | IQ2_XS
            | IQ3_XXS
            | IQ3_S
            | IQ2_S
            | IQ1_S
            | IQ1_M
            | IQ4_NL
            | IQ4_XS
            | TQ1_0
            | TQ2_0
    )
}

fn check_type(slot: &Slot, ty: GgmlType) -> Result<(), GgufError> {
    match slot.role {
        Role::Vector if ty != GgmlType::F32 => Err(bad(
            &slot.name,
            format!(
                "type {ty}: a norm weight or bias must be f32 (ggml adds and multiplies it \
                 with f32 activations)"
            ),
        )),
        Role::Matrix | Role::Embedding if !cpu_can_multiply(ty) => Err(bad(
            &slot.name,
            format!("type {ty}: ggml's CPU backend cannot multiply a matrix of this type"),
        )),
        _ => Ok(()),
    }
}

fn check_arch_keys(g: &Gguf, arch: &str) -> Result<(), GgufError> {
    for (suffix, why) in UNSUPPORTED_COUNTS {
        let key = format!("{arch}.{suffix}");
        let Some(v) = g.get(&key) else { continue };
        let zero = match v {
            Value::Array(a) => a.is_empty(),
            v => v.as_integer() == Some(0),
        };
        if !zero {
            return Err(GgufError::InvalidHparam {
                key,
                reason: (*why).to_owned(),
            });
        }
    }
    let key = format!("{arch}.rope.scaling.type");
    if let Some(t) = g.get_str_opt(&key)? {
        if !ROPE_SCALING_TYPES.contains(&t) {
            return Err(GgufError::InvalidHparam {
                key,
                reason: format!(
                    "unknown RoPE scaling type {t:?} (known: {})",
                    ROPE_SCALING_TYPES.join(", ")
                ),
            });
        }
        if !ROPE_SCALING_RUN.contains(&t) {
            return Err(GgufError::InvalidHparam {
                key,
                reason: format!(
                    "RoPE scaling type {t:?} is not supported (ottkv runs {})",
                    ROPE_SCALING_RUN.join(", ")
                ),
            });
        }
    }
    // libllama multiplies RoPE's attention factor by this; our graph keeps it at 1.
    let key = format!("{arch}.rope.scaling.attn_factor");
    if let Some(f) = g.get_f32_opt(&key)? {
        if f != 1.0 {
            return Err(GgufError::InvalidHparam {
                key,
                reason: format!("RoPE attention factor {f} is not supported (only 1)"),
            });
        }
    }
    for (swa, full) in SWA_SHAPE_KEYS {
        let key = format!("{arch}.{swa}");
        let Some(v) = g.get_u32_opt(&key)? else {
            continue;
        };
        let full_key = format!("{arch}.{full}");
        let full_v = g.get_u32_opt(&full_key)?;
        if full_v != Some(v) {
            return Err(GgufError::InvalidHparam {
                key,
                reason: format!(
                    "{v} differs from {full_key} ({}): per-layer head sizes are not supported",
                    full_v.map_or("absent".to_owned(), |x| x.to_string())
                ),
            });
        }
    }
    Ok(())
}

/// Checks a parsed model file for everything our engine and libllama need (see the module
/// documentation). Reads only the header: no tensor data.
pub fn check_model(g: &Gguf) -> Result<CheckedModel> {
    let hp = ModelHparams::from_gguf(g)?;
    let arch = Arch::from_name(&hp.arch)
        .ok_or_else(|| GgufError::UnsupportedArchitecture(hp.arch.clone()))?;
    check_arch_keys(g, &hp.arch)?;
    // ggml's CPU buffers over the mapping assert that tensor data is 32-byte aligned
    // (`TENSOR_ALIGNMENT`); gguf itself allows any power of two.
    if g.alignment() % TENSOR_ALIGNMENT != 0 {
        return Err(GgufError::BadAlignment {
            reason: format!(
                "{} bytes; ggml needs tensor data aligned to a multiple of {TENSOR_ALIGNMENT}",
                g.alignment()
            ),
        }
        .into());
    }
    if hp.head_dim_k != hp.head_dim_v || hp.rope_dim != hp.head_dim_k {
        return Err(GgufError::InvalidHparam {
            key: format!("{}.attention.key_length", hp.arch),
            reason: format!(
                "head_dim_k {} / head_dim_v {} / rope_dim {} must be equal",
                hp.head_dim_k, hp.head_dim_v, hp.rope_dim
            ),
        }
        .into());
    }
    let vocab = check_vocab(g)?;
    let slots = slots(arch, &hp);
    for s in &slots {
        let Some(info) = g.tensor(&s.name) else {
            if s.required {
                return Err(GgufError::TensorNotFound {
                    name: s.name.clone(),
                }
                .into());
            }
            continue;
        };
        if info.dims != s.dims {
            return Err(bad(
                &s.name,
                format!("shape {:?}, expected {:?}", info.dims, s.dims),
            )
            .into());
        }
        check_type(s, info.ggml_type)?;
    }
    let known: HashSet<&str> = slots.iter().map(|s| s.name.as_str()).collect();
    if let Some(t) = g
        .tensors()
        .iter()
        .find(|t| !known.contains(t.name.as_str()))
    {
        let why = if t.name.starts_with("rope_") || t.name.contains(".rope_") {
            format!(
                "per-frequency RoPE factors are only supported as a llama model's shared \
                 rope_freqs.weight (this is a {} file)",
                hp.arch
            )
        } else {
            format!(
                "not a tensor of a {}-layer {} model (ottkv runs no optional or extra \
                 tensors)",
                hp.n_layer, hp.arch
            )
        };
        return Err(bad(&t.name, why).into());
    }
    Ok(CheckedModel {
        arch,
        hparams: hp,
        vocab,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_multiply_list_matches_ggml_type_traits() {
        for &ty in GgmlType::ALL {
            assert_eq!(
                cpu_can_multiply(ty),
                crate::ggml::cpu_has_vec_dot(ty.id()),
                "{ty}: our list and ggml's CPU type traits disagree"
            );
        }
    }
}
