//! Measurement: memory (and, with the engine, perplexity, KL divergence and speed).
#![forbid(unsafe_code)]

pub mod attention;
pub mod bench;
pub mod compare;
pub mod kld;
pub mod kv_error;
pub mod kvdump;
pub mod memory;
pub mod perplexity;
pub mod plot;
pub mod runner;
