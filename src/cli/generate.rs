//! `ottkv generate -m MODEL -p PROMPT -n N --cache TYPE`: streams text from our engine.

use crate::error::{Error, Result};
use crate::eval::memory::peak_rss_bytes;
use crate::kind::CacheKind;
use crate::llama::LlamaModel;
use crate::model::sample::Sampler;
use crate::model::{Logits, Model, Session, SessionParams};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    model: PathBuf,
    #[arg(short, long)]
    prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 64)]
    n_predict: usize,
    /// KV cache: f16, q8_0, q4_0 (llama.cpp's), ott2, ott4, ottk4v2, kivi2, kivi4 or a spec.
    #[arg(long, default_value = "ott2")]
    cache: String,
    /// Context size (prompt + generated tokens).
    #[arg(short = 'c', long, default_value_t = 4096, value_parser = super::parse_positive)]
    ctx_size: usize,
    /// Temperature; 0 is greedy (the default).
    #[arg(long, default_value_t = 0.0, value_parser = parse_temp, allow_negative_numbers = true)]
    temp: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to P, in (0, 1].
    #[arg(long, default_value_t = 0.95, value_parser = parse_top_p, allow_negative_numbers = true)]
    top_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(short, long, default_value_t = super::default_threads(), value_parser = super::parse_threads)]
    threads: usize,
}

pub(crate) fn parse_temp(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        Ok(t) => Err(format!("{t} is not a finite temperature >= 0")),
        Err(e) => Err(format!("{s:?} is not a number: {e}")),
    }
}

fn parse_top_p(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        Ok(p) => Err(format!("{p} is not in (0, 1]")),
        Err(e) => Err(format!("{s:?} is not a number: {e}")),
    }
}

pub fn run(a: &Args) -> Result<()> {
    let vocab = LlamaModel::load(&a.model, true)?;
    let model = Model::load(&a.model)?;
    let prompt = vocab.tokenize(&a.prompt, true)?;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt tokenizes to nothing".into(),
        ));
    }
    if prompt.len() > a.ctx_size {
        return Err(Error::ContextOverflow {
            needed: prompt.len(),
            n_ctx: a.ctx_size,
        });
    }
    let n_ctx = a.ctx_size.min(prompt.len() + a.n_predict);
    let kind: CacheKind = a.cache.parse()?;
    let mut s = Session::new(
        &model,
        SessionParams {
            n_ctx,
            n_batch: 512,
            threads: a.threads,
            cache: kind,
        },
    )?;
    let mut sampler = Sampler::new(a.temp, a.top_k, a.top_p, a.seed);
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", a.prompt);
    let t0 = Instant::now();
    let mut logits = s.eval(&prompt, Logits::Last)?;
    let t_prompt = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut n_gen = 0;
    for _ in 0..a.n_predict {
        let tok = sampler.sample(&logits) as i32;
        if vocab.is_eog(tok) {
            break;
        }
        let _ = write!(out, "{}", vocab.token_to_piece(tok)?);
        let _ = out.flush();
        n_gen += 1;
        if s.n_past() >= s.n_ctx() {
            break;
        }
        logits = s.eval(&[tok], Logits::Last)?;
    }
    let t_gen = t1.elapsed().as_secs_f64();
    let _ = writeln!(out);
    eprintln!(
        "\nprompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s | cache {}: {:.1} KiB | peak RSS {:.0} MiB (model file {:.0} MiB)",
        prompt.len(),
        prompt.len() as f64 / t_prompt.max(1e-9),
        n_gen,
        n_gen as f64 / t_gen.max(1e-9),
        a.cache,
        s.kv_bytes() as f64 / 1024.0,
        peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64,
        model.file_size() as f64 / (1 << 20) as f64
    );
    Ok(())
}
