//! A "row" of an evaluation: an engine (llama.cpp itself, or ours) with a cache type, able to
//! produce the logits of a chunk of tokens from an empty cache.

use crate::error::{Error, Result};
use crate::llama::{CacheType, LlamaContext, LlamaContextParams, LlamaModel};
use crate::model::{KvKind, Logits, Model, Session, SessionParams};

/// Which engine runs a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Engine {
    #[serde(rename = "llama.cpp")]
    Llama,
    #[serde(rename = "ottkv")]
    Ours,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Llama => "llama.cpp",
            Engine::Ours => "ottkv",
        }
    }
}

/// An engine + cache pair, parsed from `llama.cpp:q4_0` / `llama:q4_0` (llama.cpp's own cache)
/// or a plain cache name (ours).
#[derive(Clone, Debug)]
pub struct RowSpec {
    pub engine: Engine,
    pub cache: String,
}

impl RowSpec {
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        for prefix in ["llama.cpp:", "llama:"] {
            if let Some(c) = s.strip_prefix(prefix) {
                CacheType::parse(c).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "llama.cpp cache types are f16, q8_0, q4_0, q2_0; not {c:?}"
                    ))
                })?;
                return Ok(RowSpec {
                    engine: Engine::Llama,
                    cache: c.to_string(),
                });
            }
        }
        KvKind::parse(s)?;
        Ok(RowSpec {
            engine: Engine::Ours,
            cache: s.to_string(),
        })
    }

    pub fn label(&self) -> String {
        format!("{} {}", self.engine.name(), self.cache)
    }

    /// KV bits per cached element (K and V, all layers) this row allocates for a sequence of
    /// `n_tokens` tokens, from the closed forms: ggml caches pad to 256 cells as llama.cpp
    /// does; ours is `expected_memory`, which equals what the cache reports (tested).
    pub fn bits_at(&self, hp: &crate::gguf::ModelHparams, n_tokens: usize) -> Result<f64> {
        let elems = 2.0 * hp.n_layer as f64 * hp.n_head_kv as f64 * hp.head_dim_k as f64;
        let padded = |bytes: f64, blck: f64| {
            let cells = n_tokens.div_ceil(256) * 256;
            8.0 * bytes / blck * cells as f64 / n_tokens as f64
        };
        let ggml =
            |ty: crate::gguf::GgmlType| padded(ty.type_size() as f64, ty.block_size() as f64);
        if n_tokens == 0 {
            return Err(Error::InvalidArgument("bits_at: zero tokens".into()));
        }
        let ty_of = |id: u32| {
            crate::gguf::GgmlType::from_id(id)
                .ok_or_else(|| Error::InvalidArgument(format!("ggml type {id} unknown")))
        };
        Ok(match self.engine {
            Engine::Llama => {
                let ct = CacheType::parse(&self.cache).expect("validated by RowSpec::parse");
                ggml(ty_of(ct.ggml_type())?)
            }
            Engine::Ours => match KvKind::parse(&self.cache)? {
                KvKind::Ggml { ty, .. } => ggml(ty_of(ty)?),
                KvKind::Ott(c) => {
                    let shape = crate::cache::CacheShape {
                        n_layer: hp.n_layer as usize,
                        n_head_kv: hp.n_head_kv as usize,
                        head_dim: hp.head_dim_k as usize,
                        max_tokens: n_tokens,
                    };
                    let m = crate::cache::expected_memory(&c, &shape, n_tokens)?;
                    m.total as f64 * 8.0 / (elems * n_tokens as f64)
                }
            },
        })
    }
}

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
    spec: &RowSpec,
    llama: &'m LlamaModel,
    ours: &'m Model,
    n_ctx: usize,
    n_batch: usize,
    threads: usize,
) -> Result<Box<dyn ChunkRunner + 'm>> {
    let n_vocab = llama.n_vocab();
    match spec.engine {
        Engine::Llama => {
            let ct = CacheType::parse(&spec.cache).expect("validated by RowSpec::parse");
            let p = LlamaContextParams {
                n_ctx: n_ctx as u32,
                n_batch: n_batch as u32,
                threads,
                cache_k: ct,
                cache_v: ct,
            };
            let ctx = LlamaContext::new(llama, &p)?;
            let hp = &ours.hparams;
            // llama.cpp allocates cells for n_ctx rounded up to 256; per token, K and V.
            let elems = 2.0 * hp.n_layer as f64 * hp.n_head_kv as f64 * hp.head_dim_k as f64;
            let (bytes, blck) = match ct {
                CacheType::F16 => (2.0, 1.0),
                CacheType::Q8_0 => (34.0, 32.0),
                CacheType::Q4_0 => (18.0, 32.0),
                CacheType::Q2_0 => (
                    crate::gguf::GgmlType::Q2_0.type_size() as f64,
                    crate::gguf::GgmlType::Q2_0.block_size() as f64,
                ),
            };
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
                cache: KvKind::parse(&spec.cache)?,
            };
            Ok(Box::new(OurRunner {
                s: Session::new(ours, sp)?,
                n_vocab,
            }))
        }
    }
}
