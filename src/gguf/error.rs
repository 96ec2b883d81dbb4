//! Errors for GGUF reading, writing and hyperparameter extraction.
//!
//! Every variant carries enough context (byte offset, key or tensor name) to
//! find the fault in a hex dump without re-running anything.

use std::path::PathBuf;

use super::types::GgmlType;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    // ---- I/O ----
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: {what}, not a GGUF file", path.display())]
    NotAFile { path: PathBuf, what: &'static str },

    // ---- file header ----
    #[error("bad magic {found:02x?} at offset 0, expected \"GGUF\" (47 47 55 46)")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {version} at offset 4 (only versions 2 and 3 are supported{})",
        if *version == 1 { "; GGUFv1 is obsolete" } else { "" })]
    UnsupportedVersion { version: u32 },
    #[error("GGUF version field reads {raw:#010x} at offset 4: this looks like a big-endian file, which is not supported")]
    BigEndian { raw: u32 },

    // ---- generic structural problems ----
    #[error("truncated {what}: needs {needed} bytes at offset {offset}, only {available} left")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("{what} count {count} at offset {offset} is too large (limit {limit})")]
    CountTooLarge {
        what: String,
        count: u64,
        limit: u64,
        offset: u64,
    },
    #[error("{what} length {len} at offset {offset} is too long (limit {limit})")]
    StringTooLong {
        what: String,
        len: u64,
        limit: u64,
        offset: u64,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },

    // ---- metadata ----
    #[error("metadata key #{index} at offset {offset} is empty")]
    EmptyKey { index: u64, offset: u64 },
    #[error("duplicate metadata key '{key}' at offset {offset}")]
    DuplicateKey { key: String, offset: u64 },
    #[error("key '{key}': unknown value type {type_id} at offset {offset}")]
    UnknownValueType {
        key: String,
        type_id: u32,
        offset: u64,
    },
    #[error("key '{key}': arrays nested deeper than {limit} levels at offset {offset}")]
    NestingTooDeep {
        key: String,
        limit: u32,
        offset: u64,
    },
    #[error("bad alignment: {reason}")]
    BadAlignment { reason: String },

    // ---- tensor infos ----
    #[error("tensor name '{name}' at offset {offset} is {len} bytes, limit is {limit}")]
    TensorNameTooLong {
        name: String,
        len: u64,
        limit: u64,
        offset: u64,
    },
    #[error("duplicate tensor name '{name}' at offset {offset}")]
    DuplicateTensor { name: String, offset: u64 },
    #[error("tensor '{tensor}': {n_dims} dimensions at offset {offset}, at most 4 allowed")]
    TooManyDims {
        tensor: String,
        n_dims: u32,
        offset: u64,
    },
    #[error("tensor '{tensor}': shape {dims:?} overflows (each dim and the element count must fit in i64, the byte size in u64)")]
    DimsOverflow { tensor: String, dims: Vec<u64> },
    #[error("tensor '{tensor}': unknown ggml type {type_id} at offset {offset}")]
    UnknownTensorType {
        tensor: String,
        type_id: u32,
        offset: u64,
    },
    #[error("tensor '{tensor}': row length ne[0]={ne0} is not a multiple of the {ggml_type} block size {block_size}")]
    RowNotBlockMultiple {
        tensor: String,
        ggml_type: GgmlType,
        ne0: u64,
        block_size: u64,
    },
    #[error(
        "tensor '{tensor}': data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    TensorOffsetMisaligned {
        tensor: String,
        offset: u64,
        alignment: u32,
    },
    #[error("tensor '{tensor}': data [{start}, {end}) (absolute) lies past the end of the file ({file_size} bytes)")]
    TensorDataPastEof {
        tensor: String,
        start: u64,
        end: u64,
        file_size: u64,
    },
    #[error("tensors '{a}' [{a_start}, {a_end}) and '{b}' [{b_start}, {b_end}) overlap (offsets relative to the data section)")]
    TensorOverlap {
        a: String,
        a_start: u64,
        a_end: u64,
        b: String,
        b_start: u64,
        b_end: u64,
    },

    #[error("tensor '{tensor}': {reason}")]
    BadTensor { tensor: String, reason: String },

    // ---- lookups ----
    #[error("tensor '{name}' not found")]
    TensorNotFound { name: String },
    #[error("metadata key '{key}' is missing")]
    MissingKey { key: String },
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("metadata key '{key}' = {value} does not fit in {expected}")]
    ValueOutOfRange {
        key: String,
        expected: &'static str,
        value: String,
    },

    // ---- hparams ----
    #[error("unsupported architecture '{0}' (supported: llama, qwen2, qwen3, gemma3)")]
    UnsupportedArchitecture(String),
    #[error("invalid hyperparameter '{key}': {reason}")]
    InvalidHparam { key: String, reason: String },

    // ---- tokenizer ----
    #[error("tokenizer metadata '{key}': {reason}")]
    Vocab { key: String, reason: String },

    // ---- writer ----
    #[error("tensor '{tensor}': data is {actual} bytes, shape and type need {expected}")]
    DataSizeMismatch {
        tensor: String,
        expected: u64,
        actual: u64,
    },
    #[error("key '{key}': {reason}")]
    InvalidValue { key: String, reason: String },
}

pub(crate) type Result<T, E = GgufError> = std::result::Result<T, E>;
