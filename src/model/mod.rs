//! Models on ggml: weights bound over the GGUF mapping, a forward graph per (sub-)batch with a
//! pluggable KV cache, and random-weight models for tests.
#![forbid(unsafe_code)]

pub mod check;
pub mod kv;
pub mod sample;
pub mod session;
#[cfg(any(test, feature = "testing"))]
pub mod synthetic;
pub mod weights;

pub use crate::kind::CacheKind;
pub use check::{check_model, CheckedModel};
pub use sample::argmax;
pub use session::{Batcher, Logits, Session, SessionParams, Stepped};
pub use weights::{Arch, Model};
