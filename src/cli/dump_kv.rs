//! `ottkv dump-kv -m MODEL -f TEXT -n TOKENS -o FILE`: Q/K/V of every layer, from llama.cpp.

use crate::error::{Error, Result};
use crate::eval::kvdump::KvDump;
use crate::llama::{capture_qkv, LlamaModel};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF model.
    #[arg(short, long)]
    model: PathBuf,
    /// The text to run (its first TOKENS tokens).
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// How many tokens to run and capture.
    #[arg(short = 'n', long, default_value_t = 2048, value_parser = super::parse_positive)]
    tokens: usize,
    /// Output file (a GGUF container of f16 tensors).
    #[arg(short, long)]
    output: PathBuf,
    #[arg(short, long, default_value_t = super::default_threads(), value_parser = super::parse_threads)]
    threads: usize,
}

pub fn run(a: &Args) -> Result<()> {
    let text = super::read_text(&a.file)?;
    let model = LlamaModel::load(&a.model, false)?;
    let toks = model.tokenize(&text, true)?;
    if toks.len() < a.tokens || a.tokens == 0 {
        return Err(Error::InvalidArgument(format!(
            "{} holds {} tokens; asked for {}",
            a.file.display(),
            toks.len(),
            a.tokens
        )));
    }
    let toks = &toks[..a.tokens];
    log::info!("capturing {} tokens of {}", toks.len(), a.file.display());
    let t0 = std::time::Instant::now();
    let cap = capture_qkv(&model, toks, 512, a.threads, false)?;
    let name = a
        .model
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dump = KvDump::from_captured(cap, name, super::sha256_hex(text.as_bytes()));
    dump.write(&a.output)?;
    eprintln!(
        "wrote {} ({} layers, {} tokens, {} q / {} kv heads, head_dim {}) in {:.1} s",
        a.output.display(),
        dump.n_layer,
        dump.n_tokens,
        dump.n_head,
        dump.n_head_kv,
        dump.head_dim,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
