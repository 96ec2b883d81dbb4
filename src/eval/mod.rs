//! Measurement: memory (and, with the engine, perplexity, KL divergence and speed).

pub mod attention;
pub mod kld;
pub mod kv_error;
pub mod kvdump;
pub mod memory;
