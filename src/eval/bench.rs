//! Prompt and decode speed at several filled contexts, for llama.cpp's caches and ours, runs
//! interleaved (row by row within each repetition) so machine noise hits all rows alike.

use super::runner::make_runner;
use crate::error::Result;
use crate::kind::{CacheRow, Engine};
use crate::llama::LlamaModel;
use crate::model::Model;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub engine: Engine,
    pub cache: String,
    /// Tokens in the cache when decoding starts.
    pub ctx: usize,
    /// Median over repetitions.
    pub prompt_tok_s: f64,
    pub decode_tok_s: f64,
    /// Every repetition's figures.
    pub prompt_runs: Vec<f64>,
    pub decode_runs: Vec<f64>,
    pub kv_bytes: usize,
}

pub struct BenchSettings {
    pub contexts: Vec<usize>,
    pub n_decode: usize,
    pub reps: usize,
    pub n_batch: usize,
    pub threads: usize,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        0.5 * (s[m - 1] + s[m])
    }
}

/// Runs the benchmark. `tokens` must hold at least max(contexts) + n_decode tokens.
pub fn run_bench(
    llama: &LlamaModel,
    ours: &Model,
    rows: &[CacheRow],
    tokens: &[i32],
    s: &BenchSettings,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BenchResult>> {
    let mut out = Vec::new();
    for &ctx in &s.contexts {
        let n_ctx = ctx + s.n_decode;
        let mut runners = Vec::new();
        for r in rows {
            match make_runner(r, llama, ours, n_ctx, s.n_batch, s.threads) {
                Ok(x) => runners.push((r, Some(x))),
                Err(e) => {
                    progress(&format!("{}: skipped at ctx {ctx}: {e}", r.label()));
                    runners.push((r, None));
                }
            }
        }
        let mut prompt = vec![Vec::new(); rows.len()];
        let mut decode = vec![Vec::new(); rows.len()];
        let mut bytes = vec![0usize; rows.len()];
        for rep in 0..s.reps {
            for (i, (r, runner)) in runners.iter_mut().enumerate() {
                let Some(runner) = runner else { continue };
                progress(&format!(
                    "ctx {ctx} rep {}/{}: {}",
                    rep + 1,
                    s.reps,
                    r.label()
                ));
                runner.reset()?;
                let t0 = Instant::now();
                runner.feed(&tokens[..ctx])?;
                prompt[i].push(ctx as f64 / t0.elapsed().as_secs_f64());
                let t1 = Instant::now();
                for t in &tokens[ctx..ctx + s.n_decode] {
                    runner.feed(std::slice::from_ref(t))?;
                }
                decode[i].push(s.n_decode as f64 / t1.elapsed().as_secs_f64());
                bytes[i] = runner.kv_bytes();
            }
        }
        for (i, (r, runner)) in runners.iter().enumerate() {
            if runner.is_none() {
                continue;
            }
            out.push(BenchResult {
                engine: r.engine,
                cache: r.name.clone(),
                ctx,
                prompt_tok_s: median(&prompt[i]),
                decode_tok_s: median(&decode[i]),
                prompt_runs: prompt[i].clone(),
                decode_runs: decode[i].clone(),
                kv_bytes: bytes[i],
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(&[]).is_nan());
    }
}
