//! GGUF (versions 2 and 3) reading over mmap, writing, and model
//! hyperparameters.
//!
//! The parser treats its input as hostile: every malformed file yields a
//! specific [`GgufError`] naming the offset, key or tensor involved, never a
//! panic or an allocation sized by an unchecked count.
//!
//! - [`parse`] validates a byte slice into a [`Gguf`] header.
//! - [`GgufFile`] maps a file and parses it; tensor data are zero-copy.
//! - [`GgufWriter`] builds files llama.cpp can load.
//! - [`ModelHparams`] extracts llama/qwen2 hyperparameters, bounded by sane maxima.
//! - [`check_vocab`] refuses tokenizer data that would abort libllama.

mod error;
mod file;
mod header;
mod hparams;
mod parse;
mod types;
mod value;
mod vocab;
mod writer;

pub use error::GgufError;
pub use file::GgufFile;
pub use header::{Gguf, TensorInfo};
pub use hparams::{ModelHparams, RopeType, MAX_EMBD, MAX_FF, MAX_HEADS, MAX_HEAD_DIM, MAX_LAYERS};
pub use parse::{
    parse, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_DIMS, MAX_KV,
    MAX_STRING_LEN, MAX_TENSORS, MAX_TENSOR_NAME_LEN,
};
pub use types::GgmlType;
pub use value::{Array, Value, ValueType};
pub use vocab::{check_vocab, TokenizerModel, VocabInfo, MAX_TOKENS};
pub use writer::GgufWriter;
