//! Scalar quantization primitives: bit packing and the asymmetric min/max quantizer (OTT.md §1).
//!
//! This is the oracle the cache and any fast or GPU path are checked against; it stays simple
//! and scalar on purpose. No `unsafe` anywhere in here.
#![forbid(unsafe_code)]

mod fit;
mod hadamard;
mod minmax;
mod pack;
mod params8;

pub use fit::least_squares_range;
pub use hadamard::{hadamard_blocks, llama_rotation_blocks};
pub use minmax::{
    dequantize_key_group, dequantize_value_row, f16_round, minmax_params, param_min, param_scale,
    quantize_group, quantize_key_group, quantize_key_group_with, quantize_one, quantize_value_row,
    quantize_value_row_with, range_params,
};
pub use pack::{code_at, pack_codes, unpack_codes};
pub use params8::{decode_params8, encode_params8, finite_range};

/// Errors of the quantization primitives (all from checkable public input).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error("unsupported code width {0} bits (the format defines 2, 3 and 4)")]
    Bits(u32),
    #[error("{what}: expected length {expected}, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("code {code} at index {index} does not fit in {bits} bits")]
    CodeRange { index: usize, code: u8, bits: u32 },
    #[error("non-finite or f16-overflowing value {value} at index {index}")]
    NonFinite { index: usize, value: f32 },
    #[error("group size must be positive")]
    EmptyGroup,
}

/// Checks a code width against the format's range.
pub fn check_bits(bits: u32) -> Result<(), QuantError> {
    if (crate::format::MIN_BITS..=crate::format::MAX_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(QuantError::Bits(bits))
    }
}

/// Largest code of a width: `2^bits - 1`.
pub const fn max_code(bits: u32) -> u32 {
    (1 << bits) - 1
}
