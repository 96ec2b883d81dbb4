//! The crate's one error type: grouped by the layer that raised it, each with its context.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file that is not valid GGUF, or lacks what a model needs.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A cache configuration or a shape the cache cannot take.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// A cache name that names no cache.
    #[error(transparent)]
    Kind(#[from] crate::kind::KindError),
    /// ggml refused an operation (checked before ggml could abort).
    #[error("ggml: {0}")]
    Ggml(String),
    /// llama.cpp refused a model, context or call.
    #[error("llama.cpp: {0}")]
    Llama(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("context overflow: {needed} tokens do not fit in n_ctx {n_ctx}")]
    ContextOverflow { needed: usize, n_ctx: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A valid request this build does not run (it names what and why).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// No usable CUDA device, or a kernel or driver call failed.
    #[error("CUDA: {0}")]
    Cuda(#[from] crate::cuda::CudaError),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
