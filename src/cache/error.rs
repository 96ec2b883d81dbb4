use crate::quant::QuantError;

/// Everything the cache can reject. Public input never panics; it ends up here.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CacheError {
    #[error("invalid cache config: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cannot parse cache spec {spec:?}: field {field:?}: {reason}")]
    Parse {
        spec: String,
        field: String,
        reason: String,
    },
    #[error("invalid cache shape: {0}")]
    Shape(String),
    #[error("{what}: expected length {expected}, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("layer {layer} out of range (n_layer {n_layer})")]
    Layer { layer: usize, n_layer: usize },
    #[error("n_head {n_head} is not a positive multiple of n_head_kv {n_head_kv}")]
    Heads { n_head: usize, n_head_kv: usize },
    #[error("layer {layer}: {len} cached + {n} new tokens exceed max_tokens {max_tokens}")]
    Overflow {
        layer: usize,
        len: usize,
        n: usize,
        max_tokens: usize,
    },
    #[error("layer {layer}: {tensor} of new token {token}, kv-head {head}, channel {channel} is {value}, not a finite f16")]
    NonFinite {
        layer: usize,
        tensor: &'static str,
        token: usize,
        head: usize,
        channel: usize,
        value: f32,
    },
    #[error("row range {start}..{end} outside the {rows} (token, head) rows of this batch")]
    Rows {
        start: usize,
        end: usize,
        rows: usize,
    },
    #[error("sub-batch of {n} tokens does not fit in the f16 window of {window} tokens; plan batches with plan_subbatches")]
    SubBatch { n: usize, window: usize },
    /// Memory the cache needs that could not be had (checked against the machine's memory
    /// and reserved fallibly before anything changes).
    #[error("cannot allocate {what}: {detail}")]
    Alloc { what: &'static str, detail: String },
    #[error(transparent)]
    Quant(#[from] QuantError),
}
