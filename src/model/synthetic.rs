//! Random-weight `llama` / `qwen2` / `qwen3` / `gemma3` models written with our GGUF writer, so
//! architectures and edge shapes (GQA and MQA, odd context lengths, head_dim 64/128/256, Llama 3
//! RoPE frequency factors, sliding windows, planted outlier key channels) can be tested against
//! llama.cpp on the same file without downloading anything.

use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufWriter, Value};
use half::f16;

pub use super::weights::Arch;

/// Shape and content of a synthetic model.
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub arch: Arch,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_ff: u32,
    /// At least 259: unk, bos, eos and the 256 byte tokens come first.
    pub n_vocab: u32,
    pub n_ctx_train: u32,
    pub rope_freq_base: f32,
    /// No `output.weight`: logits reuse the token embedding.
    pub tied_embeddings: bool,
    /// F32, F16, or a block type ggml's CPU quantizes to (Q4_1, Q8_0, …) for the matrices.
    pub weight_type: GgmlType,
    pub seed: u64,
    /// Key channels (within every kv head) whose `attn_k` rows are multiplied by
    /// `outlier_scale`: the outlier-channel structure real models show and q4_0 handles badly.
    pub outlier_channels: Vec<u32>,
    pub outlier_scale: f32,
    /// Qwen2 only: `attn_k.bias` of the outlier channels (0 = random like the others). A large
    /// bias in low-frequency RoPE channels gives keys the near-constant massive channels real
    /// models show: a rotated per-token cache (llama.cpp's q4_0) spreads them over every
    /// channel of the block, a per-channel cache subtracts them with each group's minimum.
    pub outlier_bias: f32,
    /// Multiplies the `attn_q` weights: sharper attention, so that key errors show in the
    /// logits (random weights otherwise attend almost uniformly and hide any cache's error).
    pub q_gain: f32,
    /// The tokenizer written into the file.
    pub vocab: SyntheticVocab,
    /// Llama only: write a `rope_freqs.weight` of Llama 3.1's frequency factors (scale 8,
    /// low/high frequency factors 1 and 4, original context `rope_freqs_orig_ctx`).
    pub rope_freqs: bool,
    pub rope_freqs_orig_ctx: u32,
    /// gemma3 only: `attention.sliding_window` (0: not written), and what else describes it
    /// when set (each `None` leaves the key out, so llama.cpp's defaults apply).
    pub sliding_window: u32,
    pub sliding_window_pattern: Option<u32>,
    pub rope_freq_base_swa: Option<f32>,
    /// gemma3 only: `final_logit_softcapping` (None: not written).
    pub final_logit_softcapping: Option<f32>,
}

/// Tokenizers a synthetic model can carry (the two libllama runs for llama and qwen2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyntheticVocab {
    /// `llama`: SentencePiece pieces with the 256 byte-fallback tokens.
    Spm,
    /// `gpt2`: byte-level BPE (GPT-2's byte-to-unicode alphabet, then merges).
    Bpe,
}

impl SyntheticSpec {
    /// A small GQA model: 2 layers, 4 heads / 2 kv heads, head_dim 64.
    pub fn small(arch: Arch) -> Self {
        Self {
            arch,
            n_layer: 2,
            n_embd: 256,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 512,
            n_vocab: 320,
            n_ctx_train: 1000,
            rope_freq_base: 10000.0,
            tied_embeddings: false,
            weight_type: GgmlType::F32,
            seed: 1,
            outlier_channels: Vec::new(),
            outlier_scale: 1.0,
            outlier_bias: 0.0,
            q_gain: 1.0,
            vocab: SyntheticVocab::Spm,
            rope_freqs: false,
            rope_freqs_orig_ctx: 8192,
            sliding_window: 0,
            sliding_window_pattern: None,
            rope_freq_base_swa: None,
            final_logit_softcapping: None,
        }
    }
}

/// Llama 3.1's RoPE frequency factors (what its converter writes as `rope_freqs.weight`):
/// 1 for wavelengths under `orig_ctx / 4`, 8 above `orig_ctx`, a smooth blend between.
pub fn llama3_rope_factors(head_dim: u32, base: f32, orig_ctx: u32) -> Vec<f32> {
    let (factor, low, high) = (8.0f64, 1.0f64, 4.0f64);
    let ctx = f64::from(orig_ctx);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / f64::from(base).powf(f64::from(2 * i) / f64::from(head_dim));
            let wavelen = std::f64::consts::TAU / freq;
            let f = if wavelen < ctx / high {
                1.0
            } else if wavelen > ctx / low {
                factor
            } else {
                let smooth = (ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// SplitMix64 followed by a Box–Muller normal: deterministic across platforms, no dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

/// The writer holding a complete model for `spec` (call `write_to` or `to_bytes`).
pub fn synthetic_model(spec: &SyntheticSpec) -> Result<GgufWriter> {
    let s = spec;
    let arch = s.arch.name();
    let mut w = GgufWriter::new();
    let kv = |w: &mut GgufWriter, k: &str, v: Value| w.add_kv(k, v);
    kv(&mut w, "general.architecture", Value::String(arch.into()))?;
    kv(
        &mut w,
        "general.name",
        Value::String(format!("ottkv-synthetic-{arch}")),
    )?;
    kv(
        &mut w,
        &format!("{arch}.context_length"),
        Value::U32(s.n_ctx_train),
    )?;
    kv(
        &mut w,
        &format!("{arch}.embedding_length"),
        Value::U32(s.n_embd),
    )?;
    kv(
        &mut w,
        &format!("{arch}.block_count"),
        Value::U32(s.n_layer),
    )?;
    kv(
        &mut w,
        &format!("{arch}.feed_forward_length"),
        Value::U32(s.n_ff),
    )?;
    kv(
        &mut w,
        &format!("{arch}.attention.head_count"),
        Value::U32(s.n_head),
    )?;
    kv(
        &mut w,
        &format!("{arch}.attention.head_count_kv"),
        Value::U32(s.n_head_kv),
    )?;
    kv(
        &mut w,
        &format!("{arch}.attention.key_length"),
        Value::U32(s.head_dim),
    )?;
    kv(
        &mut w,
        &format!("{arch}.attention.value_length"),
        Value::U32(s.head_dim),
    )?;
    kv(
        &mut w,
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-5),
    )?;
    kv(
        &mut w,
        &format!("{arch}.rope.freq_base"),
        Value::F32(s.rope_freq_base),
    )?;
    kv(
        &mut w,
        &format!("{arch}.rope.dimension_count"),
        Value::U32(s.head_dim),
    )?;
    if s.arch == Arch::Gemma3 {
        if s.sliding_window > 0 {
            kv(
                &mut w,
                &format!("{arch}.attention.sliding_window"),
                Value::U32(s.sliding_window),
            )?;
        }
        if let Some(p) = s.sliding_window_pattern {
            kv(
                &mut w,
                &format!("{arch}.attention.sliding_window_pattern"),
                Value::U32(p),
            )?;
        }
        if let Some(b) = s.rope_freq_base_swa {
            kv(&mut w, &format!("{arch}.rope.freq_base_swa"), Value::F32(b))?;
        }
        if let Some(c) = s.final_logit_softcapping {
            kv(
                &mut w,
                &format!("{arch}.final_logit_softcapping"),
                Value::F32(c),
            )?;
        }
    }
    match s.vocab {
        SyntheticVocab::Spm => add_spm_vocab(&mut w, s.n_vocab)?,
        SyntheticVocab::Bpe => add_bpe_vocab(&mut w, s.n_vocab)?,
    }

    let mut rng = Rng(s.seed);
    let (e, hd) = (s.n_embd as u64, s.head_dim as u64);
    let (q_dim, kv_dim) = (s.n_head as u64 * hd, s.n_head_kv as u64 * hd);
    // Scales keep activations O(1) through the layers, so logits are neither flat nor saturated.
    let proj = |fan_in: u64| 1.0 / (fan_in as f32).sqrt();
    let ty = s.weight_type;
    add_random(
        &mut w,
        &mut rng,
        ty,
        "token_embd.weight",
        &[e, s.n_vocab as u64],
        (1.0, 0.0),
        |_| {},
    )?;
    add_random(
        &mut w,
        &mut rng,
        ty,
        "output_norm.weight",
        &[e],
        (0.05, 1.0),
        |_| {},
    )?;
    if !s.tied_embeddings {
        add_random(
            &mut w,
            &mut rng,
            ty,
            "output.weight",
            &[e, s.n_vocab as u64],
            (proj(e), 0.0),
            |_| {},
        )?;
    }
    if s.rope_freqs && s.arch == Arch::Llama {
        let f = llama3_rope_factors(s.head_dim, s.rope_freq_base, s.rope_freqs_orig_ctx);
        w.add_tensor(
            "rope_freqs.weight",
            &[f.len() as u64],
            GgmlType::F32,
            encode(&f, GgmlType::F32)?,
        )?;
    }
    let qk_norm = s.arch.has_qk_norm();
    let gemma = s.arch == Arch::Gemma3;
    for l in 0..s.n_layer {
        let b = format!("blk.{l}");
        add_random(
            &mut w,
            &mut rng,
            ty,
            &format!("{b}.attn_norm.weight"),
            &[e],
            (0.05, 1.0),
            |_| {},
        )?;
        add_random(
            &mut w,
            &mut rng,
            ty,
            &format!("{b}.attn_q.weight"),
            &[e, q_dim],
            (proj(e) * s.q_gain, 0.0),
            |_| {},
        )?;
        // [kv_dim][n_embd]: row r produces key channel r % head_dim of kv head r / head_dim.
        let plant = |k: &mut [f32]| {
            for (row, r) in k.chunks_exact_mut(e as usize).enumerate() {
                if s.outlier_channels.contains(&((row as u64 % hd) as u32)) {
                    r.iter_mut().for_each(|x| *x *= s.outlier_scale);
                }
            }
        };
        add_random(
            &mut w,
            &mut rng,
            ty,
            &format!("{b}.attn_k.weight"),
            &[e, kv_dim],
            (proj(e), 0.0),
            plant,
        )?;
        add_random(
            &mut w,
            &mut rng,
            ty,
            &format!("{b}.attn_v.weight"),
            &[e, kv_dim],
            (proj(e), 0.0),
            |_| {},
        )?;
        if s.arch == Arch::Qwen2 {
            add_random(
                &mut w,
                &mut rng,
                ty,
                &format!("{b}.attn_q.bias"),
                &[q_dim],
                (0.1, 0.0),
                |_| {},
            )?;
            add_random(
                &mut w,
                &mut rng,
                ty,
                &format!("{b}.attn_k.bias"),
                &[kv_dim],
                (0.1, 0.0),
                |v| {
                    if s.outlier_bias != 0.0 {
                        for (i, x) in v.iter_mut().enumerate() {
                            if s.outlier_channels.contains(&((i as u64 % hd) as u32)) {
                                *x = s.outlier_bias;
                            }
                        }
                    }
                },
            )?;
            add_random(
                &mut w,
                &mut rng,
                ty,
                &format!("{b}.attn_v.bias"),
                &[kv_dim],
                (0.1, 0.0),
                |_| {},
            )?;
        }
        if qk_norm {
            for t in ["attn_q_norm", "attn_k_norm"] {
                add_random(
                    &mut w,
                    &mut rng,
                    ty,
                    &format!("{b}.{t}.weight"),
                    &[hd],
                    (0.05, 1.0),
                    |_| {},
                )?;
            }
        }
        add_random(
            &mut w,
            &mut rng,
            ty,
            &format!("{b}.attn_output.weight"),
            &[q_dim, e],
            (proj(q_dim), 0.0),
            |_| {},
        )?;
        if gemma {
            add_random(
                &mut w,
                &mut rng,
                ty,
                &format!("{b}.post_attention_norm.weight"),
                &[e],
                (0.05, 1.0),
                |_| {},
            )?;
        }
        add_random(
            &mut w,
            &mut rng,
            ty,
            &format!("{b}.ffn_norm.weight"),
            &[e],
            (0.05, 1.0),
            |_| {},
        )?;
        add_random(
            &mut w,
            &mut rng,
            ty,
            &format!("{b}.ffn_gate.weight"),
            &[e, s.n_ff as u64],
            (proj(e), 0.0),
            |_| {},
        )?;
        add_random(
            &mut w,
            &mut rng,
            ty,
            &format!("{b}.ffn_up.weight"),
            &[e, s.n_ff as u64],
            (proj(e), 0.0),
            |_| {},
        )?;
        add_random(
            &mut w,
            &mut rng,
            ty,
            &format!("{b}.ffn_down.weight"),
            &[s.n_ff as u64, e],
            (proj(s.n_ff as u64), 0.0),
            |_| {},
        )?;
        if gemma {
            add_random(
                &mut w,
                &mut rng,
                ty,
                &format!("{b}.post_ffw_norm.weight"),
                &[e],
                (0.05, 1.0),
                |_| {},
            )?;
        }
    }
    Ok(w)
}

/// Adds a tensor of normal(mean, std) values, after `edit` has had its way with them.
fn add_random(
    w: &mut GgufWriter,
    rng: &mut Rng,
    ty: GgmlType,
    name: &str,
    dims: &[u64],
    (std, mean): (f32, f32),
    edit: impl FnOnce(&mut [f32]),
) -> Result<()> {
    // Norms and biases stay f32 whatever the weight type, as in converted models (ggml's
    // binary ops take no f16 second operand).
    let ty = if dims.len() == 1 { GgmlType::F32 } else { ty };
    let n: u64 = dims.iter().product();
    let mut vals: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
    edit(&mut vals);
    Ok(w.add_tensor(name, dims, ty, encode(&vals, ty)?)?)
}

fn encode(vals: &[f32], ty: GgmlType) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlType::F32 => vals.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        GgmlType::F16 => vals
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        _ => crate::ggml::quantize::quantize(ty.id(), vals)?,
    })
}

/// A SentencePiece-style ("llama") vocabulary: unk, bos, eos, the 256 byte-fallback tokens,
/// then printable pieces, so any text tokenizes.
fn add_spm_vocab(w: &mut GgufWriter, n_vocab: u32) -> Result<()> {
    const SPECIALS: [(&str, i32); 3] = [("<unk>", 2), ("<s>", 3), ("</s>", 3)];
    let mut tokens: Vec<String> = SPECIALS.iter().map(|(t, _)| t.to_string()).collect();
    let mut types: Vec<i32> = SPECIALS.iter().map(|&(_, ty)| ty).collect();
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let chars: Vec<char> = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(".,;:!?'-".chars())
        .collect();
    let mut pieces = std::iter::once("\u{2581}".to_string())
        .chain(chars.iter().map(|c| c.to_string()))
        .chain(chars.iter().map(|c| format!("\u{2581}{c}")))
        .chain(
            chars
                .iter()
                .flat_map(|a| chars.iter().map(move |b| format!("{a}{b}"))),
        );
    while tokens.len() < n_vocab as usize {
        let Some(p) = pieces.next() else { break };
        tokens.push(p);
        types.push(1);
    }
    if tokens.len() != n_vocab as usize {
        return Err(Error::InvalidArgument(format!(
            "synthetic vocab must hold 259..={} tokens, asked for {n_vocab}",
            tokens.len().max(259)
        )));
    }
    let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
    w.add_kv("tokenizer.ggml.model", Value::String("llama".into()))?;
    w.add_kv(
        "tokenizer.ggml.tokens",
        Value::Array(crate::gguf::Array::String(tokens)),
    )?;
    w.add_kv(
        "tokenizer.ggml.scores",
        Value::Array(crate::gguf::Array::F32(scores)),
    )?;
    w.add_kv(
        "tokenizer.ggml.token_type",
        Value::Array(crate::gguf::Array::I32(types)),
    )?;
    w.add_kv("tokenizer.ggml.bos_token_id", Value::U32(1))?;
    w.add_kv("tokenizer.ggml.eos_token_id", Value::U32(2))?;
    w.add_kv("tokenizer.ggml.unknown_token_id", Value::U32(0))?;
    w.add_kv("tokenizer.ggml.add_bos_token", Value::Bool(true))?;
    Ok(())
}

/// GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the others are shifted
/// to code points from U+0100 on, so every byte is one visible character.
fn byte_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        out[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    out
}

/// A byte-level BPE ("gpt2") vocabulary: the 256 byte characters, then merged pairs (a space
/// with a letter, letter pairs), then `<|endoftext|>` as BOS/EOS, so any text tokenizes.
fn add_bpe_vocab(w: &mut GgufWriter, n_vocab: u32) -> Result<()> {
    let bytes = byte_to_unicode();
    let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    let mut types: Vec<i32> = vec![1; tokens.len()];
    let space = bytes[b' ' as usize];
    let letters: Vec<char> = ('a'..='z').chain('A'..='Z').collect();
    let pairs = letters
        .iter()
        .map(|&c| (space.to_string(), c.to_string()))
        .chain(
            letters
                .iter()
                .flat_map(|&a| ('a'..='z').map(move |b| (a.to_string(), b.to_string()))),
        );
    let mut merges = Vec::new();
    for (a, b) in pairs {
        if tokens.len() + 1 >= n_vocab as usize {
            break;
        }
        tokens.push(format!("{a}{b}"));
        types.push(1);
        merges.push(format!("{a} {b}"));
    }
    tokens.push("<|endoftext|>".into());
    types.push(3);
    if tokens.len() != n_vocab as usize {
        return Err(Error::InvalidArgument(format!(
            "synthetic BPE vocab must hold 257..={} tokens, asked for {n_vocab}",
            tokens.len().max(257)
        )));
    }
    let eot = (tokens.len() - 1) as u32;
    w.add_kv("tokenizer.ggml.model", Value::String("gpt2".into()))?;
    w.add_kv("tokenizer.ggml.pre", Value::String("default".into()))?;
    w.add_kv(
        "tokenizer.ggml.tokens",
        Value::Array(crate::gguf::Array::String(tokens)),
    )?;
    w.add_kv(
        "tokenizer.ggml.token_type",
        Value::Array(crate::gguf::Array::I32(types)),
    )?;
    w.add_kv(
        "tokenizer.ggml.merges",
        Value::Array(crate::gguf::Array::String(merges)),
    )?;
    w.add_kv("tokenizer.ggml.bos_token_id", Value::U32(eot))?;
    w.add_kv("tokenizer.ggml.eos_token_id", Value::U32(eot))?;
    w.add_kv("tokenizer.ggml.add_bos_token", Value::Bool(false))?;
    Ok(())
}
