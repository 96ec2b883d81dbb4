//! libllama through FFI: llama.cpp's tokenizer (so token ids match llama.cpp exactly) and
//! llama.cpp itself as the baseline engine. Owner types over the raw handles; every null or
//! status becomes an `Error::Llama` once, here.

mod capture;
mod chat;
mod context;
mod model;

pub use capture::{capture_qkv, Captured};
pub use chat::chat_apply_template;
pub use context::{LlamaContext, LlamaContextParams, SeqId};
pub use model::{LlamaModel, Token};

use crate::ggml::sys;
use std::sync::Once;

static BACKEND: Once = Once::new();

/// Initialises llama.cpp's backends once per process (and routes its log to `log`).
pub(crate) fn backend_init() {
    crate::ggml::log::install();
    // SAFETY: llama_backend_init has no preconditions; Once makes it run a single time.
    BACKEND.call_once(|| unsafe { sys::llama_backend_init() });
}
