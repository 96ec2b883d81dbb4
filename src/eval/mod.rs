//! Measurement: memory (and, with the engine, perplexity, KL divergence and speed).

pub mod memory;
