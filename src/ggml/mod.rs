//! ggml through FFI in three layers: `sys` (raw bindings, nothing else), the checked calls and
//! owner types here, and the engine above them.

pub mod context;
pub mod custom;
#[cfg(any(test, feature = "testing"))]
pub mod gguf_reader;
pub mod log;
pub mod mapped;
pub mod ops;
pub mod quantize;
pub mod repack;
pub mod sys;

pub use context::{max_threads, Context, Graph, GraphAllocator, Tensor, TensorId, GRAPH_NODES};
pub use custom::CustomOp;
pub use mapped::MappedWeights;
pub use ops::{RopeMode, RopeParams};

use std::ffi::CStr;

/// Whether ggml's CPU backend has a dot product for type `ty` (a `GgmlType` id), which is what
/// a matmul over weights of that type needs.
pub fn cpu_has_vec_dot(ty: u32) -> bool {
    // SAFETY: the table is static; ggml returns a valid entry for every type id below
    // GGML_TYPE_COUNT, and the caller's id comes from our type list.
    ty < sys::GGML_TYPE_COUNT && unsafe { (*sys::ggml_get_type_traits_cpu(ty)).vec_dot.is_some() }
}

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
