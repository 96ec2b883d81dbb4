//! A sequence being decoded: the model, a KV cache, the position, and the graph per
//! (sub-)batch: embeddings (gemma3: scaled by √n_embd) → per layer [RMSNorm, Q/K/V (+bias),
//! per-head q/k RMSNorm (qwen3, gemma3), RoPE (with Llama 3 frequency factors when the file
//! has them; gemma3's window layers with their own base), cache write + attention (gemma3's
//! window layers through a sliding-window mask), output projection (gemma3: post-norm),
//! residual, RMSNorm, SwiGLU FFN (gemma3: GELU-gated, post-norm), residual] → norm → logits
//! (gemma3: optional soft-capping).

use super::kv::Kv;
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
        let m = self.model;
        let hp = &m.hparams;
        let n = tokens.len();
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
        let ops = self.kv.ops(n, nh as usize, scale);
        let ctx = Context::new(Context::overhead(GRAPH_NODES, GRAPH_NODES), true)?;
        let graph = ctx.new_graph(GRAPH_NODES)?;

        let inp_tok = ctx.new_tensor(GgmlType::I32.id(), &[n as i64])?;
        let inp_pos = ctx.new_tensor(GgmlType::I32.id(), &[n as i64])?;
        inp_tok.set_input();
        inp_pos.set_input();
        let kv_inp = self.kv.inputs(&ctx, self.n_past, n)?;
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
            let att =
                self.kv
                    .attention(&ctx, &graph, &kv_inp, ops.as_ref(), l, q, k, v, scale, swa)?;
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
                let ids = ctx.new_tensor(GgmlType::I32.id(), &[1])?;
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
        self.alloc.alloc(&graph)?;

        let bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        inp_tok.set_bytes(&bytes(tokens))?;
        let pos: Vec<i32> = (self.n_past..self.n_past + n).map(|p| p as i32).collect();
        inp_pos.set_bytes(&bytes(&pos))?;
        if let Some(ids) = inp_out {
            ids.set_bytes(&bytes(&[n as i32 - 1]))?;
        }
        self.kv.fill_inputs(&kv_inp, self.n_past, n)?;
        graph.compute(self.p.threads)?;
        if let Some(e) = self.kv.take_error() {
            return Err(e);
        }
        if logits.is_none() {
            return Ok(Vec::new());
        }
        out.to_vec_f32()
    }
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
