/*
 * ottkv_format.h — the one definition of the OTT KV cache's block layout.
 *
 * Read by the CUDA kernels (kernels/*.cu) and by bindgen (build.rs -> src/format.rs).
 * Rust mirrors every size below with const asserts; change both sides together and bump
 * OTTKV_FORMAT_VERSION.
 *
 * Codes are unsigned integers of `bits` bits forming one LSB-first bit stream over little-endian
 * 32-bit words: code i of a run starts at bit i * bits, so 32 codes fill exactly `bits` words
 * and n codes take ceil(n * bits / 32) words. 2- and 4-bit codes never straddle a word (16 and
 * 8 per word); a 3-bit code may. Bits past the last code of a run are zero.
 *
 * Keys are quantized per channel over a group of `key_group` tokens. One key group of one
 * (layer, kv-head) is:
 *     uint32_t codes [head_dim][ceil(key_group * key_bits / 32)]   channel-major, one run each
 *     ottkv_qparams  params[head_dim]
 * Values are quantized per token over `value_group` consecutive channels. One token is:
 *     uint32_t codes [ceil(head_dim * value_bits / 32)]                one run
 *     ottkv_qparams  params[head_dim / value_group]
 * Dequantization: x = code * scale + min, both stored as IEEE binary16.
 */
#ifndef OTTKV_FORMAT_H
#define OTTKV_FORMAT_H

#include <stdint.h>

#define OTTKV_FORMAT_VERSION 2

/* Width of the word codes are packed into. */
#define OTTKV_WORD_BITS 32
/* Code widths the format defines. */
#define OTTKV_MIN_BITS 2
#define OTTKV_MAX_BITS 4

/* Defaults of the method (OTT.md): group, f16 residual window, outlier pool, extra pool,
 * and the number of leading layers where outlier tracing is off. */
#define OTTKV_DEFAULT_GROUP 128
#define OTTKV_DEFAULT_RESIDUAL 32
#define OTTKV_DEFAULT_POOL 3
#define OTTKV_DEFAULT_EXTRA 32
#define OTTKV_DEFAULT_UNTRACED_LAYERS 2
/* KIVI's defaults, used by the kivi presets. */
#define OTTKV_KIVI_GROUP 32
#define OTTKV_KIVI_RESIDUAL 128

/* Scale and minimum of one quantization group, as IEEE binary16 bit patterns. */
typedef struct ottkv_qparams {
    uint16_t scale;
    uint16_t min;
} ottkv_qparams;

/* Shape of the quantized storage of one (layer, kv-head). */
typedef struct ottkv_geometry {
    uint32_t head_dim;
    uint32_t key_group;   /* tokens per key group (G) */
    uint32_t value_group; /* channels per value group (Gv) */
    uint32_t key_bits;
    uint32_t value_bits;
} ottkv_geometry;

/* A token kept in full precision (outlier pool or extra pool): its absolute position and the
 * quantized group whose placeholder slot it left (UINT32_MAX when it never was in a group). */
typedef struct ottkv_outlier_slot {
    int32_t pos;
    uint32_t group;
} ottkv_outlier_slot;

#define OTTKV_NO_GROUP 0xFFFFFFFFu

#if defined(__cplusplus)
static_assert(sizeof(ottkv_qparams) == 4, "ottkv_qparams must be 4 bytes");
static_assert(sizeof(ottkv_geometry) == 20, "ottkv_geometry must be 20 bytes");
static_assert(sizeof(ottkv_outlier_slot) == 8, "ottkv_outlier_slot must be 8 bytes");
#else
_Static_assert(sizeof(ottkv_qparams) == 4, "ottkv_qparams must be 4 bytes");
_Static_assert(sizeof(ottkv_geometry) == 20, "ottkv_geometry must be 20 bytes");
_Static_assert(sizeof(ottkv_outlier_slot) == 8, "ottkv_outlier_slot must be 8 bytes");
#endif

#endif /* OTTKV_FORMAT_H */
