/*
 * ggml_op.c: the ottkv cache inside a ggml graph, as a llama.cpp-based tool would use it.
 *
 * Per batch: q, k, v input tensors -> ottkv_ggml_attention (one per layer) -> output, computed
 * by ggml's CPU backend on 4 threads; the outputs are checked against a naive f32 attention and
 * against ottkv_cache_forward on a twin cache (the op must give the same result for any batch
 * size, including batches that straddle flush points). Then the lifetime rules: a replaced op
 * and an op of a freed cache compute NaN, never crash.
 *
 * Build (after `cargo build --release`):
 *   PKG_CONFIG_PATH=target/release cc examples/c/ggml_op.c \
 *       $(pkg-config --cflags --libs ottkv) -o ggml_op && ./ggml_op
 * ggml comes from libottkv.a (ggml OTTKV_GGML_VERSION); do not link another copy.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-cpu.h"
#include "ottkv.h"
#include "check.h"

enum { N_LAYER = 2, N_HEAD = 4, N_HEAD_KV = 2, HEAD_DIM = 64, N_TOKENS = 300, MAX_TOKENS = 512 };
enum { N_THREADS = 4 };

static const size_t BATCHES[] = {1, 7, 64, 3, 150, 1, 74}; /* sums to N_TOKENS */

/* Same bound as cache_api.c (4-bit config, measured 2.8e-3 there on the same data). */
#define NMSE_4BIT 5e-3
/* The op runs the same Rust code as ottkv_cache_forward: equal up to float reassociation. */
#define OP_VS_FORWARD_MAX_ABS 1e-5

static struct ggml_context *new_ctx(void) {
    struct ggml_init_params p = {
        /*.mem_size   =*/ 64u << 20,
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ false,
    };
    return ggml_init(p);
}

/* A [hd, heads, n] f32 tensor holding rows [n][heads][hd] of src. */
static struct ggml_tensor *input(struct ggml_context *ctx, const float *src, size_t heads,
                                 size_t n) {
    struct ggml_tensor *t = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, HEAD_DIM, heads, n);
    memcpy(t->data, src, n * heads * HEAD_DIM * sizeof(float));
    return t;
}

int main(void) {
    printf("ottkv %s, ggml %s (built for %s)\n", ottkv_version(), ottkv_ggml_version(),
           OTTKV_GGML_VERSION);
    const size_t qrow = N_HEAD * HEAD_DIM, kvrow = N_HEAD_KV * HEAD_DIM;
    const size_t nq = (size_t)N_TOKENS * qrow, nkv = (size_t)N_TOKENS * kvrow;
    const float scale = 1.0f / sqrtf((float)HEAD_DIM);

    float *q = malloc(N_LAYER * nq * sizeof(float)), *k = malloc(N_LAYER * nkv * sizeof(float)),
          *v = malloc(N_LAYER * nkv * sizeof(float));
    fill_qkv(q, k, v, (size_t)N_LAYER * N_TOKENS, N_HEAD, N_HEAD_KV, HEAD_DIM);
    float *o_op = malloc(N_LAYER * nq * sizeof(float)), *o_fw = malloc(N_LAYER * nq * sizeof(float)),
          *o_ref = malloc(N_LAYER * nq * sizeof(float));

    ottkv_cache_config cfg;
    CHECK_STATUS(ottkv_cache_config_from_spec("ott4:g=32,r=16,t=0", &cfg, NULL, 0));
    ottkv_cache_shape shape = {N_LAYER, N_HEAD_KV, HEAD_DIM, MAX_TOKENS};
    ottkv_cache *cache, *twin;
    CHECK_STATUS(ottkv_cache_create(&cfg, &shape, &cache));
    CHECK_STATUS(ottkv_cache_create(&cfg, &shape, &twin));

    size_t past = 0;
    for (size_t b = 0; b < sizeof BATCHES / sizeof BATCHES[0]; b++) {
        size_t n = BATCHES[b];
        struct ggml_context *ctx = new_ctx();
        struct ggml_cgraph *gf = ggml_new_graph(ctx);
        struct ggml_tensor *out[N_LAYER];
        for (int l = 0; l < N_LAYER; l++) {
            const float *ql = q + l * nq + past * qrow, *kl = k + l * nkv + past * kvrow,
                        *vl = v + l * nkv + past * kvrow;
            struct ggml_tensor *qt = input(ctx, ql, N_HEAD, n);
            struct ggml_tensor *kt = input(ctx, kl, N_HEAD_KV, n);
            struct ggml_tensor *vt = input(ctx, vl, N_HEAD_KV, n);
            /* The op: writes k/v into the cache and attends, when the graph is computed. */
            out[l] = ottkv_ggml_attention(cache, ctx, l, qt, kt, vt, scale);
            if (!out[l]) {
                fprintf(stderr, "ottkv_ggml_attention: %s\n", ottkv_last_error());
                return 1;
            }
            ggml_build_forward_expand(gf, out[l]);

            CHECK_STATUS(ottkv_cache_forward(twin, l, n, N_HEAD, scale, ql, n * qrow, kl,
                                             n * kvrow, vl, n * kvrow, o_fw + l * nq + past * qrow,
                                             n * qrow, 1));
            naive_attention(ql, k + l * nkv, v + l * nkv, past, n, N_HEAD, N_HEAD_KV, HEAD_DIM,
                            scale, o_ref + l * nq + past * qrow);
        }
        if (ggml_graph_compute_with_ctx(ctx, gf, N_THREADS) != GGML_STATUS_SUCCESS) {
            fprintf(stderr, "ggml_graph_compute_with_ctx failed\n");
            return 1;
        }
        CHECK_STATUS(ottkv_ggml_check(cache)); /* errors during compute land here */
        for (int l = 0; l < N_LAYER; l++)
            memcpy(o_op + l * nq + past * qrow, out[l]->data, n * qrow * sizeof(float));
        ggml_free(ctx);
        past += n;
    }

    char what[160];
    for (int l = 0; l < N_LAYER; l++) {
        err_stats e = compare(o_op + l * nq, o_ref + l * nq, nq);
        snprintf(what, sizeof what, "ggml op layer %d: NMSE vs naive f32", l);
        check(e.nmse <= NMSE_4BIT, what, e.nmse, NMSE_4BIT);
        e = compare(o_op + l * nq, o_fw + l * nq, nq);
        snprintf(what, sizeof what, "ggml op layer %d: vs ottkv_cache_forward, max |d|", l);
        check(e.max_abs <= OP_VS_FORWARD_MAX_ABS, what, e.max_abs, OP_VS_FORWARD_MAX_ABS);
    }

    /* Bad calls return NULL with a message, before ggml could abort. */
    {
        struct ggml_context *ctx = new_ctx();
        struct ggml_tensor *qt = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, HEAD_DIM, N_HEAD, 2);
        struct ggml_tensor *kt = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, HEAD_DIM, N_HEAD_KV, 2);
        struct ggml_tensor *bad = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 32, N_HEAD_KV, 2);
        struct ggml_tensor *f16 = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, HEAD_DIM, N_HEAD_KV, 2);
        struct ggml_tensor *r = ottkv_ggml_attention(cache, ctx, 0, qt, bad, bad, scale);
        check(!r && strstr(ottkv_last_error(), "head_dim"), "wrong head_dim -> NULL + error",
              r != NULL, 0);
        r = ottkv_ggml_attention(cache, ctx, 0, qt, f16, f16, scale);
        check(!r && ottkv_last_error()[0], "f16 k/v -> NULL + error", r != NULL, 0);
        r = ottkv_ggml_attention(cache, ctx, N_LAYER, qt, kt, kt, scale);
        check(!r && ottkv_last_error()[0], "layer out of range -> NULL + error", r != NULL, 0);
        r = ottkv_ggml_attention(cache, ctx, 0, ggml_permute(ctx, qt, 0, 2, 1, 3), kt, kt, scale);
        check(!r && ottkv_last_error()[0], "non-contiguous q -> NULL + error", r != NULL, 0);
        ggml_free(ctx);
    }

    /* Lifetime: an op replaced by a newer one for the same (cache, layer) computes NaN. */
    {
        struct ggml_context *ctx = new_ctx();
        struct ggml_tensor *qt = input(ctx, q, N_HEAD, 1);
        struct ggml_tensor *kt = input(ctx, k, N_HEAD_KV, 1);
        struct ggml_tensor *vt = input(ctx, v, N_HEAD_KV, 1);
        ottkv_cache *c2;
        CHECK_STATUS(ottkv_cache_create(&cfg, &shape, &c2));
        struct ggml_tensor *old = ottkv_ggml_attention(c2, ctx, 0, qt, kt, vt, scale);
        struct ggml_tensor *newer = ottkv_ggml_attention(c2, ctx, 0, qt, kt, vt, scale);
        struct ggml_cgraph *gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, old);
        ggml_graph_compute_with_ctx(ctx, gf, N_THREADS);
        uint64_t len = 99;
        CHECK_STATUS(ottkv_cache_len(c2, 0, &len));
        check(newer && isnan(((float *)old->data)[0]) && len == 0,
              "replaced op computes NaN, appends nothing", len, 0);
        /* ... and so does a live op after its cache was freed. */
        CHECK_STATUS(ottkv_cache_free(c2));
        struct ggml_cgraph *gf2 = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf2, newer);
        ggml_graph_compute_with_ctx(ctx, gf2, N_THREADS);
        check(isnan(((float *)newer->data)[0]), "op of a freed cache computes NaN", 0, 0);
        ggml_free(ctx);
    }

    CHECK_STATUS(ottkv_cache_free(cache));
    CHECK_STATUS(ottkv_cache_free(twin));
    free(q);
    free(k);
    free(v);
    free(o_op);
    free(o_fw);
    free(o_ref);
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
