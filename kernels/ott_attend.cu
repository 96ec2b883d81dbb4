/*
 * ott_attend.cu — decode / small-batch attention over the mixed OTT cache of one layer
 * (OTT.md §5), split over the sequence; attend_merge.cu combines the splits.
 *
 * Token order of one (sequence, kv head), as on the CPU (src/cache/attn.rs): quantized slots
 * (placeholders masked), sinks, outlier pool, extra pool, the visible window tokens. A block
 * scores its split into shared memory, takes the split's softmax, then accumulates values.
 *
 * Quantized keys never get dequantized: for one group, q is folded into the per-channel
 * scales, score = sum_c (q_c * scale_c) * code_c + sum_c q_c * min_c. With 2-bit keys a thread
 * owns one packed word column (16 tokens of a group) and walks the channels: a warp's loads
 * of one channel cover whole 32-byte sectors (key_words consecutive words per channel).
 */
#include "attend_common.cuh"

template <uint32_t KB>
__device__ __forceinline__ void quantized_scores(const ottkv_attend_args &a, float *s_p,
                                                 const float *s_q, uint32_t t0, uint32_t t_end,
                                                 const uint32_t *kc, const uint32_t *kp,
                                                 const uint32_t *mk) {
    const uint32_t hd = a.d.geo.head_dim, G = a.d.geo.key_group, kw = a.d.key_words;
    const uint32_t mw = a.d.mask_words;
    if (KB == 2) {
        /* t0 and t_end are multiples of 16 (split_len and G are), so columns are whole words */
        const uint32_t n_col = (t_end - t0) / 16;
        for (uint32_t col = threadIdx.x; col < n_col; col += NT) {
            const uint32_t tt = t0 + col * 16, g = tt / G, w = (tt % G) / 16;
            const uint32_t *codes = kc + (uint64_t)g * hd * kw + w;
            const uint32_t *prm = kp + (uint64_t)g * hd;
            float acc[RB][16], bias[RB];
#pragma unroll
            for (int r = 0; r < RB; ++r) {
                bias[r] = 0.0f;
#pragma unroll
                for (int l = 0; l < 16; ++l) acc[r][l] = 0.0f;
            }
            for (uint32_t c = 0; c < hd; ++c) {
                const uint32_t word = codes[(uint64_t)c * kw];
                const uint32_t p = prm[c];
                const float sc = qp_scale(p), mn = qp_min(p);
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    const float qq = s_q[r * hd + c];
                    const float qs = qq * sc;
                    bias[r] += qq * mn;
#pragma unroll
                    for (int l = 0; l < 16; ++l) acc[r][l] += qs * (float)((word >> (2 * l)) & 3u);
                }
            }
            const uint32_t m = mk[(uint64_t)g * mw + (tt % G) / 32] >> ((tt % G) % 32);
#pragma unroll
            for (int r = 0; r < RB; ++r)
#pragma unroll
                for (int l = 0; l < 16; ++l)
                    s_p[r * a.split_len + (tt - t0) + l] =
                        (m >> l) & 1u ? NEG_INF : acc[r][l] + bias[r];
        }
    } else {
        for (uint32_t tt = t0 + threadIdx.x; tt < t_end; tt += NT) {
            const uint32_t g = tt / G, tg = tt % G;
            const uint32_t *codes = kc + (uint64_t)g * hd * kw;
            const uint32_t *prm = kp + (uint64_t)g * hd;
            float acc[RB], bias[RB];
#pragma unroll
            for (int r = 0; r < RB; ++r) acc[r] = bias[r] = 0.0f;
            for (uint32_t c = 0; c < hd; ++c) {
                const float code = (float)code_at(codes + (uint64_t)c * kw, KB, tg);
                const uint32_t p = prm[c];
                const float sc = qp_scale(p), mn = qp_min(p);
#pragma unroll
                for (int r = 0; r < RB; ++r) {
                    const float qq = s_q[r * hd + c];
                    acc[r] += (qq * sc) * code;
                    bias[r] += qq * mn;
                }
            }
            const bool masked = (mk[(uint64_t)g * mw + tg / 32] >> (tg % 32)) & 1u;
#pragma unroll
            for (int r = 0; r < RB; ++r)
                s_p[r * a.split_len + (tt - t0)] = masked ? NEG_INF : acc[r] + bias[r];
        }
    }
}

template <uint32_t KB, uint32_t VB>
__device__ void attend_body(const ottkv_attend_args &a, float *smem) {
    const ottkv_cache_dims &d = a.d;
    const uint32_t hd = d.geo.head_dim, G = d.geo.key_group;
    const uint32_t gv = d.geo.value_group, vnp = hd / gv, vw = d.value_words;
    const attend_block b = block_coords(a.n_head, d.n_head_kv, a.n_q);
    const uint64_t sh = (uint64_t)b.seq * d.n_head_kv + b.kvh; /* (sequence, kv head) */

    float *s_q = smem;                /* [RB][head_dim] q * scale */
    float *s_p = smem + RB * hd;      /* [RB][split_len] scores, then weights */
    __shared__ float s_m[RB], s_l[RB];

    const uint32_t *kc = (const uint32_t *)a.c.key_codes + sh * d.max_groups * hd * d.key_words;
    const uint32_t *kp = (const uint32_t *)a.c.key_params + sh * d.max_groups * hd;
    const uint32_t *mk = (const uint32_t *)a.c.masks + sh * d.max_groups * d.mask_words;
    const uint32_t *vc = (const uint32_t *)a.c.val_codes + sh * d.max_groups * G * vw;
    const uint32_t *vp = (const uint32_t *)a.c.val_params + sh * d.max_groups * G * vnp;
    const uint16_t *sink_k = (const uint16_t *)a.c.sink_k + sh * d.sink_cap * hd;
    const uint16_t *sink_v = (const uint16_t *)a.c.sink_v + sh * d.sink_cap * hd;
    const uint16_t *pool_k = (const uint16_t *)a.c.pool_k + sh * d.pool_cap * hd;
    const uint16_t *pool_v = (const uint16_t *)a.c.pool_v + sh * d.pool_cap * hd;
    const uint16_t *extra_k = (const uint16_t *)a.c.extra_k + sh * d.extra_cap * hd;
    const uint16_t *extra_v = (const uint16_t *)a.c.extra_v + sh * d.extra_cap * hd;
    const uint16_t *win_k = (const uint16_t *)a.c.win_k + sh * d.win_cap * hd;
    const uint16_t *win_v = (const uint16_t *)a.c.win_v + sh * d.win_cap * hd;
    const uint32_t np = ((const uint32_t *)a.c.pool_len)[sh];
    const uint32_t ne = ((const uint32_t *)a.c.extra_len)[sh];

    const uint32_t nq = a.n_groups * G;
    const uint32_t ns = a.sink_len;
    const uint32_t n_window = a.win_len - a.n_q + b.qi + 1; /* causal within the batch */
    const uint32_t total = nq + ns + np + ne + n_window;
    const uint32_t t0 = b.split * a.split_len;
    const uint32_t t1 = min(total, t0 + a.split_len);
    const uint32_t n = t1 > t0 ? t1 - t0 : 0;

    /* f16 row j of the tokens after the quantized ones: sinks, pool, extra pool, window */
    auto f16_row = [&](uint32_t f, bool key) -> const uint16_t * {
        if (f < ns) return (key ? sink_k : sink_v) + (uint64_t)f * hd;
        f -= ns;
        if (f < np) return (key ? pool_k : pool_v) + (uint64_t)f * hd;
        f -= np;
        if (f < ne) return (key ? extra_k : extra_v) + (uint64_t)f * hd;
        f -= ne;
        return (key ? win_k : win_v) + (uint64_t)((a.win_start + f) % d.win_cap) * hd;
    };

    load_queries(s_q, (const float *)a.q, b, a.n_q, a.n_head, hd, a.scale);
    __syncthreads();

    const uint32_t q_end = min(t1, nq);
    if (t0 < q_end) quantized_scores<KB>(a, s_p, s_q, t0, q_end, kc, kp, mk);
    const uint32_t f_first = max(t0, nq);
    if (f_first < t1) {
        f16_scores(s_p, a.split_len, s_q, hd, f_first - t0, t1 - f_first,
                   [&](uint32_t j) { return f16_row(f_first - nq + j, true); });
    }
    __syncthreads();
    split_softmax(s_p, a.split_len, n, s_m, s_l);
    __syncthreads();

    /* values: thread per channel, all rows at once; quantized rows dequantized on the fly */
    float acc[MAX_CPT][RB];
#pragma unroll
    for (int k = 0; k < MAX_CPT; ++k)
#pragma unroll
        for (int r = 0; r < RB; ++r) acc[k][r] = 0.0f;
    for (uint32_t tt = t0; tt < q_end; ++tt) {
        float p[RB];
        bool any = false;
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            p[r] = s_p[r * a.split_len + (tt - t0)];
            any |= p[r] != 0.0f;
        }
        if (!any) continue; /* placeholder slot (block-uniform: every thread sees the same p) */
        const uint32_t *row = vc + (uint64_t)tt * vw;
        const uint32_t *prm = vp + (uint64_t)tt * vnp;
#pragma unroll
        for (int k = 0; k < MAX_CPT; ++k) {
            const uint32_t c = threadIdx.x + k * NT;
            if (c < hd) {
                const uint32_t pp = prm[c / gv];
                const float v = (float)code_at(row, VB, c) * qp_scale(pp) + qp_min(pp);
#pragma unroll
                for (int r = 0; r < RB; ++r) acc[k][r] += p[r] * v;
            }
        }
    }
    for (uint32_t tt = f_first; tt < t1; ++tt) {
        const uint16_t *row = f16_row(tt - nq, false);
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

/* Dynamic shared memory: (RB * head_dim + RB * split_len) floats. */
extern "C" __global__ void __launch_bounds__(NT) ott_attend(const ottkv_attend_args a) {
    extern __shared__ float smem[];
    const uint32_t kb = a.d.geo.key_bits, vb = a.d.geo.value_bits;
#define OTTKV_CASE(K, V) \
    if (kb == K && vb == V) { attend_body<K, V>(a, smem); return; }
    OTTKV_CASE(2, 2) OTTKV_CASE(2, 3) OTTKV_CASE(2, 4)
    OTTKV_CASE(3, 2) OTTKV_CASE(3, 3) OTTKV_CASE(3, 4)
    OTTKV_CASE(4, 2) OTTKV_CASE(4, 3) OTTKV_CASE(4, 4)
#undef OTTKV_CASE
}
