//! Model hyperparameters read from GGUF metadata, with llama.cpp's defaults,
//! for the architectures this crate supports (llama, qwen2).

use super::error::{GgufError, Result};
use super::header::Gguf;
use super::value::Value;

/// How RoPE pairs up dimensions (llama.cpp's `LLAMA_ROPE_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeType {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.
    Norm,
    /// Split halves (x[i], x[i + n/2]): GPT-NeoX style, qwen2.
    Neox,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelHparams {
    pub arch: String,
    pub name: Option<String>,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_embd: u32,
    pub n_ff: u32,
    pub head_dim_k: u32,
    pub head_dim_v: u32,
    pub n_ctx_train: u32,
    pub rope_dim: u32,
    pub rope_freq_base: f32,
    pub rope_freq_scale: f32,
    /// `<arch>.rope.scaling.type` as stored, if present.
    pub rope_scaling_type: Option<String>,
    pub rope_type: RopeType,
    pub rms_norm_eps: f32,
    pub vocab_size: u32,
    pub tokenizer_model: String,
    pub tokenizer_pre: Option<String>,
}

/// llama.cpp's `LLAMA_MAX_LAYERS`: its loader refuses more, and each layer costs us a loop.
pub const MAX_LAYERS: u32 = 512;
/// Sane maxima for the other shape counts, far above any released model (the largest have
/// n_embd 16384, n_ff 53248, 128 heads, head_dim 256); they bound what a hostile header can
/// make `inspect` and the cache sizing compute before tensor shapes are checked.
pub const MAX_EMBD: u32 = 1 << 18;
pub const MAX_FF: u32 = 1 << 20;
pub const MAX_HEADS: u32 = 1 << 12;
pub const MAX_HEAD_DIM: u32 = 1 << 14;

const ARCH_KEY: &str = "general.architecture";
const TOKENS_KEY: &str = "tokenizer.ggml.tokens";

fn invalid(key: &str, reason: String) -> GgufError {
    GgufError::InvalidHparam {
        key: key.to_owned(),
        reason,
    }
}

/// A count that llama.cpp may store per layer; only the scalar form is
/// supported here.
fn scalar_count(g: &Gguf, key: &str, what: &str) -> Result<Option<u32>> {
    if let Some(Value::Array(a)) = g.get(key) {
        return Err(invalid(
            key,
            format!("per-layer {what} unsupported (array of {} values)", a.len()),
        ));
    }
    g.get_u32_opt(key)
}

fn positive(key: &str, v: u32) -> Result<u32> {
    if v == 0 {
        return Err(invalid(key, "must be > 0, got 0".into()));
    }
    Ok(v)
}

fn at_most(key: &str, v: u32, max: u32) -> Result<u32> {
    if v > max {
        return Err(invalid(key, format!("{v} is above the limit {max}")));
    }
    Ok(v)
}

fn positive_f32(key: &str, v: f32) -> Result<f32> {
    if !(v.is_finite() && v > 0.0) {
        return Err(invalid(key, format!("must be finite and > 0, got {v}")));
    }
    Ok(v)
}

fn required(key: &str, v: Option<u32>) -> Result<u32> {
    let v = v.ok_or_else(|| GgufError::MissingKey {
        key: key.to_owned(),
    })?;
    positive(key, v)
}

/// `n_embd / n_head`, which llama.cpp uses when the head size is not stored.
fn default_head_dim(embd_key: &str, n_embd: u32, n_head: u32) -> Result<u32> {
    if n_embd % n_head != 0 {
        return Err(invalid(
            embd_key,
            format!("{n_embd} is not divisible by head_count {n_head}"),
        ));
    }
    Ok(n_embd / n_head)
}

impl ModelHparams {
    pub fn from_gguf(g: &Gguf) -> Result<ModelHparams> {
        let arch = g.get_str(ARCH_KEY)?.to_owned();
        let rope_type = match arch.as_str() {
            "llama" => RopeType::Norm,
            "qwen2" => RopeType::Neox,
            _ => return Err(GgufError::UnsupportedArchitecture(arch)),
        };
        let k = |suffix: &str| format!("{arch}.{suffix}");

        let k_layer = k("block_count");
        let n_layer = at_most(
            &k_layer,
            required(&k_layer, g.get_u32_opt(&k_layer)?)?,
            MAX_LAYERS,
        )?;

        let k_head = k("attention.head_count");
        let n_head = at_most(
            &k_head,
            required(&k_head, scalar_count(g, &k_head, "head counts")?)?,
            MAX_HEADS,
        )?;
        let k_head_kv = k("attention.head_count_kv");
        let n_head_kv = positive(
            &k_head_kv,
            scalar_count(g, &k_head_kv, "head counts")?.unwrap_or(n_head),
        )?;
        if n_head % n_head_kv != 0 {
            return Err(invalid(
                &k_head_kv,
                format!("head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"),
            ));
        }

        let k_embd = k("embedding_length");
        let n_embd = at_most(
            &k_embd,
            required(&k_embd, g.get_u32_opt(&k_embd)?)?,
            MAX_EMBD,
        )?;
        let k_ff = k("feed_forward_length");
        let n_ff = at_most(
            &k_ff,
            required(&k_ff, scalar_count(g, &k_ff, "feed-forward lengths")?)?,
            MAX_FF,
        )?;

        let k_dim_k = k("attention.key_length");
        let head_dim_k = match g.get_u32_opt(&k_dim_k)? {
            Some(v) => positive(&k_dim_k, v)?,
            None => default_head_dim(&k_embd, n_embd, n_head)?,
        };
        at_most(&k_dim_k, head_dim_k, MAX_HEAD_DIM)?;
        let k_dim_v = k("attention.value_length");
        let head_dim_v = match g.get_u32_opt(&k_dim_v)? {
            Some(v) => positive(&k_dim_v, v)?,
            None => default_head_dim(&k_embd, n_embd, n_head)?,
        };
        at_most(&k_dim_v, head_dim_v, MAX_HEAD_DIM)?;

        let k_ctx = k("context_length");
        let n_ctx_train = required(&k_ctx, g.get_u32_opt(&k_ctx)?)?;

        let k_rope_dim = k("rope.dimension_count");
        let rope_dim = positive(
            &k_rope_dim,
            g.get_u32_opt(&k_rope_dim)?.unwrap_or(head_dim_k),
        )?;
        if rope_dim > head_dim_k || rope_dim % 2 != 0 {
            return Err(invalid(
                &k_rope_dim,
                format!("{rope_dim} must be even and at most the key head size {head_dim_k}"),
            ));
        }

        let k_base = k("rope.freq_base");
        let rope_freq_base = positive_f32(&k_base, g.get_f32_opt(&k_base)?.unwrap_or(10000.0))?;

        let k_scale_type = k("rope.scaling.type");
        let rope_scaling_type = g.get_str_opt(&k_scale_type)?.map(str::to_owned);
        let k_factor = k("rope.scaling.factor");
        // llama.cpp treats a missing type as linear and a factor of 0 as "no
        // scaling". Other types (yarn, ...) are not applied as a plain
        // frequency scale here.
        let linear = matches!(rope_scaling_type.as_deref(), None | Some("linear"));
        let rope_freq_scale = match g.get_f32_opt(&k_factor)? {
            Some(f) if linear && f != 0.0 => 1.0 / positive_f32(&k_factor, f)?,
            _ => 1.0,
        };

        let k_eps = k("attention.layer_norm_rms_epsilon");
        let rms_norm_eps = positive_f32(&k_eps, g.get_f32_opt(&k_eps)?.unwrap_or(1e-5))?;

        let k_vocab = k("vocab_size");
        let vocab_size = match g.get(TOKENS_KEY) {
            Some(_) => {
                let n = g.get_array(TOKENS_KEY)?.len();
                let n = u32::try_from(n)
                    .map_err(|_| invalid(TOKENS_KEY, format!("{n} tokens do not fit in u32")))?;
                positive(TOKENS_KEY, n)?
            }
            None => match g.get_u32_opt(&k_vocab)? {
                Some(v) => positive(&k_vocab, v)?,
                None => {
                    return Err(GgufError::MissingKey {
                        key: TOKENS_KEY.to_owned(),
                    })
                }
            },
        };

        Ok(ModelHparams {
            name: g.get_str_opt("general.name")?.map(str::to_owned),
            n_layer,
            n_head,
            n_head_kv,
            n_embd,
            n_ff,
            head_dim_k,
            head_dim_v,
            n_ctx_train,
            rope_dim,
            rope_freq_base,
            rope_freq_scale,
            rope_scaling_type,
            rope_type,
            rms_norm_eps,
            vocab_size,
            tokenizer_model: g.get_str("tokenizer.ggml.model")?.to_owned(),
            tokenizer_pre: g.get_str_opt("tokenizer.ggml.pre")?.map(str::to_owned),
            arch,
        })
    }

    /// Query heads per KV head.
    pub fn n_gqa(&self) -> u32 {
        self.n_head / self.n_head_kv
    }

    /// Width of one token's K row across all KV heads.
    pub fn n_embd_k_gqa(&self) -> u64 {
        u64::from(self.head_dim_k) * u64::from(self.n_head_kv)
    }

    /// Width of one token's V row across all KV heads.
    pub fn n_embd_v_gqa(&self) -> u64 {
        u64::from(self.head_dim_v) * u64::from(self.n_head_kv)
    }
}
