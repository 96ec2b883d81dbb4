//! The cache's block layout, mirrored from `kernels/ottkv_format.h` (the one definition).
//!
//! The header is what the CUDA kernels read; bindgen turns it into `sys` below and the const
//! asserts tie every Rust constant and struct size to it, so the two cannot drift apart.

mod sys {
    #![allow(non_camel_case_types, non_upper_case_globals, dead_code)]
    include!(concat!(env!("OUT_DIR"), "/ottkv_format.rs"));
}

/// Layout version; bump with any change to the header.
pub const FORMAT_VERSION: u32 = 2;
/// Codes form an LSB-first bit stream over little-endian u32 words (32 codes fill `bits` words).
pub const WORD_BITS: u32 = 32;
/// Narrowest and widest code the format defines.
pub const MIN_BITS: u32 = 2;
pub const MAX_BITS: u32 = 4;
/// Method defaults (OTT.md): group G, f16 window R, outlier pool P, extra pool E, and the
/// number of leading layers where tracing is off.
pub const DEFAULT_GROUP: u32 = 128;
pub const DEFAULT_RESIDUAL: u32 = 32;
pub const DEFAULT_POOL: u32 = 3;
pub const DEFAULT_EXTRA: u32 = 32;
pub const DEFAULT_UNTRACED_LAYERS: u32 = 2;
/// KIVI's own group and window, used by the `kivi*` presets.
pub const KIVI_GROUP: u32 = 32;
pub const KIVI_RESIDUAL: u32 = 128;
/// Marker for an outlier slot that never sat in a quantized group.
pub const NO_GROUP: u32 = 0xFFFF_FFFF;

/// Scale and minimum of one quantization group as IEEE binary16 bit patterns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QParams {
    pub scale: u16,
    pub min: u16,
}

/// Shape of the quantized storage of one (layer, kv-head).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub head_dim: u32,
    pub key_group: u32,
    pub value_group: u32,
    pub key_bits: u32,
    pub value_bits: u32,
}

/// A token kept in full precision: its position and the group whose slot it left.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierSlot {
    pub pos: i32,
    pub group: u32,
}

/// Words holding a run of `n` codes of `bits` bits (the stream is cut at the run's end).
pub const fn words_for(n: u32, bits: u32) -> u32 {
    (n * bits).div_ceil(WORD_BITS)
}

impl Geometry {
    /// u32 code words of one key group: `[head_dim][words_for(key_group)]`.
    pub const fn key_group_words(&self) -> u32 {
        self.head_dim * words_for(self.key_group, self.key_bits)
    }
    /// Parameter pairs of one key group: one per channel.
    pub const fn key_group_params(&self) -> u32 {
        self.head_dim
    }
    /// u32 code words of one value row (one token).
    pub const fn value_row_words(&self) -> u32 {
        words_for(self.head_dim, self.value_bits)
    }
    /// Parameter pairs of one value row: one per `value_group` channels.
    pub const fn value_row_params(&self) -> u32 {
        self.head_dim / self.value_group
    }
}

// The mirror must match the header exactly.
const _: () = {
    assert!(sys::OTTKV_FORMAT_VERSION == FORMAT_VERSION);
    assert!(sys::OTTKV_WORD_BITS == WORD_BITS);
    assert!(sys::OTTKV_MIN_BITS == MIN_BITS);
    assert!(sys::OTTKV_MAX_BITS == MAX_BITS);
    assert!(sys::OTTKV_DEFAULT_GROUP == DEFAULT_GROUP);
    assert!(sys::OTTKV_DEFAULT_RESIDUAL == DEFAULT_RESIDUAL);
    assert!(sys::OTTKV_DEFAULT_POOL == DEFAULT_POOL);
    assert!(sys::OTTKV_DEFAULT_EXTRA == DEFAULT_EXTRA);
    assert!(sys::OTTKV_DEFAULT_UNTRACED_LAYERS == DEFAULT_UNTRACED_LAYERS);
    assert!(sys::OTTKV_KIVI_GROUP == KIVI_GROUP);
    assert!(sys::OTTKV_KIVI_RESIDUAL == KIVI_RESIDUAL);
    assert!(sys::OTTKV_NO_GROUP == NO_GROUP);
    assert!(std::mem::size_of::<sys::ottkv_qparams>() == std::mem::size_of::<QParams>());
    assert!(std::mem::align_of::<sys::ottkv_qparams>() == std::mem::align_of::<QParams>());
    assert!(std::mem::size_of::<QParams>() == 4);
    assert!(std::mem::size_of::<sys::ottkv_geometry>() == std::mem::size_of::<Geometry>());
    assert!(std::mem::size_of::<Geometry>() == 20);
    assert!(std::mem::size_of::<sys::ottkv_outlier_slot>() == std::mem::size_of::<OutlierSlot>());
    assert!(std::mem::size_of::<OutlierSlot>() == 8);
    assert!(std::mem::offset_of!(sys::ottkv_qparams, min) == std::mem::offset_of!(QParams, min));
    assert!(
        std::mem::offset_of!(sys::ottkv_geometry, value_bits)
            == std::mem::offset_of!(Geometry, value_bits)
    );
    assert!(
        std::mem::offset_of!(sys::ottkv_outlier_slot, group)
            == std::mem::offset_of!(OutlierSlot, group)
    );
};
