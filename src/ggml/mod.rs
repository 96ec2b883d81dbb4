//! ggml through FFI in three layers: `sys` (raw bindings, nothing else), the checked calls and
//! owner types here, and the engine above them.

pub mod context;
pub mod custom;
pub mod gguf_reader;
pub mod log;
pub mod ops;
pub mod quantize;
pub mod repack;
pub mod sys;

pub use context::{max_threads, Context, Graph, GraphAllocator, Tensor, GRAPH_NODES};
pub use custom::CustomOp;
pub use ops::{RopeMode, RopeParams};

use std::ffi::CStr;

/// The ggml version string compiled in (e.g. "0.26.0").
pub fn version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(sys::ggml_version()) }
        .to_string_lossy()
        .into_owned()
}

/// The ggml commit compiled in.
pub fn commit() -> String {
    // SAFETY: as above.
    unsafe { CStr::from_ptr(sys::ggml_commit()) }
        .to_string_lossy()
        .into_owned()
}
