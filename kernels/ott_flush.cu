/*
 * ott_flush.cu — one group flush of one layer (OTT.md §3-§4), one block per kv head: the
 * oldest G window tokens become quantized group `group`, after outlier tracing.
 *
 * This mirrors HeadCache::flush (src/cache/head.rs) step by step and must reproduce it bit for
 * bit: codes, parameters, masks, pool and extra-pool choices. So every float operation whose
 * result is stored or compared rounds exactly as the Rust code does (explicit _rn intrinsics,
 * no contraction, sums in the same order), and the candidate order is Rust's
 * (score.total_cmp, position). Speed is secondary: a flush runs once per G tokens.
 */
#include "ottkv_launch.h"
#include "ottkv_device.cuh"

#define FT OTTKV_FLUSH_THREADS

/* One code of the min/max quantizer (src/quant/minmax.rs quantize_one). */
__device__ __forceinline__ uint32_t quantize_one(float x, float scale, float mn, uint32_t maxc) {
    if (scale <= 0.0f) return 0;
    float q = roundf(__fdiv_rn(__fsub_rn(x, mn), scale)); /* half away from zero, as Rust */
    q = q < 0.0f ? 0.0f : (q > (float)maxc ? (float)maxc : q);
    return (uint32_t)q;
}

/* Parameters of one group of n values at stride `stride` (minmax_params). Ties of -0.0 and
 * +0.0 keep the first seen; the Rust f32::min/max leave that case unspecified. */
__device__ __forceinline__ uint32_t minmax_params(const float *x, uint32_t n, uint32_t stride,
                                                  uint32_t maxc, float *scale, float *mn) {
    float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);
    for (uint32_t i = 0; i < n; ++i) {
        float v = x[(uint64_t)i * stride];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    uint16_t min16 = f2h(lo);
    uint16_t scale16 = hi > lo ? f2h(__fdiv_rn(__fsub_rn(hi, lo), (float)maxc)) : (uint16_t)0;
    *scale = h2f(scale16);
    *mn = h2f(min16);
    return (uint32_t)scale16 | ((uint32_t)min16 << 16);
}

/* fill_with_mean_of_others for one channel of x [G][head_dim]. */
__device__ __forceinline__ void fill_mean(float *x, const uint32_t *sel, uint32_t G, uint32_t hd,
                                          uint32_t c, uint32_t n_keep) {
    float m = 0.0f;
    for (uint32_t t = 0; t < G; ++t)
        if (!sel[t]) m = __fadd_rn(m, x[(uint64_t)t * hd + c]);
    if (n_keep > 0) m = __fdiv_rn(m, (float)n_keep);
    for (uint32_t t = 0; t < G; ++t)
        if (sel[t]) x[(uint64_t)t * hd + c] = m;
}

extern "C" __global__ void __launch_bounds__(FT) ott_flush(const ottkv_flush_args a) {
    const ottkv_cache_dims &d = a.d;
    const uint32_t h = blockIdx.x, tid = threadIdx.x;
    const uint32_t hd = d.geo.head_dim, G = d.geo.key_group, gi = a.group;
    const uint32_t kw = d.key_words, vw = d.value_words, mw = d.mask_words;
    const uint32_t gv = d.geo.value_group, vnp = hd / gv;
    const uint32_t kbits = d.geo.key_bits, vbits = d.geo.value_bits;
    const uint32_t base = gi * G;
    const uint32_t ncap = d.pool_cap + G; /* candidate rows allocated per head */

    uint16_t *win_k = (uint16_t *)a.c.win_k + (uint64_t)h * d.win_cap * hd;
    uint16_t *win_v = (uint16_t *)a.c.win_v + (uint64_t)h * d.win_cap * hd;
    uint16_t *sink_k = (uint16_t *)a.c.sink_k + (uint64_t)h * d.sink_cap * hd;
    uint16_t *sink_v = (uint16_t *)a.c.sink_v + (uint64_t)h * d.sink_cap * hd;
    uint16_t *pool_k = (uint16_t *)a.c.pool_k + (uint64_t)h * d.pool_cap * hd;
    uint16_t *pool_v = (uint16_t *)a.c.pool_v + (uint64_t)h * d.pool_cap * hd;
    uint16_t *extra_k = (uint16_t *)a.c.extra_k + (uint64_t)h * d.extra_cap * hd;
    uint16_t *extra_v = (uint16_t *)a.c.extra_v + (uint64_t)h * d.extra_cap * hd;
    ottkv_outlier_slot *pool_slots = (ottkv_outlier_slot *)a.pool_slots + (uint64_t)h * d.pool_cap;
    ottkv_outlier_slot *extra_slots =
        (ottkv_outlier_slot *)a.extra_slots + (uint64_t)h * d.extra_cap;
    uint32_t *pool_len = (uint32_t *)a.c.pool_len + h;
    uint32_t *extra_len = (uint32_t *)a.c.extra_len + h;
    uint32_t *stopped = (uint32_t *)a.stopped_at + h;
    uint32_t *kc = (uint32_t *)a.c.key_codes + ((uint64_t)h * d.max_groups + gi) * hd * kw;
    uint32_t *kp = (uint32_t *)a.c.key_params + ((uint64_t)h * d.max_groups + gi) * hd;
    uint32_t *vc = (uint32_t *)a.c.val_codes + ((uint64_t)h * d.max_groups + gi) * G * vw;
    uint32_t *vp = (uint32_t *)a.c.val_params + ((uint64_t)h * d.max_groups + gi) * G * vnp;
    uint32_t *mk = (uint32_t *)a.c.masks + ((uint64_t)h * d.max_groups + gi) * mw;

    float *kg = (float *)a.scratch_kv + (uint64_t)h * 2 * G * hd; /* [G][head_dim] */
    float *vg = kg + (uint64_t)G * hd;                              /* [G][head_dim] */
    float *cand = (float *)a.scratch_cand + (uint64_t)h * ncap * hd; /* [cand][head_dim] */
    float *score = (float *)a.scratch_score + (uint64_t)h * ncap;
    uint32_t *rank = (uint32_t *)a.scratch_rank + (uint64_t)h * ncap;
    uint32_t *sel = (uint32_t *)a.scratch_sel + (uint64_t)h * G;
    ottkv_outlier_slot *new_slots =
        (ottkv_outlier_slot *)a.scratch_pool_slots + (uint64_t)h * d.pool_cap;
    uint16_t *new_k = (uint16_t *)a.scratch_pool_kv + (uint64_t)h * 2 * d.pool_cap * hd;
    uint16_t *new_v = new_k + (uint64_t)d.pool_cap * hd;

    __shared__ uint32_t s_trace, s_np, s_ne, s_nev, s_stop, s_nsel;

    /* 1. The group in f32; sinks copied out and marked. */
    for (uint64_t i = tid; i < (uint64_t)G * hd; i += FT) {
        const uint32_t t = (uint32_t)(i / hd), c = (uint32_t)(i % hd);
        const uint64_t w = (uint64_t)((a.win_start + t) % d.win_cap) * hd + c;
        kg[i] = h2f(win_k[w]);
        vg[i] = h2f(win_v[w]);
        if (t < a.n_sink) {
            sink_k[(uint64_t)(a.sink_len + t) * hd + c] = win_k[w];
            sink_v[(uint64_t)(a.sink_len + t) * hd + c] = win_v[w];
        }
    }
    for (uint32_t t = tid; t < G; t += FT) sel[t] = t < a.n_sink ? 1u : 0u;
    if (tid == 0) {
        s_trace = a.pool_cap > 0 && *stopped == OTTKV_NO_GROUP;
        s_np = *pool_len;
        s_ne = *extra_len;
        s_nsel = 0;
    }
    __syncthreads();

    /* 2. Outlier tracing: candidates = pool entries, then the group's non-sink slots. */
    if (s_trace) {
        const uint32_t np = s_np, ncand = np + (G - a.n_sink);
        for (uint32_t i = tid; i < ncand; i += FT) {
            float *row = cand + (uint64_t)i * hd;
            if (i < np) {
                for (uint32_t c = 0; c < hd; ++c) row[c] = h2f(pool_k[(uint64_t)i * hd + c]);
            } else {
                const float *src = kg + (uint64_t)(a.n_sink + i - np) * hd;
                for (uint32_t c = 0; c < hd; ++c) row[c] = src[c];
            }
            /* scores are taken on the caller's (unrotated) key, as score_stored does */
            if (a.rot > 0)
                for (uint32_t b0 = 0; b0 < hd; b0 += a.rot) hadamard_block_exact(row + b0, a.rot);
            float s = 0.0f;
            if (a.score == OTTKV_SCORE_L1) {
                for (uint32_t c = 0; c < hd; ++c) s = __fadd_rn(s, fabsf(row[c]));
            } else {
                for (uint32_t c = 0; c < hd; ++c) s = __fadd_rn(s, __fmul_rn(row[c], row[c]));
                s = __fsqrt_rn(s);
            }
            score[i] = s;
        }
        __syncthreads();
        /* rank in (score, position) order; positions are distinct, so ranks are too */
        for (uint32_t i = tid; i < ncand; i += FT) {
            const int32_t ki = total_key(score[i]);
            const int32_t pi = i < np ? pool_slots[i].pos : (int32_t)(base + a.n_sink + i - np);
            uint32_t r = 0;
            for (uint32_t j = 0; j < ncand; ++j) {
                const int32_t kj = total_key(score[j]);
                const int32_t pj =
                    j < np ? pool_slots[j].pos : (int32_t)(base + a.n_sink + j - np);
                r += (kj < ki) || (kj == ki && pj < pi);
            }
            rank[i] = r;
        }
        __syncthreads();
        if (tid == 0) {
            uint32_t nev = 0;
            for (uint32_t i = 0; i < np; ++i) nev += rank[i] >= a.pool_cap;
            s_nev = nev;
            /* stop rule: this group and later ones go in plainly; pools stay as they are */
            s_stop = s_ne + nev > a.extra_cap;
            if (s_stop) *stopped = gi;
        }
        __syncthreads();
        if (!s_stop) {
            /* evicted pool entries join the extra pool in their pool order */
            for (uint64_t idx = tid; idx < (uint64_t)np * hd; idx += FT) {
                const uint32_t i = (uint32_t)(idx / hd), c = (uint32_t)(idx % hd);
                if (rank[i] < a.pool_cap) continue;
                uint32_t e = s_ne;
                for (uint32_t j = 0; j < i; ++j) e += rank[j] >= a.pool_cap;
                extra_k[(uint64_t)e * hd + c] = pool_k[idx];
                extra_v[(uint64_t)e * hd + c] = pool_v[idx];
                if (c == 0) extra_slots[e] = pool_slots[i];
            }
            /* the new pool, staged (old entries are still being read) */
            for (uint64_t idx = tid; idx < (uint64_t)ncand * hd; idx += FT) {
                const uint32_t i = (uint32_t)(idx / hd), c = (uint32_t)(idx % hd);
                const uint32_t r = rank[i];
                if (r >= a.pool_cap) continue;
                if (i < np) {
                    new_k[(uint64_t)r * hd + c] = pool_k[idx];
                    new_v[(uint64_t)r * hd + c] = pool_v[idx];
                    if (c == 0) new_slots[r] = pool_slots[i];
                } else {
                    const uint32_t t = a.n_sink + i - np;
                    const uint64_t w = (uint64_t)((a.win_start + t) % d.win_cap) * hd + c;
                    new_k[(uint64_t)r * hd + c] = win_k[w];
                    new_v[(uint64_t)r * hd + c] = win_v[w];
                    if (c == 0) {
                        ottkv_outlier_slot s;
                        s.pos = (int32_t)(base + t);
                        s.group = gi;
                        new_slots[r] = s;
                        sel[t] = 1;
                    }
                }
            }
            __syncthreads();
            const uint32_t new_np = min(a.pool_cap, ncand);
            for (uint64_t idx = tid; idx < (uint64_t)new_np * hd; idx += FT) {
                pool_k[idx] = new_k[idx];
                pool_v[idx] = new_v[idx];
            }
            for (uint32_t i = tid; i < new_np; i += FT) pool_slots[i] = new_slots[i];
            if (tid == 0) {
                *pool_len = new_np;
                *extra_len = s_ne + s_nev;
            }
        }
    }
    __syncthreads();

    /* 3. Slots that left (sinks, pool) take the mean of the others, K and V. */
    uint32_t mine = 0;
    for (uint32_t t = tid; t < G; t += FT) mine += sel[t];
    atomicAdd(&s_nsel, mine);
    __syncthreads();
    const uint32_t n_keep = G - s_nsel;
    if (n_keep < G) {
        for (uint32_t c = tid; c < hd; c += FT) {
            fill_mean(kg, sel, G, hd, c, n_keep);
            fill_mean(vg, sel, G, hd, c, n_keep);
        }
    }
    __syncthreads();

    /* 4. Keys per channel over the group's G tokens. */
    const uint32_t kmax = (1u << kbits) - 1, vmax = (1u << vbits) - 1;
    for (uint32_t c = tid; c < hd; c += FT) {
        float sc, mn;
        kp[c] = minmax_params(kg + c, G, hd, kmax, &sc, &mn);
        code_packer pk(kc + (uint64_t)c * kw, kbits);
        for (uint32_t t = 0; t < G; ++t) pk.put(quantize_one(kg[(uint64_t)t * hd + c], sc, mn, kmax));
        pk.finish(kw);
    }
    /* 5. Values per token over groups of value_group channels, one code stream per row. */
    for (uint32_t t = tid; t < G; t += FT) {
        const float *x = vg + (uint64_t)t * hd;
        code_packer pk(vc + (uint64_t)t * vw, vbits);
        for (uint32_t j = 0; j < vnp; ++j) {
            float sc, mn;
            vp[(uint64_t)t * vnp + j] = minmax_params(x + j * gv, gv, 1, vmax, &sc, &mn);
            for (uint32_t c = j * gv; c < (j + 1) * gv; ++c) pk.put(quantize_one(x[c], sc, mn, vmax));
        }
        pk.finish(vw);
    }
    /* 6. Placeholder masks. */
    for (uint32_t w = tid; w < mw; w += FT) {
        uint32_t m = 0;
        for (uint32_t bit = 0; bit < 32; ++bit) {
            const uint32_t t = w * 32 + bit;
            if (t < G && sel[t]) m |= 1u << bit;
        }
        mk[w] = m;
    }
}
