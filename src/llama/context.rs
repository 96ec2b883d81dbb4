//! A llama.cpp inference context: the baseline engine with llama.cpp's own KV-cache types.

use super::model::{LlamaModel, Token};
use crate::error::{Error, Result};
use crate::ggml::sys;
use crate::kind::BlockType;
use std::ptr::NonNull;

/// A sequence's id inside one context: `0..n_seq_max`.
pub type SeqId = sys::llama_seq_id;

#[derive(Clone, Debug)]
pub struct LlamaContextParams {
    /// Cached tokens the context holds, over all its sequences together.
    pub n_ctx: u32,
    pub n_batch: u32,
    pub threads: usize,
    pub cache_k: BlockType,
    pub cache_v: BlockType,
    /// Sequences decoded side by side. Above one, the sequences share one KV cache of
    /// `n_ctx` cells (llama.cpp's unified cache), so any mix of lengths fits that total, as
    /// llama-batched-bench and llama-server with `-kvu` run.
    pub n_seq_max: u32,
}

impl Default for LlamaContextParams {
    fn default() -> Self {
        Self {
            n_ctx: 512,
            n_batch: 512,
            threads: 2,
            cache_k: BlockType::F16,
            cache_v: BlockType::F16,
            n_seq_max: 1,
        }
    }
}

/// Owner of a `llama_context`, borrowing its model.
pub struct LlamaContext<'m> {
    ptr: NonNull<sys::llama_context>,
    model: &'m LlamaModel,
    n_ctx: u32,
    n_batch: u32,
    /// The next position of each sequence, i.e. its cached tokens: `[n_seq_max]`.
    pos: Vec<u32>,
}

/// One token of a decode call: its sequence, and whether its logits are read back.
#[derive(Clone, Copy)]
struct Item {
    seq: SeqId,
    token: Token,
    logits: bool,
}

impl<'m> LlamaContext<'m> {
    /// A context with flash attention on (llama.cpp requires it for a quantized V cache).
    pub fn new(model: &'m LlamaModel, p: &LlamaContextParams) -> Result<Self> {
        // SAFETY: no callback.
        unsafe { Self::with_eval_callback(model, p, None, std::ptr::null_mut()) }
    }

    /// As `new`, with llama.cpp's graph evaluation callback installed.
    ///
    /// # Safety
    /// `user_data` must stay valid, and `cb` must be safe to call with it from llama.cpp's
    /// threads, for as long as the context lives; `cb` must not unwind.
    pub(crate) unsafe fn with_eval_callback(
        model: &'m LlamaModel,
        p: &LlamaContextParams,
        cb: sys::ggml_backend_sched_eval_callback,
        user_data: *mut std::ffi::c_void,
    ) -> Result<Self> {
        if p.n_ctx == 0 || p.n_batch == 0 {
            return Err(Error::Llama("n_ctx and n_batch must be positive".into()));
        }
        // SAFETY: no arguments, returns a constant.
        let max_seq = unsafe { sys::llama_max_parallel_sequences() };
        if p.n_seq_max == 0 || p.n_seq_max as usize > max_seq {
            return Err(Error::Llama(format!(
                "n_seq_max {}: llama.cpp runs 1 to {max_seq} sequences in one context",
                p.n_seq_max
            )));
        }
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = p.n_ctx;
        cp.n_batch = p.n_batch.min(p.n_ctx);
        cp.n_ubatch = cp.n_batch;
        cp.n_seq_max = p.n_seq_max;
        // Split per sequence (llama.cpp's default) each would get n_ctx / n_seq_max cells,
        // padded to 256; one shared cache keeps n_ctx the total, which is what callers size.
        cp.kv_unified = p.n_seq_max > 1;
        let threads = p.threads.clamp(1, crate::ggml::max_threads()) as i32;
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_ENABLED;
        cp.type_k = p.cache_k.ggml_type().id() as sys::ggml_type;
        cp.type_v = p.cache_v.ggml_type().id() as sys::ggml_type;
        cp.no_perf = true;
        cp.cb_eval = cb;
        cp.cb_eval_user_data = user_data;
        // SAFETY: model is live and outlives the context ('m); null means llama.cpp refused.
        let raw = unsafe { sys::llama_init_from_model(model.as_ptr(), cp) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::Llama(format!(
                "llama.cpp refused a context (n_ctx {}, K {}, V {}, {} sequence(s))",
                p.n_ctx,
                p.cache_k.name(),
                p.cache_v.name(),
                p.n_seq_max
            ))
        })?;
        Ok(Self {
            ptr,
            model,
            n_ctx: cp.n_ctx,
            n_batch: cp.n_batch,
            pos: vec![0; p.n_seq_max as usize],
        })
    }

    pub fn model(&self) -> &LlamaModel {
        self.model
    }

    /// Sequences this context holds (`n_seq_max`).
    pub fn n_seq(&self) -> usize {
        self.pos.len()
    }

    /// Tokens cached for sequence `seq`.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.pos[self.seq_index(seq)?] as usize)
    }

    /// Forgets all cached tokens (the next decode of every sequence starts at position 0).
    pub fn clear(&mut self) {
        // SAFETY: context live; the memory handle belongs to it.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), true) };
        self.pos.fill(0);
    }

    /// Forgets the cached tokens of sequence `seq` only; its next decode starts at 0.
    pub fn clear_seq(&mut self, seq: SeqId) -> Result<()> {
        let i = self.seq_index(seq)?;
        self.seq_rm(seq, 0)?;
        self.pos[i] = 0;
        Ok(())
    }

    /// Decodes `tokens` after what is cached; returns the logits of every one of them,
    /// `[tokens.len()][n_vocab]`, row-major.
    pub fn decode_all_logits(&mut self, tokens: &[Token]) -> Result<Vec<f32>> {
        self.decode(tokens, true)
    }

    /// Decodes `tokens` after what sequence 0 has cached; returns the logits of every token
    /// (`all`) or of the last one only, row-major `[rows][n_vocab]`.
    pub fn decode(&mut self, tokens: &[Token], all: bool) -> Result<Vec<f32>> {
        let items: Vec<Item> = tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| Item {
                seq: 0,
                token,
                logits: all || i + 1 == tokens.len(),
            })
            .collect();
        let rows = if all { tokens.len() } else { 1 };
        let mut out = Vec::with_capacity(rows * self.model.n_vocab());
        self.decode_items(&items, |_, row| out.extend_from_slice(row))?;
        Ok(out)
    }

    /// Decodes several sequences together: each part's tokens go after what its sequence
    /// has cached, all parts in the same `llama_decode` calls (`n_batch` tokens each, in the
    /// order given), and the logits of each part's last token come back, `[parts][n_vocab]`.
    /// A sequence may appear in several parts; its tokens follow in the order of the parts.
    /// On an error nothing of this call stays cached.
    pub fn decode_seqs(&mut self, parts: &[(SeqId, &[Token])]) -> Result<Vec<Vec<f32>>> {
        let mut items = Vec::with_capacity(parts.iter().map(|p| p.1.len()).sum());
        // The item index of each part's last token.
        let mut last = Vec::with_capacity(parts.len());
        for (k, &(seq, tokens)) in parts.iter().enumerate() {
            self.seq_index(seq)?;
            if tokens.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "part {k} (sequence {seq}) has no tokens: it would have no logits"
                )));
            }
            let n = tokens.len();
            items.extend(tokens.iter().enumerate().map(|(i, &token)| Item {
                seq,
                token,
                logits: i + 1 == n,
            }));
            last.push(items.len() - 1);
        }
        let mut out = vec![Vec::new(); parts.len()];
        let mut k = 0;
        self.decode_items(&items, |item, row| {
            // Logits arrive in item order, and parts' last items are in that order too.
            debug_assert_eq!(last[k], item);
            out[k] = row.to_vec();
            k += 1;
        })?;
        Ok(out)
    }

    /// Index of `seq` into `pos`, or an error naming the range.
    fn seq_index(&self, seq: SeqId) -> Result<usize> {
        match usize::try_from(seq) {
            Ok(i) if i < self.pos.len() => Ok(i),
            _ => Err(Error::InvalidArgument(format!(
                "sequence id {seq} outside this context's 0..{}",
                self.pos.len()
            ))),
        }
    }

    /// Removes sequence `seq`'s cached cells from position `p0` on.
    fn seq_rm(&mut self, seq: SeqId, p0: u32) -> Result<()> {
        // SAFETY: context live; seq is in range (checked by the callers); p1 -1 is "to the end".
        let ok = unsafe {
            sys::llama_memory_seq_rm(sys::llama_get_memory(self.ptr.as_ptr()), seq, p0 as i32, -1)
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Llama(format!(
                "llama.cpp could not remove sequence {seq} from position {p0}"
            )))
        }
    }

    /// Decodes `items` in windows of `n_batch`, at each sequence's next positions, handing
    /// `(item index, logits row)` to `on_logits` for each item that asks, in item order.
    /// On an error every sequence goes back to where it was before the call.
    fn decode_items(
        &mut self,
        items: &[Item],
        mut on_logits: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        let n_vocab = self.model.n_vocab();
        for it in items {
            self.seq_index(it.seq)?;
            if it.token < 0 || it.token as usize >= n_vocab {
                return Err(Error::TokenOutOfVocab {
                    token: it.token,
                    n_vocab,
                });
            }
        }
        let cached: usize = self.pos.iter().map(|&p| p as usize).sum();
        let end = cached + items.len();
        if end > self.n_ctx as usize {
            return Err(Error::ContextOverflow {
                needed: end,
                n_ctx: self.n_ctx as usize,
            });
        }
        if items.is_empty() {
            return Ok(());
        }
        let before = self.pos.clone();
        let r = self.decode_windows(items, n_vocab, &mut on_logits);
        if r.is_err() {
            // llama.cpp keeps the windows decoded before a failure (and after some failures
            // part of the failed one): drop them, so that positions and cache agree.
            // A sequence this call never reached has nothing to drop.
            for (i, &p0) in before.iter().enumerate() {
                if self.pos[i] != p0 {
                    // The decode's error is the one to report; a KV cache always removes.
                    let _ = self.seq_rm(i as SeqId, p0);
                }
            }
            self.pos = before;
        }
        r
    }

    fn decode_windows(
        &mut self,
        items: &[Item],
        n_vocab: usize,
        on_logits: &mut impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        let mut batch = Batch::new(items.len().min(self.n_batch as usize))?;
        for (w, window) in items.chunks(self.n_batch as usize).enumerate() {
            batch.clear();
            for it in window {
                let pos = &mut self.pos[it.seq as usize];
                batch.push(it.token, *pos as i32, it.seq, it.logits);
                *pos += 1;
            }
            // SAFETY: context and batch live; the batch holds window.len() <= n_batch tokens
            // of sequences below n_seq_max, each at its sequence's next position.
            let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw) };
            if rc != 0 {
                return Err(Error::Llama(format!(
                    "llama_decode failed with status {rc}"
                )));
            }
            for (row, it) in window.iter().enumerate() {
                if !it.logits {
                    continue;
                }
                // SAFETY: logits were requested for this row of the batch just decoded.
                let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), row as i32) };
                if p.is_null() {
                    return Err(Error::Llama(format!("no logits for batch row {row}")));
                }
                // SAFETY: llama.cpp's logits row holds n_vocab floats.
                on_logits(w * self.n_batch as usize + row, unsafe {
                    std::slice::from_raw_parts(p, n_vocab)
                });
            }
        }
        Ok(())
    }
}

impl Drop for LlamaContext<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the context.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

/// A `llama_batch` of up to `cap` tokens, one sequence id each, refilled per window.
struct Batch {
    raw: sys::llama_batch,
    cap: usize,
}

impl Batch {
    fn new(cap: usize) -> Result<Self> {
        let n = i32::try_from(cap)
            .map_err(|_| Error::Llama(format!("a batch of {cap} tokens is too large")))?;
        // SAFETY: allocates arrays for n tokens with one seq id each.
        let raw = unsafe { sys::llama_batch_init(n, 0, 1) };
        if raw.token.is_null() {
            return Err(Error::Llama("llama_batch_init failed".into()));
        }
        Ok(Self { raw, cap })
    }

    fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    fn push(&mut self, token: Token, pos: i32, seq: SeqId, logits: bool) {
        let i = self.raw.n_tokens as usize;
        assert!(i < self.cap, "batch of {} tokens overfilled", self.cap);
        // SAFETY: every array was allocated for cap entries and i < cap; seq_id[i] has 1 slot.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            **self.raw.seq_id.add(i) = seq;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}
