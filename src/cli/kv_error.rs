//! `ottkv kv-error FILE [--json OUT]`: replays a K/V dump through each cache type.

use crate::error::{Error, Result};
use crate::eval::kv_error::{kv_error, CacheKind, DEFAULT_CACHES};
use crate::eval::kvdump::KvDump;
use crate::kind::parse_rows;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A dump written by `ottkv dump-kv`.
    dump: PathBuf,
    /// Write the full report (per layer too) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Cache types, separated by `;` (or commas) or given as repeated `--caches`: f16, q8_0,
    /// q4_0 (rotated as llama.cpp), q8_0-norot, q4_0-norot, OTT presets (ott2, ott2-p0,
    /// ottk4v2, kivi2, ott4, kivi4, recommended, ...) or specs like `ott:k=3,v=2,g=64`.
    #[arg(long, default_values_t = [DEFAULT_CACHES.join(",")])]
    caches: Vec<String>,
    /// Print the per-layer attention error too.
    #[arg(long)]
    per_layer: bool,
    #[arg(short, long, default_value_t = super::default_threads(), value_parser = super::parse_threads)]
    threads: usize,
}

pub fn run(a: &Args) -> Result<()> {
    let d = KvDump::read(&a.dump)?;
    let caches: Vec<(String, CacheKind)> = parse_rows(&a.caches)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let n_layer = d.n_layer;
    let report = kv_error(&d, &caches, a.threads, |c, l| {
        if tty {
            eprint!("\r{c:<12} layer {:>3}/{n_layer}   ", l + 1);
            let _ = std::io::stderr().flush();
        }
    })?;
    if tty {
        eprint!("\r{:40}\r", "");
    }
    let f16 = report
        .results
        .iter()
        .find(|r| r.cache == "f16")
        .map(|r| r.bytes_per_token);
    println!(
        "{}: {} tokens, {} layers, {} q / {} kv heads, head_dim {}; errors on queries {}..{}",
        d.model,
        d.n_tokens,
        d.n_layer,
        d.n_head,
        d.n_head_kv,
        d.head_dim,
        d.n_tokens / 2,
        d.n_tokens - 1
    );
    println!("| cache | attn_rel_err | k_nmse | v_nmse | bytes/token | vs f16 |");
    println!("|---|---|---|---|---|---|");
    for r in &report.results {
        let ratio = f16
            .map(|f| format!("{:.2}x", f / r.bytes_per_token))
            .unwrap_or_default();
        println!(
            "| {} | {:.4} | {:.5} | {:.5} | {:.1} | {} |",
            r.cache, r.attn_rel_err, r.k_nmse, r.v_nmse, r.bytes_per_token, ratio
        );
    }
    if a.per_layer {
        for r in &report.results {
            let v: Vec<String> = r
                .per_layer
                .iter()
                .map(|l| format!("{:.3}", l.attn_rel_err))
                .collect();
            println!("{:<12} {}", r.cache, v.join(" "));
        }
    }
    if let Some(p) = &a.json {
        let s = serde_json::to_string_pretty(&report).map_err(|source| Error::Json {
            what: "the report",
            source,
        })?;
        std::fs::write(p, s).map_err(|e| Error::io(p, e))?;
    }
    Ok(())
}
