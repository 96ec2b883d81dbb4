//! The ggml tensor type table (ids, names, block geometry) as of ggml.h with
//! `GGML_TYPE_COUNT = 43`.
//!
//! Ids that ggml removed (4, 5, 31-33, 36-38) have no variant, so a file
//! using them is reported as an unknown type, as gguf.cpp does (it checks
//! the block size, which is 0 for those slots).

use std::fmt;

macro_rules! ggml_types {
    ($( $variant:ident = $id:literal, $name:literal, $blck:expr, $size:expr, $quant:literal; )*) => {
        /// A ggml tensor element type. `block_size` elements are packed into
        /// `type_size` bytes; a row (`ne[0]`) must be a whole number of blocks.
        // Variant names mirror ggml's GGML_TYPE_* so they grep across both.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum GgmlType {
            $( $variant = $id, )*
        }

        impl GgmlType {
            /// Every type ggml can still load, in id order.
            pub const ALL: &'static [GgmlType] = &[ $( GgmlType::$variant, )* ];

            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id {
                    $( $id => Some(GgmlType::$variant), )*
                    _ => None,
                }
            }

            pub fn id(self) -> u32 {
                self as u32
            }

            /// ggml's `type_name` (e.g. "q4_0", "q2_K").
            pub fn name(self) -> &'static str {
                match self { $( GgmlType::$variant => $name, )* }
            }

            /// Elements per block (`ggml_blck_size`).
            pub fn block_size(self) -> u64 {
                match self { $( GgmlType::$variant => $blck, )* }
            }

            /// Bytes per block (`ggml_type_size`).
            pub fn type_size(self) -> u64 {
                match self { $( GgmlType::$variant => $size, )* }
            }

            pub fn is_quantized(self) -> bool {
                match self { $( GgmlType::$variant => $quant, )* }
            }
        }
    };
}

const QK_K: u64 = 256;

// Byte sizes are the `static_assert(sizeof(block_*) == ...)` formulas of
// ggml-common.h, with ggml_half = 2 bytes and K_SCALE_SIZE = 12.
ggml_types! {
    F32 = 0, "f32", 1, 4, false;
    F16 = 1, "f16", 1, 2, false;
    Q4_0 = 2, "q4_0", 32, 2 + 16, true;
    Q4_1 = 3, "q4_1", 32, 2 * 2 + 16, true;
    Q5_0 = 6, "q5_0", 32, 2 + 4 + 16, true;
    Q5_1 = 7, "q5_1", 32, 2 * 2 + 4 + 16, true;
    Q8_0 = 8, "q8_0", 32, 2 + 32, true;
    Q8_1 = 9, "q8_1", 32, 2 * 2 + 32, true;
    Q2_K = 10, "q2_K", QK_K, 2 * 2 + QK_K / 16 + QK_K / 4, true;
    Q3_K = 11, "q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12, true;
    Q4_K = 12, "q4_K", QK_K, 2 * 2 + 12 + QK_K / 2, true;
    Q5_K = 13, "q5_K", QK_K, 2 * 2 + 12 + QK_K / 2 + QK_K / 8, true;
    Q6_K = 14, "q6_K", QK_K, 2 + QK_K / 16 + 3 * QK_K / 4, true;
    Q8_K = 15, "q8_K", QK_K, 4 + QK_K + QK_K / 16 * 2, true;
    IQ2_XXS = 16, "iq2_xxs", QK_K, 2 + QK_K / 8 * 2, true;
    IQ2_XS = 17, "iq2_xs", QK_K, 2 + QK_K / 8 * 2 + QK_K / 32, true;
    IQ3_XXS = 18, "iq3_xxs", QK_K, 2 + 3 * (QK_K / 8), true;
    IQ1_S = 19, "iq1_s", QK_K, 2 + QK_K / 8 + QK_K / 16, true;
    IQ4_NL = 20, "iq4_nl", 32, 2 + 16, true;
    IQ3_S = 21, "iq3_s", QK_K, 2 + 13 * (QK_K / 32) + QK_K / 64, true;
    IQ2_S = 22, "iq2_s", QK_K, 2 + QK_K / 4 + QK_K / 16, true;
    IQ4_XS = 23, "iq4_xs", QK_K, 2 + 2 + QK_K / 64 + QK_K / 2, true;
    I8 = 24, "i8", 1, 1, false;
    I16 = 25, "i16", 1, 2, false;
    I32 = 26, "i32", 1, 4, false;
    I64 = 27, "i64", 1, 8, false;
    F64 = 28, "f64", 1, 8, false;
    IQ1_M = 29, "iq1_m", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32, true;
    BF16 = 30, "bf16", 1, 2, false;
    TQ1_0 = 34, "tq1_0", QK_K, 2 + QK_K / 64 + (QK_K - 4 * QK_K / 64) / 5, true;
    TQ2_0 = 35, "tq2_0", QK_K, 2 + QK_K / 4, true;
    MXFP4 = 39, "mxfp4", 32, 1 + 16, true;
    NVFP4 = 40, "nvfp4", 64, 64 / 16 + 32, true;
    Q1_0 = 41, "q1_0", 128, 2 + 128 / 8, true;
    Q2_0 = 42, "q2_0", 64, 2 + 64 / 4, true;
}

impl GgmlType {
    /// Bytes taken by `n_elements` elements, or `None` when `n_elements` is
    /// not a whole number of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        if n_elements % self.block_size() != 0 {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.type_size())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
