/*
 * ottkv_device.cuh — device helpers shared by the kernels: f16 conversion, the code stream,
 * and arithmetic that must round exactly like the Rust reference.
 *
 * The CPU reference (src/quant, src/cache/head.rs) is plain IEEE f32 with no fused
 * multiply-add. nvcc contracts a*b+c into an FMA by default, which changes rounding, so every
 * operation whose result must match bit for bit goes through an explicit _rn intrinsic.
 * No CUDA header is needed (NVRTC builds this without an include path).
 */
#ifndef OTTKV_DEVICE_CUH
#define OTTKV_DEVICE_CUH

#include "ottkv_format.h"

/* IEEE binary16 bit pattern -> f32 (exact). */
__device__ __forceinline__ float h2f(uint16_t h) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h));
    return f;
}

/* f32 -> binary16, round to nearest even (what half::f16::from_f32 does). */
__device__ __forceinline__ uint16_t f2h(float f) {
    uint16_t h;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f));
    return h;
}

/* Code i of a run packed as an LSB-first stream of `bits`-bit codes in little-endian u32
 * words: code i starts at bit i*bits and may straddle two words (3 bits). */
__device__ __forceinline__ uint32_t code_at(const uint32_t *words, uint32_t bits, uint32_t i) {
    uint32_t bit = i * bits;
    uint32_t w = bit >> 5, off = bit & 31;
    uint32_t v = words[w] >> off;
    if (off + bits > 32) {
        v |= words[w + 1] << (32 - off);
    }
    return v & ((1u << bits) - 1);
}

/* Writes codes one by one into a stream of words; the tail of the last word stays zero. */
struct code_packer {
    uint32_t *out;
    uint32_t bits, acc, fill, w;
    __device__ code_packer(uint32_t *o, uint32_t b) : out(o), bits(b), acc(0), fill(0), w(0) {}
    __device__ __forceinline__ void put(uint32_t code) {
        acc |= code << fill;
        fill += bits;
        if (fill >= 32) {
            out[w++] = acc;
            fill -= 32;
            /* the part of the code that did not fit (0 when it fitted exactly) */
            acc = fill ? code >> (bits - fill) : 0;
        }
    }
    /* Flushes a partial last word; `n_words` is the run's word count. */
    __device__ __forceinline__ void finish(uint32_t n_words) {
        if (w < n_words) {
            out[w++] = acc;
        }
        while (w < n_words) {
            out[w++] = 0;
        }
    }
};

/* Rust's f32::total_cmp as an integer key: a < b in total order iff key(a) < key(b). */
__device__ __forceinline__ int32_t total_key(float x) {
    int32_t i = __float_as_int(x);
    return i ^ (int32_t)(((uint32_t)(i >> 31)) >> 1);
}

/* ottkv_qparams as one 32-bit load: scale in the low half, min in the high half. */
__device__ __forceinline__ float qp_scale(uint32_t p) { return h2f((uint16_t)(p & 0xffffu)); }
__device__ __forceinline__ float qp_min(uint32_t p) { return h2f((uint16_t)(p >> 16)); }

/* In-place orthonormal Walsh-Hadamard transform of x[0..n), in exactly the order of
 * src/quant/hadamard.rs (butterflies by doubling stride, then one multiply by 1/sqrt(n)). */
__device__ __forceinline__ void hadamard_block_exact(float *x, uint32_t n) {
    for (uint32_t h = 1; h < n; h *= 2) {
        for (uint32_t i = 0; i < n; i += 2 * h) {
            for (uint32_t j = i; j < i + h; ++j) {
                float a = x[j], b = x[j + h];
                x[j] = __fadd_rn(a, b);
                x[j + h] = __fsub_rn(a, b);
            }
        }
    }
    float s = __fdiv_rn(1.0f, __fsqrt_rn((float)n));
    for (uint32_t j = 0; j < n; ++j) {
        x[j] = __fmul_rn(x[j], s);
    }
}

#endif /* OTTKV_DEVICE_CUH */
