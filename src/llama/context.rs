//! A llama.cpp inference context: the baseline engine with llama.cpp's own KV-cache types.

use super::model::{LlamaModel, Token};
use crate::error::{Error, Result};
use crate::ggml::sys;
use crate::kind::BlockType;
use std::ptr::NonNull;

#[derive(Clone, Debug)]
pub struct LlamaContextParams {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub threads: usize,
    pub cache_k: BlockType,
    pub cache_v: BlockType,
}

impl Default for LlamaContextParams {
    fn default() -> Self {
        Self {
            n_ctx: 512,
            n_batch: 512,
            threads: 2,
            cache_k: BlockType::F16,
            cache_v: BlockType::F16,
        }
    }
}

/// Owner of a `llama_context`, borrowing its model.
pub struct LlamaContext<'m> {
    ptr: NonNull<sys::llama_context>,
    model: &'m LlamaModel,
    n_ctx: u32,
    n_batch: u32,
    n_past: u32,
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
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = p.n_ctx;
        cp.n_batch = p.n_batch.min(p.n_ctx);
        cp.n_ubatch = cp.n_batch;
        cp.n_seq_max = 1;
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
                "llama.cpp refused a context (n_ctx {}, K {}, V {})",
                p.n_ctx,
                p.cache_k.name(),
                p.cache_v.name()
            ))
        })?;
        Ok(Self {
            ptr,
            model,
            n_ctx: cp.n_ctx,
            n_batch: cp.n_batch,
            n_past: 0,
        })
    }

    pub fn model(&self) -> &LlamaModel {
        self.model
    }

    /// Forgets all cached tokens (the next decode starts at position 0).
    pub fn clear(&mut self) {
        // SAFETY: context live; the memory handle belongs to it.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), true) };
        self.n_past = 0;
    }

    /// Decodes `tokens` after what is cached and returns the logits of every one of them,
    /// `[tokens.len()][n_vocab]`, row-major.
    pub fn decode_all_logits(&mut self, tokens: &[Token]) -> Result<Vec<f32>> {
        self.decode(tokens, true)
    }

    /// Decodes `tokens` after what is cached; returns the logits of every token (`all`) or of
    /// the last one only, row-major `[rows][n_vocab]`.
    pub fn decode(&mut self, tokens: &[Token], all: bool) -> Result<Vec<f32>> {
        let n_vocab = self.model.n_vocab();
        let end = self.n_past as usize + tokens.len();
        if end > self.n_ctx as usize {
            return Err(Error::ContextOverflow {
                needed: end,
                n_ctx: self.n_ctx as usize,
            });
        }
        let mut out = Vec::with_capacity(if all { tokens.len() } else { 1 } * n_vocab);
        let n_chunks = tokens.len().div_ceil(self.n_batch as usize);
        for (ci, chunk) in tokens.chunks(self.n_batch as usize).enumerate() {
            let last_chunk = ci + 1 == n_chunks;
            let batch = Batch::new(chunk, self.n_past, all, last_chunk)?;
            // SAFETY: context and batch live; batch holds chunk.len() tokens with logits on.
            let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw) };
            if rc != 0 {
                return Err(Error::Llama(format!(
                    "llama_decode failed with status {rc}"
                )));
            }
            let rows = if all {
                0..chunk.len()
            } else if last_chunk {
                chunk.len() - 1..chunk.len()
            } else {
                0..0
            };
            for i in rows {
                // SAFETY: logits were requested for row i of this batch.
                let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i as i32) };
                if p.is_null() {
                    return Err(Error::Llama(format!("no logits for batch row {i}")));
                }
                // SAFETY: llama.cpp's logits row holds n_vocab floats.
                out.extend_from_slice(unsafe { std::slice::from_raw_parts(p, n_vocab) });
            }
            self.n_past += chunk.len() as u32;
        }
        Ok(out)
    }
}

impl Drop for LlamaContext<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the context.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

/// A `llama_batch` for one sequence: logits for every token (`all`), or for the last token of
/// the last batch only.
struct Batch {
    raw: sys::llama_batch,
}

impl Batch {
    fn new(tokens: &[Token], pos0: u32, all: bool, last_chunk: bool) -> Result<Self> {
        let n = tokens.len() as i32;
        // SAFETY: allocates arrays for n tokens with one seq id each.
        let raw = unsafe { sys::llama_batch_init(n, 0, 1) };
        if raw.token.is_null() {
            return Err(Error::Llama("llama_batch_init failed".into()));
        }
        let b = Self { raw };
        for (i, &t) in tokens.iter().enumerate() {
            // SAFETY: every array was allocated for n entries, i < n; seq_id[i] has 1 slot.
            unsafe {
                *b.raw.token.add(i) = t;
                *b.raw.pos.add(i) = (pos0 as usize + i) as i32;
                *b.raw.n_seq_id.add(i) = 1;
                **b.raw.seq_id.add(i) = 0;
                *b.raw.logits.add(i) = (all || (last_chunk && i + 1 == tokens.len())) as i8;
            }
        }
        let mut b = b;
        b.raw.n_tokens = n;
        Ok(b)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}
