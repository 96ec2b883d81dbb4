//! ottkv: GGUF models on ggml with a 2-bit KV cache that traces outlier tokens (OTT, on top of
//! KIVI), measured against llama.cpp's own cache types.
//!
//! Layers, bottom up: `format` (the cache's block layout, shared with the CUDA kernels),
//! `gguf` (model files over mmap), `ggml` and `llama` (FFI), `quant` (the scalar quantizer,
//! the oracle), `cache` (the KV caches), `eval` (measurement), `cli`, and `serve` (the HTTP
//! server, behind the default `serve` feature).

pub mod cache;
pub mod capi;
#[cfg(feature = "cli")]
pub mod cli;
pub mod cuda;
pub mod error;
pub mod eval;
pub mod format;
pub mod ggml;
pub mod gguf;
pub mod kind;
pub mod llama;
pub mod model;
pub mod paths;
pub mod quant;
#[cfg(feature = "serve")]
pub mod serve;

pub use error::{Error, Result};

/// Kernels embedded by build.rs (empty without the `cuda` feature).
pub mod kernels {
    /// How one kernel module is embedded.
    #[derive(Clone, Copy, Debug)]
    pub enum KernelText {
        /// PTX compiled by nvcc at build time, with its ISA version.
        Ptx {
            isa: &'static str,
            text: &'static str,
        },
        /// CUDA source, compiled by NVRTC at run time.
        Source(&'static str),
    }
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
