/*
 * attend_merge.cu — second step of split attention: combines the per-split (max, sum,
 * unnormalised output) of one query row into softmax(q K^T) V. Shared by ott_attend and
 * f16_attend.
 */
#include "ottkv_launch.h"

extern "C" __global__ void attend_merge(const ottkv_merge_args a) {
    const uint32_t row = blockIdx.x;
    if (row >= a.n_rows) return;
    const float *ml = (const float *)a.part_ml + (uint64_t)row * a.n_split * 2;
    const float *po = (const float *)a.part_o + (uint64_t)row * a.n_split * a.head_dim;
    float *out = (float *)a.out + (uint64_t)row * a.head_dim;
    const float neg_inf = __int_as_float(0xff800000);
    float m = neg_inf;
    for (uint32_t s = 0; s < a.n_split; ++s) m = fmaxf(m, ml[2 * s]);
    float l = 0.0f;
    for (uint32_t s = 0; s < a.n_split; ++s)
        if (ml[2 * s] != neg_inf) l += ml[2 * s + 1] * expf(ml[2 * s] - m);
    /* nothing visible at all cannot happen through the cache (a query sees itself); 0 as CPU */
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (uint32_t c = threadIdx.x; c < a.head_dim; c += blockDim.x) {
        float o = 0.0f;
        for (uint32_t s = 0; s < a.n_split; ++s)
            if (ml[2 * s] != neg_inf) o += po[(uint64_t)s * a.head_dim + c] * expf(ml[2 * s] - m);
        out[c] = o * inv;
    }
}
