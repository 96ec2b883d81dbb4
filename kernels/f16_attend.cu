/*
 * f16_attend.cu — plain f16 KV attention with the same split design as ott_attend.cu (same
 * block shape, f16 scoring, softmax and merge), so that the two differ only in what they read:
 * the speed reference for the OTT kernel.
 */
#include "attend_common.cuh"

/* Dynamic shared memory: (RB * head_dim + RB * split_len) floats. */
extern "C" __global__ void __launch_bounds__(NT) f16_attend(const ottkv_f16_attend_args a) {
    extern __shared__ float smem[];
    const uint32_t hd = a.head_dim;
    const attend_block b = block_coords(a.n_head, a.n_head_kv, a.n_q);
    const uint64_t sh = (uint64_t)b.seq * a.n_head_kv + b.kvh;
    float *s_q = smem;           /* [RB][head_dim] */
    float *s_p = smem + RB * hd; /* [RB][split_len] */
    __shared__ float s_m[RB], s_l[RB];
    const uint16_t *kb = (const uint16_t *)a.k + sh * a.cap * hd;
    const uint16_t *vb = (const uint16_t *)a.v + sh * a.cap * hd;

    const uint32_t total = a.len - a.n_q + b.qi + 1; /* causal within the batch */
    const uint32_t t0 = b.split * a.split_len;
    const uint32_t t1 = min(total, t0 + a.split_len);
    const uint32_t n = t1 > t0 ? t1 - t0 : 0;

    load_queries(s_q, (const float *)a.q, b, a.n_q, a.n_head, hd, a.scale);
    __syncthreads();
    if (n > 0)
        f16_scores(s_p, a.split_len, s_q, hd, 0, n,
                   [&](uint32_t j) { return kb + (uint64_t)(t0 + j) * hd; });
    __syncthreads();
    split_softmax(s_p, a.split_len, n, s_m, s_l);
    __syncthreads();

    float acc[MAX_CPT][RB];
#pragma unroll
    for (int k = 0; k < MAX_CPT; ++k)
#pragma unroll
        for (int r = 0; r < RB; ++r) acc[k][r] = 0.0f;
    for (uint32_t tt = t0; tt < t1; ++tt) {
        const uint16_t *row = vb + (uint64_t)tt * hd;
        float p[RB];
#pragma unroll
        for (int r = 0; r < RB; ++r) p[r] = s_p[r * a.split_len + (tt - t0)];
#pragma unroll
        for (int k = 0; k < MAX_CPT; ++k) {
            const uint32_t c = threadIdx.x + k * NT;
            if (c < hd) {
                const float v = h2f(row[c]);
#pragma unroll
                for (int r = 0; r < RB; ++r) acc[k][r] += p[r] * v;
            }
        }
    }
    write_partial(acc, b, a.n_q, a.n_head, a.n_split, hd, s_m, s_l, (float *)a.part_o,
                  (float *)a.part_ml);
}
