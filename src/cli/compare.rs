//! `ottkv perplexity` and `ottkv compare`: llama-perplexity's protocol over several rows
//! (llama.cpp's own caches run by llama.cpp in process, and ours), with KL divergence against
//! the first row, a markdown table, JSON and a plot.

use crate::error::{Error, Result};
use crate::eval::compare::{run_rows, Progress, RowResult, RunSettings};
use crate::eval::perplexity::chunks;
use crate::kind::{parse_rows, CacheRow};
use crate::llama::LlamaModel;
use crate::model::Model;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What `compare` runs by default: llama.cpp's own caches (f16 first: the reference), then ours.
pub const COMPARE_ROWS: &str =
    "llama:f16,llama:q8_0,llama:q4_0,llama:q2_0,f16,ott2,ott2-p0,ottk4v2,kivi2,ott4,ott3,ott3c,ott3a,ott4a";

#[derive(clap::Args)]
pub struct CommonArgs {
    #[arg(short, long)]
    model: PathBuf,
    /// The text (its tokens are cut into chunks of N_CTX).
    #[arg(short = 'f', long)]
    file: PathBuf,
    #[arg(short = 'c', long = "ctx-size", default_value_t = 2048, value_parser = super::parse_positive)]
    n_ctx: usize,
    /// Chunks to evaluate (default: all that fit).
    #[arg(long, value_parser = super::parse_positive)]
    chunks: Option<usize>,
    #[arg(short = 'b', long, default_value_t = 512, value_parser = super::parse_positive)]
    batch: usize,
    #[arg(short, long, default_value_t = super::default_threads(), value_parser = super::parse_threads)]
    threads: usize,
}

#[derive(clap::Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Rows, separated by `;` (or commas) or given as repeated `--cache`:
    /// `llama:<f16|q8_0|q4_0|q2_0>` runs llama.cpp itself; plain names (f16, q8_0, q4_0, ott2,
    /// recommended, specs like `ott2:k=3,g=64`) run our engine.
    #[arg(long, default_value = "f16")]
    cache: Vec<String>,
}

#[derive(clap::Args)]
pub struct CompareArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Rows as for `perplexity`; the first is the reference for ΔPPL and KLD.
    #[arg(long, default_value = COMPARE_ROWS)]
    cache: Vec<String>,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a PNG plot of KLD vs bits per element (allocated at 8192 tokens).
    #[arg(long)]
    plot: Option<PathBuf>,
}

struct Prepared {
    llama: LlamaModel,
    ours: Model,
    chunks: Vec<Vec<i32>>,
    text_sha256: String,
}

fn prepare(a: &CommonArgs) -> Result<Prepared> {
    let text = super::read_text(&a.file)?;
    let llama = LlamaModel::load(&a.model, false)?;
    let ours = Model::load(&a.model)?;
    if a.n_ctx > ours.hparams.n_ctx_train as usize {
        log::warn!(
            "n_ctx {} exceeds the model's trained context {}",
            a.n_ctx,
            ours.hparams.n_ctx_train
        );
    }
    let add_bos = llama.add_bos();
    let toks = llama.tokenize(&text, add_bos)?;
    let bos = if add_bos { toks.first().copied() } else { None };
    let chunks = chunks(&toks, a.n_ctx, a.chunks, bos)?;
    Ok(Prepared {
        llama,
        ours,
        chunks,
        text_sha256: super::sha256_hex(text.as_bytes()),
    })
}

/// Ctrl-C once: finish the current run and print what finished; twice: exit at once.
fn install_stop() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: finishing the current run, then printing what finished (Ctrl-C again to quit)");
    });
    stop
}

fn run(
    a: &CommonArgs,
    rows: &[String],
    with_reference: bool,
) -> Result<(Prepared, Vec<CacheRow>, Vec<RowResult>)> {
    let specs: Vec<CacheRow> = parse_rows(rows)?.into_iter().map(|(_, r)| r).collect();
    let p = prepare(a)?;
    let stop = install_stop();
    let settings = RunSettings {
        n_ctx: a.n_ctx,
        n_batch: a.batch,
        threads: a.threads,
        with_reference,
        stop: &stop,
    };
    let mp =
        MultiProgress::with_draw_target(if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
    let style = ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} chunks {msg}")
        .expect("static template")
        .progress_chars("=> ");
    let mut bars: Vec<ProgressBar> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let results = run_rows(
        &p.llama,
        &p.ours,
        &specs,
        &p.chunks,
        &settings,
        |ev| match ev {
            Progress::Start { rows, chunks } => {
                for r in rows {
                    let b = mp.add(
                        ProgressBar::new(chunks as u64)
                            .with_style(style.clone())
                            .with_prefix(r.label()),
                    );
                    bars.push(b);
                }
            }
            Progress::RowChunkDone {
                row, ppl_so_far, ..
            } => {
                bars[row].inc(1);
                bars[row].set_message(format!("PPL {ppl_so_far:.3}"));
            }
            Progress::Skipped { row, why } => {
                bars[row].abandon_with_message(format!("skipped: {why}"));
                eprintln!("{}: skipped: {why}", specs[row].label());
                skipped.push(format!("{}: {why}", specs[row].label()));
            }
        },
    )?;
    for b in &bars {
        b.finish_and_clear();
    }
    let interrupted = stop.load(Ordering::Relaxed);
    if interrupted {
        eprintln!("interrupted: results cover the chunks every row finished");
    }
    // Nothing to report is a failure, whatever the reason: a script must not read exit 0.
    if results.is_empty() {
        return Err(if interrupted {
            Error::Interrupted
        } else {
            Error::Unsupported(format!("no row could run: {}", skipped.join("; ")))
        });
    }
    Ok((p, specs, results))
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$}"))
}

pub fn perplexity(a: &PerplexityArgs) -> Result<()> {
    let (p, _, results) = run(&a.common, &a.cache, false)?;
    println!(
        "{} chunks of {} tokens, second half of each scored",
        p.chunks.len(),
        a.common.n_ctx
    );
    for r in &results {
        let per: Vec<String> = r.chunk_ppl.iter().map(|x| format!("{x:.3}")).collect();
        println!(
            "{} {}: PPL = {:.4} +/- {:.4}   [{}]",
            r.engine.name(),
            r.cache,
            r.ppl,
            r.ppl_se,
            per.join(", ")
        );
    }
    Ok(())
}

pub fn compare(a: &CompareArgs) -> Result<()> {
    let (p, _, results) = run(&a.common, &a.cache, true)?;
    let model_sha = sha256_file(&a.common.model)?;
    print_table(&p, a.common.n_ctx, &results);
    if let Some(path) = &a.json {
        let j = serde_json::json!({
            "model": a.common.model.file_name().map(|s| s.to_string_lossy().into_owned()),
            "model_sha256": model_sha,
            "text": a.common.file.file_name().map(|s| s.to_string_lossy().into_owned()),
            "text_sha256": p.text_sha256,
            "n_ctx": a.common.n_ctx,
            "chunks": results.iter().map(|r| r.chunks).min().unwrap_or(0),
            "threads": a.common.threads,
            "results": results,
        });
        let s = serde_json::to_string_pretty(&j).map_err(|source| Error::Json {
            what: "the results",
            source,
        })?;
        std::fs::write(path, s).map_err(|e| Error::io(path, e))?;
    }
    if let Some(path) = &a.plot {
        plot(&results, a.common.n_ctx, path)?;
    }
    Ok(())
}

fn print_table(p: &Prepared, n_ctx: usize, results: &[RowResult]) {
    let reference = results.first();
    println!(
        "{} chunks x {} tokens (second half scored); reference: {}",
        results.iter().map(|r| r.chunks).min().unwrap_or(0),
        n_ctx,
        reference.map_or("-".into(), |r| format!("{} {}", r.engine.name(), r.cache))
    );
    let _ = p;
    println!("| engine | cache | PPL | ΔPPL | KLD mean | KLD p99 | KLD max | top-1 | bits/elem | bits@8192 | KV bytes/token | s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let ref_ppl = reference.map(|r| r.ppl);
    for r in results {
        let dppl = match (r.dppl, ref_ppl) {
            (Some(d), Some(p)) => format!("{d:+.3} ({:+.2}%)", 100.0 * d / p),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {:.3} ± {:.3} | {} | {} | {} | {} | {} | {:.2} | {:.3} | {:.0} | {:.0} |",
            r.engine.name(),
            r.cache,
            r.ppl,
            r.ppl_se,
            dppl,
            fmt_opt(r.kld_mean, 5),
            fmt_opt(r.kld_p99, 4),
            fmt_opt(r.kld_max, 3),
            r.top1.map_or("-".into(), |t| format!("{:.2}%", 100.0 * t)),
            r.bits_per_element,
            r.bits_at_8192,
            r.kv_bytes_per_token,
            r.seconds
        );
    }
    for r in results {
        if let Some(c) = &r.choices {
            println!("{} {} chose: {c}", r.engine.name(), r.cache);
        }
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn plot(results: &[RowResult], n_ctx: usize, path: &Path) -> Result<()> {
    use crate::eval::plot::{scatter_png, Axes, Point};
    let short = |r: &RowResult| match r.engine {
        crate::eval::runner::Engine::Llama => format!("llama.cpp {}", r.cache),
        crate::eval::runner::Engine::Ours => r.cache.clone(),
    };
    // The reference row has no KLD (and a log axis cannot show 0): it is the frame of reference.
    let points: Vec<Point> = results
        .iter()
        .filter_map(|r| {
            Some(Point {
                label: short(r),
                x: r.bits_at_8192,
                y: r.kld_mean.filter(|k| *k > 0.0)?,
            })
        })
        .collect();
    let axes = Axes {
        title: format!("KL divergence vs llama.cpp f16, n_ctx {n_ctx}"),
        x_label: "KV bits per element, allocated at 8192 tokens".into(),
        y_label: "mean KLD".into(),
        log_x: false,
        log_y: true,
    };
    scatter_png(&points, &axes, path).map_err(|e| Error::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub(crate) fn plot_bench(results: &[crate::eval::bench::BenchResult], path: &Path) -> Result<()> {
    use crate::eval::plot::{lines_png, Axes, Series};
    let mut series: Vec<Series> = Vec::new();
    for r in results {
        let label = format!("{} {}", r.engine.name(), r.cache);
        match series.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push((r.ctx as f64, r.decode_tok_s)),
            None => series.push(Series {
                label,
                points: vec![(r.ctx as f64, r.decode_tok_s)],
            }),
        }
    }
    let axes = Axes {
        title: "Decode speed vs filled context".into(),
        x_label: "tokens in the cache".into(),
        y_label: "decode tokens/s".into(),
        log_x: true,
        log_y: false,
    };
    lines_png(&series, &axes, path).map_err(|e| Error::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
