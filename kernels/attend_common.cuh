/*
 * attend_common.cuh — the parts of split ("flash-decoding") attention that the OTT and the
 * f16 kernels share: the block layout, scores of f16 rows, the per-split softmax and the
 * partial-result write. One block = one split of the token sequence x up to
 * OTTKV_ATTEND_ROWS query heads of one kv head x one query token of one sequence.
 */
#ifndef OTTKV_ATTEND_COMMON_CUH
#define OTTKV_ATTEND_COMMON_CUH

#include "ottkv_launch.h"
#include "ottkv_device.cuh"

#define RB OTTKV_ATTEND_ROWS
#define NT OTTKV_ATTEND_THREADS
#define NEG_INF (__int_as_float(0xff800000))
/* Channels one thread accumulates in the value pass. */
#define MAX_CPT (OTTKV_ATTEND_MAX_HEAD_DIM / NT)

static_assert(NT == 32 * RB, "the softmax pass gives one warp to each query row");

/* Which query rows, sequence and token a block works on. */
struct attend_block {
    uint32_t split, kvh, h0, nrows, seq, qi;
};

__device__ __forceinline__ attend_block block_coords(uint32_t n_head, uint32_t n_head_kv,
                                                     uint32_t n_q) {
    attend_block b;
    uint32_t rep = n_head / n_head_kv;
    uint32_t row_blocks = (rep + RB - 1) / RB;
    b.split = blockIdx.x;
    b.kvh = blockIdx.y / row_blocks;
    b.h0 = b.kvh * rep + (blockIdx.y % row_blocks) * RB;
    b.nrows = min((uint32_t)RB, b.kvh * rep + rep - b.h0);
    b.seq = blockIdx.z / n_q;
    b.qi = blockIdx.z % n_q;
    return b;
}

/* s_q[r][c] = q[row r][c] * scale; rows past nrows are zero (computed, never written). */
__device__ __forceinline__ void load_queries(float *s_q, const float *q, const attend_block &b,
                                             uint32_t n_q, uint32_t n_head, uint32_t hd,
                                             float scale) {
    const float *qb = q + (((uint64_t)b.seq * n_q + b.qi) * n_head + b.h0) * hd;
    for (uint32_t i = threadIdx.x; i < RB * hd; i += NT) {
        uint32_t r = i / hd;
        s_q[i] = r < b.nrows ? qb[i] * scale : 0.0f;
    }
}

/* Scores of f16 key rows: one warp per token, lanes over channel pairs (head_dim is even). */
template <typename RowOf>
__device__ __forceinline__ void f16_scores(float *s_p, uint32_t split_len, const float *s_q,
                                           uint32_t hd, uint32_t first, uint32_t n,
                                           RowOf row_of) {
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (uint32_t j = warp; j < n; j += NT / 32) {
        const uint32_t *row = (const uint32_t *)row_of(j);
        float acc[RB];
#pragma unroll
        for (int r = 0; r < RB; ++r) acc[r] = 0.0f;
        for (uint32_t cp = lane; cp < hd / 2; cp += 32) {
            uint32_t two = row[cp];
            float k0 = h2f((uint16_t)(two & 0xffffu)), k1 = h2f((uint16_t)(two >> 16));
#pragma unroll
            for (int r = 0; r < RB; ++r)
                acc[r] += s_q[r * hd + 2 * cp] * k0 + s_q[r * hd + 2 * cp + 1] * k1;
        }
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            float v = acc[r];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) s_p[r * split_len + first + j] = v;
        }
    }
}

/* Per-split softmax: warp r turns row r's scores into exp(s - max) and keeps max and sum. */
__device__ __forceinline__ void split_softmax(float *s_p, uint32_t split_len, uint32_t n,
                                              float *s_m, float *s_l) {
    const uint32_t lane = threadIdx.x & 31, r = threadIdx.x >> 5;
    float *p = s_p + r * split_len;
    float m = NEG_INF;
    for (uint32_t j = lane; j < n; j += 32) m = fmaxf(m, p[j]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.0f;
    for (uint32_t j = lane; j < n; j += 32) {
        /* every slot of the split masked: all weights are 0, and exp(-inf - -inf) is NaN */
        float e = m == NEG_INF ? 0.0f : expf(p[j] - m);
        p[j] = e;
        l += e;
    }
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) {
        s_m[r] = m;
        s_l[r] = l;
    }
}

/* Writes the split's unnormalised output and (max, sum) of the block's real rows. */
__device__ __forceinline__ void write_partial(const float (&acc)[MAX_CPT][RB],
                                              const attend_block &b, uint32_t n_q,
                                              uint32_t n_head, uint32_t n_split, uint32_t hd,
                                              const float *s_m, const float *s_l,
                                              float *part_o, float *part_ml) {
    for (uint32_t r = 0; r < b.nrows; ++r) {
        uint64_t row = ((uint64_t)b.seq * n_q + b.qi) * n_head + b.h0 + r;
        uint64_t slot = row * n_split + b.split;
#pragma unroll
        for (int k = 0; k < MAX_CPT; ++k) {
            uint32_t c = threadIdx.x + k * NT;
            if (c < hd) part_o[slot * hd + c] = acc[k][r];
        }
        if (threadIdx.x == 0) {
            part_ml[slot * 2] = s_m[r];
            part_ml[slot * 2 + 1] = s_l[r];
        }
    }
}

#endif /* OTTKV_ATTEND_COMMON_CUH */
