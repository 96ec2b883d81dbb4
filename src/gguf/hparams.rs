//! Model hyperparameters read from GGUF metadata, with llama.cpp's defaults,
//! for the architectures this crate supports (llama, qwen2, qwen3, gemma3).

use super::error::{GgufError, Result};
use super::header::Gguf;
use super::value::{Array, Value};

/// How RoPE pairs up dimensions (llama.cpp's `LLAMA_ROPE_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeType {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.
    Norm,
    /// Split halves (x[i], x[i + n/2]): GPT-NeoX style, qwen2, qwen3, gemma3.
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
    /// Sliding-window attention (gemma3 only; libllama reads the window for no other
    /// architecture we run): the window in tokens, 0 when no layer has one.
    pub n_swa: u32,
    /// Per layer, whether it attends through the sliding window (all false when `n_swa` is 0).
    pub swa_layers: Vec<bool>,
    /// RoPE base and scale of the sliding-window layers (libllama's defaults 10000 and 1 when
    /// the file has no `rope.freq_base_swa`; the scale is never read from the file).
    pub rope_freq_base_swa: f32,
    pub rope_freq_scale_swa: f32,
    /// `<arch>.final_logit_softcapping` (gemma3): logits become `c * tanh(logits / c)`; 0 = off.
    pub final_logit_softcapping: f32,
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

/// gemma3's sliding window as libllama reads it: `attention.sliding_window` (0 or absent:
/// none), then a per-layer `sliding_window_pattern` array, or a period `n` (default 6) where
/// every layer but each `n`-th is a window layer, and the window layers' own RoPE base.
fn sliding_window(g: &Gguf, arch: &str, n_layer: u32) -> Result<(u32, Vec<bool>, f32)> {
    let k = |suffix: &str| format!("{arch}.{suffix}");
    let k_swa = k("attention.sliding_window");
    let n_swa = g.get_u32_opt(&k_swa)?.unwrap_or(0);
    if n_swa == 0 {
        return Ok((0, vec![false; n_layer as usize], 10000.0));
    }
    let k_pat = k("attention.sliding_window_pattern");
    let layers = match g.get(&k_pat) {
        Some(Value::Array(a)) => {
            let flags: Vec<bool> = match a {
                Array::Bool(v) => v.clone(),
                Array::U32(v) => v.iter().map(|&x| x != 0).collect(),
                Array::I32(v) => v.iter().map(|&x| x != 0).collect(),
                _ => {
                    return Err(invalid(
                        &k_pat,
                        "a per-layer pattern must be an array of bool, u32 or i32".into(),
                    ))
                }
            };
            // libllama leaves layers past a short array dense and refuses a long one; a
            // pattern that does not name every layer is refused here outright.
            if flags.len() != n_layer as usize {
                return Err(invalid(
                    &k_pat,
                    format!("{} entries for {n_layer} layers", flags.len()),
                ));
            }
            flags
        }
        _ => {
            let n = g.get_u32_opt(&k_pat)?.unwrap_or(6);
            (0..n_layer).map(|il| n == 0 || il % n < n - 1).collect()
        }
    };
    let k_base = k("rope.freq_base_swa");
    let base = positive_f32(&k_base, g.get_f32_opt(&k_base)?.unwrap_or(10000.0))?;
    Ok((n_swa, layers, base))
}

impl ModelHparams {
    pub fn from_gguf(g: &Gguf) -> Result<ModelHparams> {
        let arch = g.get_str(ARCH_KEY)?.to_owned();
        let rope_type = match arch.as_str() {
            "llama" => RopeType::Norm,
            "qwen2" | "qwen3" | "gemma3" => RopeType::Neox,
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
        // libllama falls back to the old key name when the new one is absent.
        let k_factor = match g.get(&k_factor) {
            None if g.get(&k("rope.scale_linear")).is_some() => k("rope.scale_linear"),
            _ => k_factor,
        };
        let rope_freq_scale = match g.get_f32_opt(&k_factor)? {
            Some(f) if linear && f != 0.0 => 1.0 / positive_f32(&k_factor, f)?,
            _ => 1.0,
        };

        let k_eps = k("attention.layer_norm_rms_epsilon");
        let rms_norm_eps = positive_f32(&k_eps, g.get_f32_opt(&k_eps)?.unwrap_or(1e-5))?;

        let (n_swa, swa_layers, rope_freq_base_swa) = if arch == "gemma3" {
            sliding_window(g, &arch, n_layer)?
        } else {
            (0, vec![false; n_layer as usize], 10000.0)
        };
        let k_cap = k("final_logit_softcapping");
        let final_logit_softcapping = match g.get_f32_opt(&k_cap)? {
            None => 0.0,
            Some(0.0) => 0.0,
            Some(c) => positive_f32(&k_cap, c)?,
        };

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
            n_swa,
            swa_layers,
            rope_freq_base_swa,
            rope_freq_scale_swa: 1.0,
            final_logit_softcapping: if arch == "gemma3" {
                final_logit_softcapping
            } else {
                0.0
            },
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
