//! A sequence being decoded: the model, a KV cache, the position, and the graph per
//! (sub-)batch: embeddings (gemma3: scaled by √n_embd) → per layer [RMSNorm, Q/K/V (+bias),
//! per-head q/k RMSNorm (qwen3, gemma3), RoPE (with Llama 3 frequency factors when the file
//! has them; gemma3's window layers with their own base), cache write + attention (gemma3's
//! window layers through a sliding-window mask), output projection (gemma3: post-norm),
//! residual, RMSNorm, SwiGLU FFN (gemma3: GELU-gated, post-norm), residual] → norm → logits
//! (gemma3: optional soft-capping).

use super::kv::{join, tokens, Kv};
use super::weights::{Arch, Model, W};
use crate::error::{Error, Result};
use crate::ggml::{Context, GraphAllocator, RopeMode, RopeParams, Tensor, GRAPH_NODES};
use crate::gguf::{GgmlType, RopeType};
use crate::kind::CacheKind;

/// Settings of a decoding session.
#[derive(Clone, Debug)]
pub struct SessionParams {
    /// Most tokens the session can hold.
    pub n_ctx: usize,
    /// Most tokens computed in one graph.
    pub n_batch: usize,
    pub threads: usize,
    pub cache: CacheKind,
}

/// Which logits `eval` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every new token's, `[n][n_vocab]`.
    All,
    /// The last new token's, `[n_vocab]`.
    Last,
}

pub struct Session<'m> {
    model: &'m Model,
    kv: Kv,
    p: SessionParams,
    n_past: usize,
    alloc: GraphAllocator,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, p: SessionParams) -> Result<Self> {
        if p.n_ctx == 0 || p.n_batch == 0 {
            return Err(Error::InvalidArgument(
                "n_ctx and n_batch must be positive".into(),
            ));
        }
        let kv = Kv::new(&p.cache, &model.hparams, p.n_ctx)?;
        Ok(Self {
            model,
            kv,
            p,
            n_past: 0,
            alloc: GraphAllocator::new()?,
        })
    }

    pub fn n_past(&self) -> usize {
        self.n_past
    }

    pub fn n_ctx(&self) -> usize {
        self.p.n_ctx
    }

    /// KV-cache bytes allocated now.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// What the cache decided from the data so far and its memory at `n_tokens` with those
    /// decisions (our cache only).
    pub fn cache_choices(&self, n_tokens: usize) -> Option<(crate::cache::CacheChoices, usize)> {
        self.kv.choices(n_tokens)
    }

    /// Forgets every token: the next `eval` starts at position 0.
    pub fn reset(&mut self) -> Result<()> {
        self.kv.reset()?;
        self.n_past = 0;
        Ok(())
    }

    /// Runs `tokens` after what the session holds and returns their logits.
    pub fn eval(&mut self, tokens: &[i32], logits: Logits) -> Result<Vec<f32>> {
        let end = self.n_past + tokens.len();
        if end > self.p.n_ctx {
            return Err(Error::ContextOverflow {
                needed: end,
                n_ctx: self.p.n_ctx,
            });
        }
        let n_vocab = self.model.hparams.vocab_size as usize;
        if let Some(&t) = tokens.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            return Err(Error::TokenOutOfVocab { token: t, n_vocab });
        }
        let mut out = Vec::with_capacity(
            n_vocab
                * if logits == Logits::All {
                    tokens.len()
                } else {
                    1
                },
        );
        let mut done = 0;
        while done < tokens.len() {
            let batch = &tokens[done..(done + self.p.n_batch).min(tokens.len())];
            for r in self.kv.plan(self.n_past, batch.len())? {
                let last = done + r.end == tokens.len();
                let sub = &batch[r];
                let want = match logits {
                    Logits::All => Some(false),
                    Logits::Last if last => Some(true),
                    Logits::Last => None,
                };
                let l = self.run(sub, want)?;
                out.extend_from_slice(&l);
                self.n_past += sub.len();
            }
            done += batch.len();
        }
        Ok(out)
    }

    /// One graph: `tokens` at positions n_past.., logits of all (`Some(false)`), of the last
    /// (`Some(true)`) or of none (`None`).
    fn run(&mut self, tokens: &[i32], logits: Option<bool>) -> Result<Vec<f32>> {
        let part = Part {
            kv: &self.kv,
            n_past: self.n_past,
            tokens,
        };
        forward(self.model, &[part], logits, self.p.threads, &mut self.alloc)
    }
}

/// Advances several sessions of one model through shared graphs: each step computes one
/// graph over the next tokens of every sequence given, the weight matmuls over all of them at
/// once and attention per sequence over its own cache.
pub struct Batcher {
    alloc: GraphAllocator,
    threads: usize,
}

/// What one sequence got from `Batcher::step`.
#[derive(Debug)]
pub struct Stepped {
    /// Tokens of its input the step consumed (a prefix: at most its session's `n_batch`, and
    /// never across one of its cache's flush points).
    pub consumed: usize,
    /// The logits of the last consumed token, `[n_vocab]`.
    pub logits: Vec<f32>,
}

impl Batcher {
    pub fn new(threads: usize) -> Result<Self> {
        Ok(Self {
            alloc: GraphAllocator::new()?,
            threads,
        })
    }

    /// One graph over a prefix of each sequence's `tokens`: the same prefix, and the same
    /// numbers, as `Session::eval` computes for that sequence in a graph of its own. Every
    /// session must belong to one model and every input must be non-empty. An error leaves
    /// every session of the step in an unknown state: reset them before reuse.
    pub fn step(&mut self, seqs: &mut [(&mut Session<'_>, &[i32])]) -> Result<Vec<Stepped>> {
        let Some(((first, _), _)) = seqs.split_first() else {
            return Ok(Vec::new());
        };
        let model = first.model;
        let n_vocab = model.hparams.vocab_size as usize;
        let mut parts = Vec::with_capacity(seqs.len());
        for (s, tokens) in seqs.iter() {
            if !std::ptr::eq(s.model, model) {
                return Err(Error::InvalidArgument(
                    "a batch step takes sessions of one model".into(),
                ));
            }
            if tokens.is_empty() {
                return Err(Error::InvalidArgument(
                    "every sequence of a batch step needs a token".into(),
                ));
            }
            let want = tokens.len().min(s.p.n_batch);
            let cut = s.kv.plan(s.n_past, want)?.first().map_or(want, |r| r.end);
            let tokens = &tokens[..cut.max(1)];
            if s.n_past + tokens.len() > s.p.n_ctx {
                return Err(Error::ContextOverflow {
                    needed: s.n_past + tokens.len(),
                    n_ctx: s.p.n_ctx,
                });
            }
            if let Some(&t) = tokens.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
                return Err(Error::TokenOutOfVocab { token: t, n_vocab });
            }
            parts.push(Part {
                kv: &s.kv,
                n_past: s.n_past,
                tokens,
            });
        }
        let out = forward(model, &parts, Some(true), self.threads, &mut self.alloc)?;
        let consumed: Vec<usize> = parts.iter().map(|p| p.tokens.len()).collect();
        drop(parts);
        Ok(seqs
            .iter_mut()
            .zip(consumed)
            .zip(out.chunks_exact(n_vocab))
            .map(|(((s, _), consumed), l)| {
                s.n_past += consumed;
                Stepped {
                    consumed,
                    logits: l.to_vec(),
                }
            })
            .collect())
    }
}

/// One sequence's tokens in a graph, after the `n_past` its cache holds.
struct Part<'a> {
    kv: &'a Kv,
    n_past: usize,
    tokens: &'a [i32],
}

/// One graph over the tokens of `parts`, back to back: logits of every token
/// (`Some(false)`), of each part's last (`Some(true)`) or none (`None`). A part's numbers do
/// not depend on the others: every op but attention acts per token, and attention runs per
/// part over that part's cache.
fn forward(
    m: &Model,
    parts: &[Part<'_>],
    logits: Option<bool>,
    threads: usize,
    alloc: &mut GraphAllocator,
) -> Result<Vec<f32>> {
    let hp = &m.hparams;
    let n: usize = parts.iter().map(|p| p.tokens.len()).sum();
    let (hd, nh, nkv) = (hp.head_dim_k as i64, hp.n_head as i64, hp.n_head_kv as i64);
    let gemma = m.arch == Arch::Gemma3;
    // gemma3 scales q before attention and attends with scale 1 (its 27B, the one
    // 62-layer model, by n_embd / n_head rather than the head size), as llama.cpp does.
    let (q_scale, scale) = if gemma {
        let d = if hp.n_layer == 62 {
            hp.n_embd / hp.n_head
        } else {
            hp.head_dim_k
        };
        (Some(1.0 / (d as f32).sqrt()), 1.0)
    } else {
        (None, 1.0 / (hd as f32).sqrt())
    };
    let ops = parts
        .iter()
        .map(|p| p.kv.ops(p.tokens.len(), nh as usize, scale))
        .collect::<Result<Vec<_>>>()?;
    // Each further sequence adds its views, cache ops and a join per layer, and so does each
    // further run of our cache between flush points.
    let n_layer = hp.n_layer as usize;
    let nodes = GRAPH_NODES
        + (parts.len() - 1) * n_layer * 32
        + ops
            .iter()
            .flatten()
            .map(|o| o.extra_nodes(n_layer))
            .sum::<usize>();
    let ctx = Context::new(Context::overhead(nodes, nodes), true)?;
    let graph = ctx.new_graph(nodes)?;

    let inp_tok = ctx.new_tensor(GgmlType::I32.id(), &[n as i64])?;
    let inp_pos = ctx.new_tensor(GgmlType::I32.id(), &[n as i64])?;
    inp_tok.set_input();
    inp_pos.set_input();
    let kv_inp = parts
        .iter()
        .map(|p| p.kv.inputs(&ctx, p.n_past, p.tokens.len()))
        .collect::<Result<Vec<_>>>()?;
    let rope_full = RopeParams {
        n_dims: hp.rope_dim as i32,
        mode: match hp.rope_type {
            RopeType::Norm => RopeMode::Normal,
            RopeType::Neox => RopeMode::Neox,
        },
        n_ctx_orig: hp.n_ctx_train as i32,
        freq_base: hp.rope_freq_base,
        freq_scale: hp.rope_freq_scale,
        ext_factor: 0.0,
        attn_factor: 1.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
    };
    let rope_swa = RopeParams {
        freq_base: hp.rope_freq_base_swa,
        freq_scale: hp.rope_freq_scale_swa,
        ..rope_full
    };
    let freq_factors = m.rope_freqs.map(|w| m.t(w));
    let eps = hp.rms_norm_eps;
    let lin = |w, x| linear(&ctx, m, w, x);
    let with_bias = |x, b| bias(&ctx, m, x, b);
    let norm = |x, w: W| ctx.mul(ctx.rms_norm(x, eps)?, m.t(w));
    let opt_norm = |x, w: Option<W>| match w {
        Some(w) => norm(x, w),
        None => Ok(x),
    };
    // Part i's tokens of a `[hd, heads, n]` tensor.

    // [n_embd, n]
    let mut x = ctx.get_rows(m.t(m.tok_embd), inp_tok)?;
    if gemma {
        x = ctx.scale(x, (hp.n_embd as f32).sqrt())?;
    }
    for (l, lw) in m.layers.iter().enumerate() {
        let swa = hp.swa_layers.get(l).copied().unwrap_or(false);
        let rope = if swa { &rope_swa } else { &rope_full };
        let cur = norm(x, lw.attn_norm)?;
        let q = with_bias(lin(lw.wq, cur)?, lw.bq)?;
        let k = with_bias(lin(lw.wk, cur)?, lw.bk)?;
        let v = with_bias(lin(lw.wv, cur)?, lw.bv)?;
        // [hd, heads, n]: the q/k norms act per head.
        let q = opt_norm(ctx.reshape_3d(q, hd, nh, n as i64)?, lw.q_norm)?;
        let k = opt_norm(ctx.reshape_3d(k, hd, nkv, n as i64)?, lw.k_norm)?;
        let mut q = ctx.rope(q, inp_pos, freq_factors, rope)?;
        let k = ctx.rope(k, inp_pos, freq_factors, rope)?;
        if let Some(s) = q_scale {
            q = ctx.scale(q, s)?;
        }
        let v = ctx.reshape_3d(v, hd, nkv, n as i64)?;
        let mut outs = Vec::with_capacity(parts.len());
        let mut start = 0;
        for (i, p) in parts.iter().enumerate() {
            let r = start..start + p.tokens.len();
            let (qi, ki, vi) = (
                tokens(&ctx, q, &r)?,
                tokens(&ctx, k, &r)?,
                tokens(&ctx, v, &r)?,
            );
            let a = p.kv.attention(
                &ctx,
                &graph,
                &kv_inp[i],
                ops[i].as_ref(),
                l,
                qi,
                ki,
                vi,
                scale,
                swa,
            )?;
            outs.push(a);
            start = r.end;
        }
        let att = join(&ctx, outs, 1)?;
        let att = opt_norm(lin(lw.wo, att)?, lw.attn_post_norm)?;
        x = ctx.add(att, x)?;
        let cur = norm(x, lw.ffn_norm)?;
        let (gate, up) = (lin(lw.ffn_gate, cur)?, lin(lw.ffn_up, cur)?);
        let ff = if gemma {
            ctx.geglu_split(gate, up)?
        } else {
            ctx.swiglu_split(gate, up)?
        };
        let ff = opt_norm(lin(lw.ffn_down, ff)?, lw.ffn_post_norm)?;
        x = ctx.add(ff, x)?;
    }
    let inp_out = match logits {
        Some(true) => {
            let ids = ctx.new_tensor(GgmlType::I32.id(), &[parts.len() as i64])?;
            ids.set_input();
            x = ctx.get_rows(x, ids)?;
            Some(ids)
        }
        _ => None,
    };
    let out = if logits.is_some() {
        let mut out = lin(m.output, norm(x, m.output_norm)?)?;
        let cap = hp.final_logit_softcapping;
        if cap != 0.0 {
            out = ctx.scale(ctx.tanh(ctx.scale(out, 1.0 / cap)?)?, cap)?;
        }
        out
    } else {
        x
    };
    out.set_output();
    graph.expand(out);
    alloc.alloc(&graph)?;

    let bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let toks: Vec<i32> = parts
        .iter()
        .flat_map(|p| p.tokens.iter().copied())
        .collect();
    inp_tok.set_bytes(&bytes(&toks))?;
    let pos: Vec<i32> = parts
        .iter()
        .flat_map(|p| (p.n_past..p.n_past + p.tokens.len()).map(|q| q as i32))
        .collect();
    inp_pos.set_bytes(&bytes(&pos))?;
    if let Some(ids) = inp_out {
        let lasts: Vec<i32> = parts
            .iter()
            .scan(0, |end, p| {
                *end += p.tokens.len();
                Some(*end as i32 - 1)
            })
            .collect();
        ids.set_bytes(&bytes(&lasts))?;
    }
    for (p, inp) in parts.iter().zip(&kv_inp) {
        p.kv.fill_inputs(inp, p.n_past, p.tokens.len())?;
    }
    graph.compute(threads)?;
    if let Some(e) = parts.iter().find_map(|p| p.kv.take_error()) {
        return Err(e);
    }
    if logits.is_none() {
        return Ok(Vec::new());
    }
    out.to_vec_f32()
}

fn linear<'c>(ctx: &'c Context, m: &'c Model, w: W, x: Tensor<'c>) -> Result<Tensor<'c>> {
    ctx.mul_mat(m.t(w), x)
}

fn bias<'c>(ctx: &'c Context, m: &'c Model, x: Tensor<'c>, b: Option<W>) -> Result<Tensor<'c>> {
    match b {
        Some(b) => ctx.add(x, m.t(b)),
        None => Ok(x),
    }
}
