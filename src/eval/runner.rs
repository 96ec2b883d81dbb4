//! A "row" of an evaluation: an engine (llama.cpp itself, or ours) with a cache type, able to
//! produce the logits of a chunk of tokens from an empty cache.

use crate::error::{Error, Result};
use crate::kind::CacheKind;
pub use crate::kind::{CacheRow, Engine};
use crate::llama::{LlamaContext, LlamaContextParams, LlamaModel};
use crate::model::{Logits, Model, Session, SessionParams};

/// Produces the logits of `[first, n)` of a chunk of n tokens, decoded from an empty cache.
pub trait ChunkRunner {
    /// `[n - first][n_vocab]` logits of positions first..n-1.
    fn run(&mut self, tokens: &[i32], first: usize) -> Result<Vec<f32>>;
    /// KV-cache bytes allocated now (after a run: for a full chunk).
    fn kv_bytes(&self) -> usize;
    /// Empties the cache.
    fn reset(&mut self) -> Result<()>;
    /// What the cache decided from the data in the last run, and its bytes at `n_tokens`
    /// with those decisions (caches that decide nothing: None).
    fn choices(&self, _n_tokens: usize) -> Option<(crate::cache::CacheChoices, usize)> {
        None
    }
    /// Appends `tokens` after what is cached, computing only the last token's logits (what
    /// prompt processing and decoding do).
    fn feed(&mut self, tokens: &[i32]) -> Result<()>;
}

struct LlamaRunner<'m> {
    ctx: LlamaContext<'m>,
    n_vocab: usize,
    bytes_per_token: f64,
    n_ctx: usize,
}

impl ChunkRunner for LlamaRunner<'_> {
    fn run(&mut self, tokens: &[i32], first: usize) -> Result<Vec<f32>> {
        self.ctx.clear();
        let mut l = self.ctx.decode_all_logits(tokens)?;
        l.drain(..first * self.n_vocab);
        Ok(l)
    }
    fn kv_bytes(&self) -> usize {
        (self.bytes_per_token * self.n_ctx as f64) as usize
    }
    fn reset(&mut self) -> Result<()> {
        self.ctx.clear();
        Ok(())
    }
    fn feed(&mut self, tokens: &[i32]) -> Result<()> {
        self.ctx.decode(tokens, false).map(drop)
    }
}

struct OurRunner<'m> {
    s: Session<'m>,
    n_vocab: usize,
}

impl ChunkRunner for OurRunner<'_> {
    fn run(&mut self, tokens: &[i32], first: usize) -> Result<Vec<f32>> {
        self.s.reset()?;
        let mut l = self.s.eval(tokens, Logits::All)?;
        l.drain(..first * self.n_vocab);
        Ok(l)
    }
    fn kv_bytes(&self) -> usize {
        self.s.kv_bytes()
    }
    fn reset(&mut self) -> Result<()> {
        self.s.reset()
    }
    fn choices(&self, n_tokens: usize) -> Option<(crate::cache::CacheChoices, usize)> {
        self.s.cache_choices(n_tokens)
    }
    fn feed(&mut self, tokens: &[i32]) -> Result<()> {
        self.s.eval(tokens, Logits::Last).map(drop)
    }
}

/// Builds the runner of a row for chunks of `n_ctx` tokens.
pub fn make_runner<'m>(
    spec: &CacheRow,
    llama: &'m LlamaModel,
    ours: &'m Model,
    n_ctx: usize,
    n_batch: usize,
    threads: usize,
) -> Result<Box<dyn ChunkRunner + 'm>> {
    let n_vocab = llama.n_vocab();
    match spec.engine {
        Engine::Llama => {
            let ct = match spec.kind {
                CacheKind::Block { ty, .. } => ty,
                CacheKind::Ott(_) => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: llama.cpp does not run our cache",
                        spec.label()
                    )))
                }
            };
            let p = LlamaContextParams {
                n_ctx: n_ctx as u32,
                n_batch: n_batch as u32,
                threads,
                cache_k: ct,
                cache_v: ct,
                ..Default::default()
            };
            let ctx = LlamaContext::new(llama, &p)?;
            let hp = &ours.hparams;
            // llama.cpp allocates cells for n_ctx rounded up to 256; per token, K and V.
            let elems = 2.0 * hp.n_layer as f64 * hp.n_head_kv as f64 * hp.head_dim_k as f64;
            let t = ct.ggml_type();
            let (bytes, blck) = (t.type_size() as f64, t.block_size() as f64);
            let cells = n_ctx.div_ceil(256) * 256;
            Ok(Box::new(LlamaRunner {
                ctx,
                n_vocab,
                bytes_per_token: elems * bytes / blck * cells as f64 / n_ctx as f64,
                n_ctx,
            }))
        }
        Engine::Ours => {
            let sp = SessionParams {
                n_ctx,
                n_batch,
                threads,
                cache: spec.kind.clone(),
            };
            Ok(Box::new(OurRunner {
                s: Session::new(ours, sp)?,
                n_vocab,
            }))
        }
    }
}
