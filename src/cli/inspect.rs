//! `ottkv inspect MODEL.gguf [--json]`: reads only the header through the memory map.

use crate::error::Result;
use crate::eval::memory::peak_rss_bytes;
use crate::eval::memory::{kv_bytes_per_token, INSPECT_CACHES};
use crate::gguf::{GgufFile, ModelHparams};
use crate::model::Arch;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF model file.
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// More of our caches (presets or specs, comma-separated) to cost at 8192 tokens.
    #[arg(long)]
    cache: Option<String>,
}

#[derive(Serialize)]
struct Report {
    path: String,
    file_size: u64,
    gguf_version: u32,
    architecture: String,
    name: Option<String>,
    /// Absent when the architecture is not one the engine runs (`hparams_error` says why).
    hparams: Option<Hparams>,
    hparams_error: Option<String>,
    tensor_count: usize,
    tensor_types: BTreeMap<String, usize>,
    /// K+V bytes per token over all layers; ott2 at 8192 tokens, window and pools included;
    /// llama.cpp's block types are absent where head_dim is not a multiple of their block.
    kv_bytes_per_token: BTreeMap<String, f64>,
    peak_rss_bytes: Option<u64>,
}

#[derive(Serialize)]
struct Hparams {
    n_layer: u32,
    n_head: u32,
    n_head_kv: u32,
    head_dim: u32,
    n_embd: u32,
    n_ff: u32,
    n_ctx_train: u32,
    rope_type: String,
    rope_freq_base: f32,
    rope_freq_scale: f32,
    /// `<arch>.rope.scaling.type` as stored (absent: linear, as llama.cpp reads it).
    rope_scaling_type: Option<String>,
    /// Whether the file has Llama 3 RoPE frequency factors (`rope_freqs.weight`) and how many.
    rope_freq_factors: Option<u64>,
    /// Per-head RMSNorm of q and k before RoPE (qwen3, gemma3).
    qk_norm: bool,
    /// Sliding-window attention: the window in tokens (absent: none).
    sliding_window: Option<u32>,
    /// One letter per layer: `S` attends through the window, `F` over every token.
    sliding_window_layers: Option<String>,
    rope_freq_base_swa: Option<f32>,
    final_logit_softcapping: Option<f32>,
    vocab_size: u32,
    tokenizer: String,
}

pub fn run(a: &Args) -> Result<()> {
    let file = GgufFile::open(&a.model)?;
    let g = file.gguf();
    let mut tensor_types = BTreeMap::new();
    for t in g.tensors() {
        *tensor_types
            .entry(t.ggml_type.name().to_string())
            .or_insert(0) += 1;
    }
    let (hparams, hparams_error, kv) = match ModelHparams::from_gguf(g) {
        Ok(h) => {
            // llama.cpp's block types need head_dim to be a whole number of 32-element blocks.
            let extra = a
                .cache
                .as_deref()
                .map(super::split_cache_list)
                .unwrap_or_default();
            let kv = INSPECT_CACHES
                .iter()
                .copied()
                .chain(extra.iter().map(String::as_str))
                .filter(|&c| !(c.starts_with('q') && h.head_dim_k % 32 != 0))
                .map(|c| Ok((c.to_string(), kv_bytes_per_token(c, &h, 8192)?)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            let hp = Hparams {
                n_layer: h.n_layer,
                n_head: h.n_head,
                n_head_kv: h.n_head_kv,
                head_dim: h.head_dim_k,
                n_embd: h.n_embd,
                n_ff: h.n_ff,
                n_ctx_train: h.n_ctx_train,
                rope_type: format!("{:?}", h.rope_type).to_lowercase(),
                rope_freq_base: h.rope_freq_base,
                rope_freq_scale: h.rope_freq_scale,
                rope_scaling_type: h.rope_scaling_type.clone(),
                rope_freq_factors: g
                    .tensor("rope_freqs.weight")
                    .map(|t| t.dims.iter().product()),
                qk_norm: Arch::from_name(&h.arch).is_some_and(Arch::has_qk_norm),
                sliding_window: (h.n_swa > 0).then_some(h.n_swa),
                sliding_window_layers: (h.n_swa > 0).then(|| {
                    h.swa_layers
                        .iter()
                        .map(|&s| if s { 'S' } else { 'F' })
                        .collect()
                }),
                rope_freq_base_swa: (h.n_swa > 0).then_some(h.rope_freq_base_swa),
                final_logit_softcapping: (h.final_logit_softcapping != 0.0)
                    .then_some(h.final_logit_softcapping),
                vocab_size: h.vocab_size,
                tokenizer: h.tokenizer_model.clone(),
            };
            (Some(hp), None, kv)
        }
        Err(e) => (None, Some(e.to_string()), BTreeMap::new()),
    };
    let report = Report {
        path: a.model.display().to_string(),
        file_size: file.file_size(),
        gguf_version: g.version(),
        architecture: g.architecture().unwrap_or("?").to_string(),
        name: g
            .get_str_opt("general.name")
            .ok()
            .flatten()
            .map(str::to_string),
        hparams,
        hparams_error,
        tensor_count: g.tensors().len(),
        tensor_types,
        kv_bytes_per_token: kv,
        peak_rss_bytes: peak_rss_bytes(),
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print_text(&report);
    }
    Ok(())
}

fn print_text(r: &Report) {
    println!("{}", r.path);
    println!(
        "  file size      {} bytes (GGUF v{})",
        r.file_size, r.gguf_version
    );
    println!(
        "  architecture   {}{}",
        r.architecture,
        r.name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    match (&r.hparams, &r.hparams_error) {
        (Some(h), _) => {
            println!("  layers         {}", h.n_layer);
            println!(
                "  heads          {} (kv heads {}), head_dim {}",
                h.n_head, h.n_head_kv, h.head_dim
            );
            println!("  embedding      {} (ffn {})", h.n_embd, h.n_ff);
            println!("  trained ctx    {}", h.n_ctx_train);
            println!(
                "  rope           {} base {} scale {}{}{}",
                h.rope_type,
                h.rope_freq_base,
                h.rope_freq_scale,
                h.rope_scaling_type
                    .as_deref()
                    .map(|t| format!(" ({t} scaling)"))
                    .unwrap_or_default(),
                h.rope_freq_factors
                    .map(|n| format!(", {n} frequency factors (rope_freqs)"))
                    .unwrap_or_default()
            );
            println!(
                "  q/k norm       {}",
                if h.qk_norm {
                    "per-head RMSNorm before RoPE"
                } else {
                    "none"
                }
            );
            match (h.sliding_window, &h.sliding_window_layers) {
                (Some(w), Some(layers)) => println!(
                    "  sliding window {w} tokens on {} of {} layers ({layers}; S = window, \
                     F = full), window rope base {}",
                    layers.matches('S').count(),
                    layers.len(),
                    h.rope_freq_base_swa.unwrap_or(f32::NAN)
                ),
                _ => println!("  sliding window none"),
            }
            if let Some(c) = h.final_logit_softcapping {
                println!("  logit softcap  {c}");
            }
            println!(
                "  vocab          {} ({} tokenizer)",
                h.vocab_size, h.tokenizer
            );
        }
        (None, Some(e)) => println!("  hparams        unavailable: {e}"),
        (None, None) => {}
    }
    let types: Vec<String> = r
        .tensor_types
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    println!("  tensors        {} ({})", r.tensor_count, types.join(", "));
    if !r.kv_bytes_per_token.is_empty() {
        println!("  KV bytes/token (all layers, K+V; our caches at 8192 tokens):");
        let f16 = r.kv_bytes_per_token.get("f16").copied().unwrap_or(f64::NAN);
        let mut names: Vec<&str> = INSPECT_CACHES.to_vec();
        names.extend(
            r.kv_bytes_per_token
                .keys()
                .map(String::as_str)
                .filter(|k| !INSPECT_CACHES.contains(k)),
        );
        for k in names {
            match r.kv_bytes_per_token.get(k) {
                Some(v) if k == "f16" => println!("    {k:<6} {v:>10.1}  (16.00 bits/element)"),
                Some(v) => println!(
                    "    {k:<6} {v:>10.1}  ({:.2}x less than f16, {:.3} bits/element)",
                    f16 / v,
                    16.0 * v / f16
                ),
                None => println!(
                    "    {k:<6} {:>10}  (head_dim is not a multiple of its 32-element block)",
                    "n/a"
                ),
            }
        }
    }
    if let Some(rss) = r.peak_rss_bytes {
        // Only the header pages of the mapping are touched, so this stays far below a large
        // model's size (the process itself accounts for a few MiB).
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "  peak RSS       {:.1} MiB for a {:.1} MiB file",
            mib(rss),
            mib(r.file_size)
        );
    }
}
