//! The OTT KV cache (OTT.md): KIVI-style 2–4 bit keys (per channel) and values (per token), an
//! f16 window of recent tokens, and outlier-token tracing into full-precision pools.
//!
//! Decisions recorded here (OTT.md leaves them open or asks us to choose):
//! - Key group G must be a positive multiple of 16 ([`config::GROUP_MULTIPLE`]); value group
//!   Gv = min(G, head_dim) unless set, and head_dim must be a multiple of Gv.
//! - Non-finite K/V (or values overflowing f16) are rejected with [`CacheError::NonFinite`]
//!   before anything is appended.
//! - Window and pools are allocated at creation (bounded sizes); quantized codes, params and
//!   masks grow by exactly one group per flush. [`MemoryStats`] reports capacities.
//! - A layer override's pool size wins over `untraced_layers`; without a pool (P = 0) a layer
//!   gets no extra pool either (nothing could ever be evicted into it).
//! - Issue 8 knobs, both off by default (every earlier preset is unchanged): `rotate` stores
//!   K and V rows Hadamard-rotated over blocks of the largest power of two dividing head_dim,
//!   rotating q alike and the output back inside `attend`; outlier scores are still taken on
//!   the unrotated key (L1 is not rotation-invariant). `sink` keeps the first S positions exact
//!   in f16 as masked slots of their groups, outside the groups' min/max and the pool contest;
//!   its buffer is allocated up front and reported under `pools`.
//!
//! No `unsafe` in this module.
#![forbid(unsafe_code)]

mod attn;
pub mod config;
mod error;
mod head;
mod memory;
mod ott;
mod probe;
mod rows;

pub(crate) use attn::dot_lanes;
pub use config::{CacheConfig, Fit, LayerOverride, Rotation, Score, ValueAxis, PRESETS};
pub use error::CacheError;
pub use head::HeadCache;
pub use memory::{expected_memory, f16_bytes, MemoryStats};
#[cfg(feature = "cuda")]
pub(crate) use ott::checked_kv;
pub use ott::{CacheChoices, CacheShape, OttCache, SubbatchStarts, MAX_HEAD_DIM};
pub use rows::RowPrecision;
#[cfg(feature = "cuda")]
pub(crate) use rows::Rows;
