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
    #[error("the text has {tokens} tokens, fewer than one chunk of {n_ctx}")]
    TextTooShort { tokens: usize, n_ctx: usize },
    #[error("token id {token} outside the vocabulary (0..{n_vocab})")]
    TokenOutOfVocab { token: i32, n_vocab: usize },
    /// llama.cpp's block types need head_dim to be a whole number of blocks.
    #[error("{cache}: head_dim {head_dim} is not a multiple of its {block}-element block (llama.cpp refuses it too)")]
    BlockMismatch {
        cache: String,
        head_dim: usize,
        block: usize,
    },
    /// A file that `ottkv dump-kv` did not write, or wrote for another shape.
    #[error("{}: {reason}", path.display())]
    KvDump { path: PathBuf, reason: String },
    #[error("serializing {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("plot {}: {message}", path.display())]
    Plot { path: PathBuf, message: String },
    /// Stopped by the user (Ctrl-C) before anything could be reported.
    #[error("interrupted before any row finished a chunk")]
    Interrupted,
    /// A lock whose holder panicked earlier (a bug; the state behind it is not trusted).
    #[error("internal: the {0} lock was poisoned by an earlier panic")]
    Poisoned(&'static str),
    /// A value outside what the call accepts (the message names it and the range).
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
    /// The `ottkv` command's exit status for this error: 2 for what the caller asked wrongly
    /// (as clap exits for a bad flag), 130 for an interruption (as a shell reports Ctrl-C), 1
    /// for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) | Error::Kind(_) | Error::Cache(_) => 2,
            Error::Interrupted => 130,
            Error::Gguf(_)
            | Error::Ggml(_)
            | Error::Llama(_)
            | Error::Io { .. }
            | Error::ContextOverflow { .. }
            | Error::TextTooShort { .. }
            | Error::TokenOutOfVocab { .. }
            | Error::BlockMismatch { .. }
            | Error::KvDump { .. }
            | Error::Json { .. }
            | Error::Plot { .. }
            | Error::Poisoned(_)
            | Error::Unsupported(_)
            | Error::Cuda(_) => 1,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
