//! Models: random-weight GGUF models of any shape for tests (the engine joins here).

pub mod synthetic;
