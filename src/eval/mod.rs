//! Measurement: memory (and, with the engine, perplexity, KL divergence and speed).

pub mod kvdump;
pub mod memory;
