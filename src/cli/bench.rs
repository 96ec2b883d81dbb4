//! `ottkv bench -m MODEL --ctx 512,2048,8192`: prompt and decode speed side by side.

use crate::error::{Error, Result};
use crate::eval::bench::{run_bench, BenchSettings};
use crate::eval::memory::peak_rss_bytes;
use crate::kind::{parse_rows, CacheRow};
use crate::llama::LlamaModel;
use crate::model::Model;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[arg(short, long)]
    model: PathBuf,
    /// Filled contexts to measure at (prompt of that many tokens, then decoding).
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 2048], value_parser = super::parse_positive)]
    ctx: Vec<usize>,
    /// Rows, as for `compare` (`llama:<type>` is llama.cpp itself).
    #[arg(
        long,
        default_value = "llama:f16,llama:q8_0,llama:q4_0,f16,q4_0,ott2,ottk4v2"
    )]
    cache: Vec<String>,
    /// Tokens decoded one at a time after the prompt.
    #[arg(long, default_value_t = 32, value_parser = super::parse_positive)]
    n_decode: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = super::parse_positive)]
    reps: usize,
    #[arg(short = 'b', long, default_value_t = 512, value_parser = super::parse_positive)]
    batch: usize,
    #[arg(short, long, default_value_t = super::default_threads(), value_parser = super::parse_threads)]
    threads: usize,
    #[arg(long)]
    json: Option<PathBuf>,
    /// PNG plot of decode tokens/s vs context.
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn run(a: &Args) -> Result<()> {
    if a.ctx.is_empty() || a.reps == 0 || a.n_decode == 0 {
        return Err(Error::InvalidArgument(
            "--ctx, --reps and --n-decode must be non-empty / positive".into(),
        ));
    }
    let rows: Vec<CacheRow> = parse_rows(&a.cache)?.into_iter().map(|(_, r)| r).collect();
    let llama = LlamaModel::load(&a.model, false)?;
    let ours = Model::load(&a.model)?;
    let need = a.ctx.iter().max().copied().unwrap_or(0) + a.n_decode;
    // Speed does not depend on the text: a fixed pseudo-random token stream.
    let nv = llama.n_vocab() as u64;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let tokens: Vec<i32> = (0..need)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % nv) as i32
        })
        .collect();
    let s = BenchSettings {
        contexts: a.ctx.clone(),
        n_decode: a.n_decode,
        reps: a.reps,
        n_batch: a.batch,
        threads: a.threads,
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let results = run_bench(&llama, &ours, &rows, &tokens, &s, |m| {
        if tty {
            eprint!("\r{m:<70}");
        } else if m.contains("skipped") {
            eprintln!("{m}");
        }
    })?;
    if tty {
        eprint!("\r{:70}\r", "");
    }
    println!(
        "threads {}, median of {} interleaved runs, {} decoded tokens after each prompt",
        a.threads, a.reps, a.n_decode
    );
    println!(
        "| ctx | engine | cache | prompt tok/s | decode tok/s | decode vs llama.cpp f16 | KV MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        let base = results
            .iter()
            .find(|b| {
                b.ctx == r.ctx && b.engine == crate::eval::runner::Engine::Llama && b.cache == "f16"
            })
            .map(|b| format!("{:.2}x", r.decode_tok_s / b.decode_tok_s))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {} | {:.1} |",
            r.ctx,
            r.engine.name(),
            r.cache,
            r.prompt_tok_s,
            r.decode_tok_s,
            base,
            r.kv_bytes as f64 / (1 << 20) as f64
        );
    }
    let rss = peak_rss_bytes();
    if let Some(b) = rss {
        println!(
            "peak RSS of the whole run: {:.0} MiB",
            b as f64 / (1 << 20) as f64
        );
    }
    if let Some(p) = &a.json {
        let j = serde_json::json!({ "threads": a.threads, "reps": a.reps, "n_decode": a.n_decode, "peak_rss_bytes": rss, "results": results });
        std::fs::write(p, serde_json::to_string_pretty(&j).expect("serializable"))
            .map_err(|e| Error::io(p, e))?;
    }
    if let Some(p) = &a.plot {
        super::compare::plot_bench(&results, p)?;
    }
    Ok(())
}
