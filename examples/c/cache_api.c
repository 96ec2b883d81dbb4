/*
 * cache_api.c: the ottkv cache from C, checked against a naive f32 attention.
 *
 * 2 layers, 4 query heads over 2 kv heads, head_dim 64, 300 tokens fed in uneven batches,
 * for a 4-bit and a 2-bit config. For each config three caches get the same tokens:
 *   batch: ottkv_cache_forward on the uneven batches (the recommended path),
 *   token: ottkv_cache_forward one token at a time,
 *   low:   ottkv_cache_plan + _append + _attend (two row ranges) on the same batches,
 * and every output is compared with the naive attention and with the batch cache.
 *
 * Build (after `cargo build --release`):
 *   PKG_CONFIG_PATH=target/release cc examples/c/cache_api.c \
 *       $(pkg-config --cflags --libs ottkv) -o cache_api && ./cache_api
 * Exit status 0 when every check passed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ottkv.h"
#include "check.h"

enum { N_LAYER = 2, N_HEAD = 4, N_HEAD_KV = 2, HEAD_DIM = 64, N_TOKENS = 300, MAX_TOKENS = 512 };

static const size_t BATCHES[] = {1, 7, 64, 3, 150, 1, 74}; /* sums to N_TOKENS */

/*
 * Tolerances: NMSE (sum of squared errors / sum of squares) of the attention output against
 * naive f32 attention, worst layer, on this program's seeded data. Measured (ottkv 0.1.0):
 * 4-bit 2.8e-3, 2-bit traced 8.1e-2, 2-bit untraced 1.0e-1; bounds ~1.5x above. Most of it is
 * the per-token value quantization (step = range/15 at 4 bits, range/3 at 2 bits; uniform
 * rounding error step^2/12), which averaging over tokens does not shrink relative to the signal.
 * The outlier pool must cut the 2-bit error by at least 10% here (measured: 19%).
 * Batch vs token-by-token is exact by design (same code on the same cache states); the bound
 * only absorbs float reassociation.
 */
#define NMSE_4BIT 5e-3
#define NMSE_2BIT 0.12
#define NMSE_2BIT_NO_POOL 0.15
#define TRACED_OVER_UNTRACED 0.9
#define BATCH_EQUIV_MAX_ABS 1e-5

typedef struct {
    const char *spec;
    double nmse_bound;
} config_case;

/* Runs one config; returns the worst layer NMSE of the batch path vs naive. */
static double run_case(const config_case *cc, const float *q, const float *k, const float *v) {
    const size_t qrow = N_HEAD * HEAD_DIM, kvrow = N_HEAD_KV * HEAD_DIM;
    const float scale = 1.0f / sqrtf((float)HEAD_DIM);

    /* Config from a spec string; overrides (p@L=..) land in our array. */
    ottkv_layer_override ov[8];
    ottkv_cache_config cfg;
    CHECK_STATUS(ottkv_cache_config_from_spec(cc->spec, &cfg, ov, 8));
    ottkv_cache_shape shape = {N_LAYER, N_HEAD_KV, HEAD_DIM, MAX_TOKENS};

    ottkv_cache *batch, *token, *low;
    CHECK_STATUS(ottkv_cache_create(&cfg, &shape, &batch));
    CHECK_STATUS(ottkv_cache_create(&cfg, &shape, &token));
    CHECK_STATUS(ottkv_cache_create(&cfg, &shape, &low));

    size_t nq = (size_t)N_TOKENS * qrow;
    float *o_batch = malloc(N_LAYER * nq * sizeof(float));
    float *o_token = malloc(N_LAYER * nq * sizeof(float));
    float *o_low = malloc(N_LAYER * nq * sizeof(float));
    float *o_ref = malloc(N_LAYER * nq * sizeof(float));

    size_t past = 0;
    for (size_t b = 0; b < sizeof BATCHES / sizeof BATCHES[0]; b++) {
        size_t n = BATCHES[b];
        for (int l = 0; l < N_LAYER; l++) {
            /* Each layer gets its own data: offset the shared arrays by layer. */
            const float *ql = q + (size_t)l * nq + past * qrow;
            const float *kl = k + (size_t)l * N_TOKENS * kvrow + past * kvrow;
            const float *vl = v + (size_t)l * N_TOKENS * kvrow + past * kvrow;
            float *ob = o_batch + (size_t)l * nq + past * qrow;
            float *ot = o_token + (size_t)l * nq + past * qrow;
            float *ow = o_low + (size_t)l * nq + past * qrow;

            /* batch: the recommended path; it splits at flush points itself. */
            CHECK_STATUS(ottkv_cache_forward(batch, l, n, N_HEAD, scale, ql, n * qrow, kl,
                                             n * kvrow, vl, n * kvrow, ob, n * qrow, 2));

            /* token: one token at a time. */
            for (size_t t = 0; t < n; t++)
                CHECK_STATUS(ottkv_cache_forward(token, l, 1, N_HEAD, scale, ql + t * qrow, qrow,
                                                 kl + t * kvrow, kvrow, vl + t * kvrow, kvrow,
                                                 ot + t * qrow, qrow, 1));

            /* low: plan, then append + attend each sub-batch, in two row ranges. */
            size_t starts[16], n_sub;
            CHECK_STATUS(ottkv_cache_plan(low, l, n, starts, 16, &n_sub));
            for (size_t s = 0; s < n_sub; s++) {
                size_t a = starts[s], e = s + 1 < n_sub ? starts[s + 1] : n, m = e - a;
                CHECK_STATUS(ottkv_cache_append(low, l, m, kl + a * kvrow, m * kvrow,
                                                vl + a * kvrow, m * kvrow));
                size_t rows = m * N_HEAD, mid = rows / 2;
                CHECK_STATUS(ottkv_cache_attend(low, l, m, N_HEAD, scale, ql + a * qrow,
                                                m * qrow, 0, mid, ow + a * qrow,
                                                mid * HEAD_DIM));
                CHECK_STATUS(ottkv_cache_attend(low, l, m, N_HEAD, scale, ql + a * qrow,
                                                m * qrow, mid, rows,
                                                ow + a * qrow + mid * HEAD_DIM,
                                                (rows - mid) * HEAD_DIM));
            }

            /* Naive reference over every token so far. */
            naive_attention(ql, k + (size_t)l * N_TOKENS * kvrow, v + (size_t)l * N_TOKENS * kvrow,
                            past, n, N_HEAD, N_HEAD_KV, HEAD_DIM, scale,
                            o_ref + (size_t)l * nq + past * qrow);
        }
        past += n;
    }

    char what[160];
    double worst = 0.0;
    for (int l = 0; l < N_LAYER; l++) {
        size_t off = (size_t)l * nq;
        err_stats e = compare(o_batch + off, o_ref + off, nq);
        if (e.nmse > worst) worst = e.nmse;
        snprintf(what, sizeof what, "%s layer %d: NMSE vs naive f32", cc->spec, l);
        check(e.nmse <= cc->nmse_bound, what, e.nmse, cc->nmse_bound);
        e = compare(o_token + off, o_batch + off, nq);
        snprintf(what, sizeof what, "%s layer %d: token-by-token vs batch, max |d|", cc->spec, l);
        check(e.max_abs <= BATCH_EQUIV_MAX_ABS, what, e.max_abs, BATCH_EQUIV_MAX_ABS);
        e = compare(o_low + off, o_batch + off, nq);
        snprintf(what, sizeof what, "%s layer %d: plan+append+attend vs batch, max |d|", cc->spec,
                 l);
        check(e.max_abs <= BATCH_EQUIV_MAX_ABS, what, e.max_abs, BATCH_EQUIV_MAX_ABS);
    }

    /* Memory statistics: segments add up; reset empties the layers. */
    ottkv_memory_stats ms;
    uint64_t len;
    CHECK_STATUS(ottkv_cache_memory(batch, &ms));
    CHECK_STATUS(ottkv_cache_len(batch, 1, &len));
    snprintf(what, sizeof what, "%s: tokens held by layer 1", cc->spec);
    check(len == N_TOKENS, what, (double)len, N_TOKENS);
    printf("     memory: codes %llu params %llu window %llu pools %llu masks/positions %llu, "
           "total %llu bytes (f16 would be %d)\n",
           (unsigned long long)ms.codes, (unsigned long long)ms.params,
           (unsigned long long)ms.window, (unsigned long long)ms.pools,
           (unsigned long long)ms.masks_positions, (unsigned long long)ms.total,
           2 * 2 * N_LAYER * N_HEAD_KV * HEAD_DIM * N_TOKENS);
    snprintf(what, sizeof what, "%s: memory segments sum to total", cc->spec);
    check(ms.codes + ms.params + ms.window + ms.pools + ms.masks_positions == ms.total && ms.total > 0,
          what, (double)ms.total, (double)ms.total);
    CHECK_STATUS(ottkv_cache_reset(batch));
    CHECK_STATUS(ottkv_cache_len(batch, 0, &len));
    snprintf(what, sizeof what, "%s: tokens after reset", cc->spec);
    check(len == 0, what, (double)len, 0);

    CHECK_STATUS(ottkv_cache_free(batch));
    CHECK_STATUS(ottkv_cache_free(token));
    CHECK_STATUS(ottkv_cache_free(low));
    /* A freed handle is an error, not a crash. */
    ottkv_status st = ottkv_cache_len(batch, 0, &len);
    snprintf(what, sizeof what, "%s: use after free -> OTTKV_ERR_HANDLE", cc->spec);
    check(st == OTTKV_ERR_HANDLE && ottkv_last_error()[0] != '\0', what, st, OTTKV_ERR_HANDLE);

    free(o_batch);
    free(o_token);
    free(o_low);
    free(o_ref);
    return worst;
}

int main(void) {
    printf("ottkv %s, ABI %u (header %d), ggml %s\n", ottkv_version(), ottkv_abi_version(),
           OTTKV_ABI_VERSION, ottkv_ggml_version());
    check(ottkv_abi_version() == OTTKV_ABI_VERSION, "library ABI version == header's",
          ottkv_abi_version(), OTTKV_ABI_VERSION);
    if (!ottkv_cuda_available()) printf("     CUDA: no (%s)\n", ottkv_last_error());

    size_t nq = (size_t)N_LAYER * N_TOKENS * N_HEAD * HEAD_DIM;
    size_t nkv = (size_t)N_LAYER * N_TOKENS * N_HEAD_KV * HEAD_DIM;
    float *q = malloc(nq * sizeof(float)), *k = malloc(nkv * sizeof(float)),
          *v = malloc(nkv * sizeof(float));
    fill_qkv(q, k, v, (size_t)N_LAYER * N_TOKENS, N_HEAD, N_HEAD_KV, HEAD_DIM);

    /*
     * Small G and R so 300 tokens go through several flushes; t=0 traces outliers in both
     * layers; p@1 exercises a per-layer override. The last case is the same 2-bit cache
     * without the outlier pool (KIVI-like): tracing must beat it (the property OTT sells).
     */
    const config_case cases[] = {
        {"ott4:g=32,r=16,t=0", NMSE_4BIT},
        {"ott2:g=32,r=16,t=0,p@1=8", NMSE_2BIT},
        {"ott2:g=32,r=16,t=0,p=0", NMSE_2BIT_NO_POOL},
    };
    double nmse[3];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        nmse[i] = run_case(&cases[i], q, k, v);
    check(nmse[1] <= TRACED_OVER_UNTRACED * nmse[2],
          "2-bit: outlier pool lowers the NMSE (traced / untraced)", nmse[1] / nmse[2],
          TRACED_OVER_UNTRACED);

    free(q);
    free(k);
    free(v);
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
