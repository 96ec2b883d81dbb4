//! Runs several rows (engine + cache) over the same chunks, chunk by chunk, so the reference
//! row's logits for a chunk are only held while the other rows are scored against them.

use super::perplexity::{first_scored, Scores, Summary};
use super::runner::make_runner;
use crate::error::Result;
use crate::kind::{CacheKind, CacheRow, Engine};
use crate::llama::LlamaModel;
use crate::model::Model;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// One row of results.
#[derive(Clone, Debug, Serialize)]
pub struct RowResult {
    pub engine: Engine,
    pub cache: String,
    /// Our cache's full settings the name stands for (a preset or alias such as
    /// `recommended`, written out), so a result stays readable when presets move.
    pub resolved: Option<String>,
    pub ppl: f64,
    pub ppl_se: f64,
    /// PPL minus the reference row's PPL (absolute).
    pub dppl: Option<f64>,
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    pub kld_max: Option<f64>,
    pub top1: Option<f64>,
    /// Allocated KV bits per cached element after a full chunk (K and V, all layers).
    pub bits_per_element: f64,
    /// The same at 8192 tokens (closed form), the length the frontier is judged at.
    pub bits_at_8192: f64,
    pub kv_bytes_per_token: f64,
    /// What the cache decided from the data on the last chunk (`rot=auto`, `wb=auto`); the
    /// bits at 8192 tokens are costed with these decisions.
    pub choices: Option<crate::cache::CacheChoices>,
    pub seconds: f64,
    pub chunks: usize,
    pub chunk_ppl: Vec<f64>,
}

/// Sequence length at which bits per element are compared across caches (the window and pools
/// of our cache make its cost depend on length; ggml caches are flat).
pub const FRONTIER_TOKENS: usize = 8192;

/// Settings of a multi-row run.
pub struct RunSettings<'a> {
    pub n_ctx: usize,
    pub n_batch: usize,
    pub threads: usize,
    /// The first row is the reference for KLD / top-1 / ΔPPL when `with_reference`.
    pub with_reference: bool,
    /// Checked between runs: when set, the run stops and returns what finished.
    pub stop: &'a AtomicBool,
}

/// Events for progress display.
pub enum Progress<'a> {
    Start {
        rows: &'a [CacheRow],
        chunks: usize,
    },
    RowChunkDone {
        row: usize,
        chunk: usize,
        ppl_so_far: f64,
    },
    Skipped {
        row: usize,
        why: String,
    },
}

/// Runs every row over every chunk. Rows that cannot be created (a cache llama.cpp refuses,
/// say) are skipped and reported through `progress`; at least the reference must run.
pub fn run_rows(
    llama: &LlamaModel,
    ours: &Model,
    rows: &[CacheRow],
    chunks: &[Vec<i32>],
    s: &RunSettings<'_>,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Vec<RowResult>> {
    let n_vocab = llama.n_vocab();
    let first = first_scored(s.n_ctx);
    progress(Progress::Start {
        rows,
        chunks: chunks.len(),
    });
    let mut runners = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        match make_runner(r, llama, ours, s.n_ctx, s.n_batch, s.threads) {
            Ok(x) => runners.push(Some(x)),
            Err(e) if i > 0 || !s.with_reference => {
                progress(Progress::Skipped {
                    row: i,
                    why: e.to_string(),
                });
                runners.push(None);
            }
            Err(e) => return Err(e),
        }
    }
    let mut scores = vec![Scores::default(); rows.len()];
    let mut seconds = vec![0f64; rows.len()];
    let mut bytes = vec![0usize; rows.len()];
    let mut choices = vec![None; rows.len()];
    'chunks: for (ci, chunk) in chunks.iter().enumerate() {
        let mut reference: Option<Vec<f32>> = None;
        for (ri, runner) in runners.iter_mut().enumerate() {
            let Some(runner) = runner else { continue };
            if s.stop.load(Ordering::Relaxed) {
                // Drop this partial chunk from every row so all rows cover the same chunks.
                for sc in scores.iter_mut().take(ri) {
                    sc.rollback_last_chunk();
                }
                break 'chunks;
            }
            let t0 = Instant::now();
            let logits = runner.run(chunk, first)?;
            seconds[ri] += t0.elapsed().as_secs_f64();
            bytes[ri] = runner.kv_bytes();
            choices[ri] = runner
                .choices(FRONTIER_TOKENS)
                .filter(|(c, _)| !c.is_empty());
            let refl = if s.with_reference && ri > 0 {
                reference.as_deref()
            } else {
                None
            };
            scores[ri].add_chunk(chunk, first, &logits, n_vocab, refl);
            if s.with_reference && ri == 0 {
                reference = Some(logits);
            }
            progress(Progress::RowChunkDone {
                row: ri,
                chunk: ci,
                ppl_so_far: scores[ri].summary().ppl,
            });
        }
    }
    let hp = &ours.hparams;
    let elems_per_token = 2.0 * hp.n_layer as f64 * hp.n_head_kv as f64 * hp.head_dim_k as f64;
    let ref_ppl = scores.first().map(|x| x.summary().ppl);
    let mut out = Vec::new();
    for (ri, r) in rows.iter().enumerate() {
        if runners[ri].is_none() || scores[ri].count == 0 {
            continue;
        }
        let m: Summary = scores[ri].summary();
        let bpt = bytes[ri] as f64 / s.n_ctx as f64;
        out.push(RowResult {
            engine: r.engine,
            cache: r.name.clone(),
            resolved: match (r.engine, &r.kind) {
                (Engine::Ours, CacheKind::Ott(c)) => Some(c.to_string()),
                _ => None,
            },
            ppl: m.ppl,
            ppl_se: m.ppl_se,
            dppl: if s.with_reference {
                ref_ppl.map(|p| m.ppl - p)
            } else {
                None
            },
            kld_mean: m.kld_mean,
            kld_p99: m.kld_p99,
            kld_max: m.kld_max,
            top1: m.top1,
            bits_per_element: bpt * 8.0 / elems_per_token,
            bits_at_8192: match &choices[ri] {
                Some((_, b)) => *b as f64 * 8.0 / (elems_per_token * FRONTIER_TOKENS as f64),
                None => r.bits_at(hp, FRONTIER_TOKENS)?,
            },
            kv_bytes_per_token: bpt,
            choices: choices[ri].clone().map(|(c, _)| c),
            seconds: seconds[ri],
            chunks: m.chunks,
            chunk_ppl: scores[ri].chunk_ppl.clone(),
        });
    }
    Ok(out)
}
