/*
 * misuse.c: every way a C caller can get the ottkv API wrong, each answered by a status code
 * (never a crash, an abort or a hang). tests/capi.rs compiles it with
 * -fsanitize=address,undefined against libottkv.a, so an out-of-bounds access, a leak or
 * undefined behaviour on any of these paths fails the test too.
 *
 * Covered: NULL pointers, freed, doubly freed and forged handles, short and overlapping
 * buffers, misaligned floats, NaN/Inf keys and scales, layer and row ranges, shapes whose
 * storage cannot be allocated (OTTKV_ERR_ALLOC), a plan over SIZE_MAX tokens, bad spec
 * strings (duplicate and empty fields, 100000 per-layer fields), hostile override counts,
 * huge thread counts, and a ggml op without a context.
 *
 * Build (after `cargo build --release`):
 *   PKG_CONFIG_PATH=target/release cc -fsanitize=address,undefined examples/c/misuse.c \
 *       $(pkg-config --cflags --libs ottkv) -o misuse && ./misuse
 * Exit status 0 when every check passed.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ottkv.h"

static int failures = 0;

/* Expects `got` to be `want` with a non-empty ottkv_last_error() (unless want is OTTKV_OK). */
static void expect(ottkv_status got, ottkv_status want, const char *what) {
    const char *msg = ottkv_last_error();
    int ok = got == want && (want == OTTKV_OK || (msg != NULL && msg[0] != '\0'));
    printf("%s %-52s %s%s%s\n", ok ? "ok  " : "FAIL", what, ottkv_status_name((int)got),
           msg[0] ? ": " : "", msg);
    if (!ok) {
        printf("     wanted %s\n", ottkv_status_name((int)want));
        failures++;
    }
}

enum { NL = 2, NKV = 2, NH = 4, HD = 16, MAXT = 64 };

static ottkv_cache *make(const char *spec, uint64_t max_tokens) {
    ottkv_cache_config cfg;
    ottkv_layer_override ov[4];
    ottkv_cache *c = NULL;
    ottkv_cache_shape shape = {NL, NKV, HD, max_tokens};
    if (ottkv_cache_config_from_spec(spec, &cfg, ov, 4) != OTTKV_OK ||
        ottkv_cache_create(&cfg, &shape, &c) != OTTKV_OK) {
        printf("FAIL could not create %s: %s\n", spec, ottkv_last_error());
        exit(1);
    }
    return c;
}

int main(void) {
    const size_t qn = NH * HD, kvn = NKV * HD;
    float *q = calloc(qn, sizeof(float));
    float *k = calloc(kvn, sizeof(float));
    float *out = calloc(qn, sizeof(float));
    for (size_t i = 0; i < qn; i++) q[i] = 0.01f * (float)(i % 7);
    for (size_t i = 0; i < kvn; i++) k[i] = 0.02f * (float)(i % 5);
    ottkv_cache_config cfg;
    ottkv_cache_shape shape = {NL, NKV, HD, MAXT};
    ottkv_cache *c = NULL;
    size_t n_sub = 0, starts[8];

    /* ---- NULL pointers ---- */
    expect(ottkv_cache_config_default(NULL), OTTKV_ERR_NULL, "config_default(NULL)");
    expect(ottkv_cache_config_from_spec(NULL, &cfg, NULL, 0), OTTKV_ERR_NULL, "spec NULL");
    expect(ottkv_cache_config_from_spec("ott2", NULL, NULL, 0), OTTKV_ERR_NULL, "out NULL");
    expect(ottkv_cache_config_default(&cfg), OTTKV_OK, "config_default");
    expect(ottkv_cache_create(NULL, &shape, &c), OTTKV_ERR_NULL, "create(config NULL)");
    expect(ottkv_cache_create(&cfg, NULL, &c), OTTKV_ERR_NULL, "create(shape NULL)");
    expect(ottkv_cache_create(&cfg, &shape, NULL), OTTKV_ERR_NULL, "create(out NULL)");
    expect(ottkv_cache_free(NULL), OTTKV_OK, "free(NULL) is a no-op");
    expect(ottkv_cache_reset(NULL), OTTKV_ERR_NULL, "reset(NULL)");

    c = make("ott2:g=16,r=16", MAXT);
    expect(ottkv_cache_len(c, 0, NULL), OTTKV_ERR_NULL, "len(out NULL)");
    expect(ottkv_cache_memory(c, NULL), OTTKV_ERR_NULL, "memory(out NULL)");
    expect(ottkv_cache_plan(c, 0, 4, starts, 8, NULL), OTTKV_ERR_NULL, "plan(n_sub NULL)");
    expect(ottkv_cache_append(c, 0, 1, NULL, kvn, k, kvn), OTTKV_ERR_NULL, "append(k NULL)");
    expect(ottkv_cache_forward(c, 0, 1, NH, 0.25f, q, qn, k, kvn, k, kvn, NULL, qn, 1),
           OTTKV_ERR_NULL, "forward(out NULL)");

    /* ---- short, overlapping and misaligned buffers ---- */
    expect(ottkv_cache_forward(c, 0, 1, NH, 0.25f, q, qn - 1, k, kvn, k, kvn, out, qn, 1),
           OTTKV_ERR_SHAPE, "forward(q one float short)");
    expect(ottkv_cache_append(c, 0, 2, k, kvn, k, kvn), OTTKV_ERR_SHAPE,
           "append(2 tokens, buffers for 1)");
    expect(ottkv_cache_forward(c, 0, 1, NH, 0.25f, q, qn, k, kvn, k, kvn, q, qn, 1),
           OTTKV_ERR_INVALID_ARGUMENT, "forward(out overlaps q)");
    {
        char *raw = malloc(kvn * sizeof(float) + 1);
        float *mis = (float *)(void *)(raw + 1);
        expect(ottkv_cache_append(c, 0, 1, mis, kvn, k, kvn), OTTKV_ERR_INVALID_ARGUMENT,
               "append(k misaligned)");
        free(raw);
    }
    expect(ottkv_cache_plan(c, 0, 40, starts, 1, &n_sub), OTTKV_ERR_OVERFLOW,
           "plan(cap too small)");
    printf("     n_sub %zu\n", n_sub);

    /* ---- NaN / Inf ---- */
    k[3] = NAN;
    expect(ottkv_cache_append(c, 0, 1, k, kvn, k, kvn), OTTKV_ERR_NON_FINITE, "append(NaN key)");
    k[3] = INFINITY;
    expect(ottkv_cache_append(c, 0, 1, k, kvn, k, kvn), OTTKV_ERR_NON_FINITE, "append(inf key)");
    k[3] = 1e6f;
    expect(ottkv_cache_append(c, 0, 1, k, kvn, k, kvn), OTTKV_ERR_NON_FINITE,
           "append(key past f16)");
    k[3] = 0.5f;
    expect(ottkv_cache_forward(c, 0, 1, NH, NAN, q, qn, k, kvn, k, kvn, out, qn, 1),
           OTTKV_ERR_INVALID_ARGUMENT, "forward(scale NaN)");
    uint64_t len = 99;
    expect(ottkv_cache_len(c, 0, &len), OTTKV_OK, "len after refused appends");
    if (len != 0) {
        printf("FAIL refused calls appended %llu tokens\n", (unsigned long long)len);
        failures++;
    }

    /* ---- ranges ---- */
    expect(ottkv_cache_len(c, NL, &len), OTTKV_ERR_RANGE, "len(layer n_layer)");
    expect(ottkv_cache_append(c, UINT32_MAX, 1, k, kvn, k, kvn), OTTKV_ERR_RANGE,
           "append(layer UINT32_MAX)");
    expect(ottkv_cache_attend(c, 0, 0, NH, 0.25f, q, 0, 0, 1, out, HD), OTTKV_ERR_RANGE,
           "attend(rows past the batch)");
    expect(ottkv_cache_forward(c, 0, 1, 3, 0.25f, q, 3 * HD, k, kvn, k, kvn, out, 3 * HD, 1),
           OTTKV_ERR_SHAPE, "forward(n_head 3 over 2 kv heads)");

    /* ---- huge n: refused at once, nothing allocated for it ---- */
    expect(ottkv_cache_plan(c, 0, SIZE_MAX, NULL, 0, &n_sub), OTTKV_ERR_OVERFLOW,
           "plan(SIZE_MAX tokens)");
    expect(ottkv_cache_plan(c, 0, MAXT + 1, starts, 8, &n_sub), OTTKV_ERR_OVERFLOW,
           "plan(max_tokens + 1)");
    expect(ottkv_cache_append(c, 0, SIZE_MAX / 4, k, kvn, k, kvn), OTTKV_ERR_SHAPE,
           "append(SIZE_MAX / 4 tokens, buffers for 1)");
    /* Thread counts beyond the cores are clamped, not spawned. */
    expect(ottkv_cache_forward(c, 0, 1, NH, 0.25f, q, qn, k, kvn, k, kvn, out, qn, 100000),
           OTTKV_OK, "forward(100000 threads)");

    /* ---- handles ---- */
    ottkv_cache *forged = (ottkv_cache *)(uintptr_t)0xdeadbeef;
    expect(ottkv_cache_reset(forged), OTTKV_ERR_HANDLE, "reset(forged handle)");
    expect(ottkv_cache_free(forged), OTTKV_ERR_HANDLE, "free(forged handle)");
    expect(ottkv_cache_free(c), OTTKV_OK, "free");
    expect(ottkv_cache_free(c), OTTKV_ERR_HANDLE, "double free");
    expect(ottkv_cache_len(c, 0, &len), OTTKV_ERR_HANDLE, "len after free");
    expect(ottkv_ggml_check(c), OTTKV_ERR_HANDLE, "ggml_check after free");

    /* ---- shapes whose storage cannot be had ---- */
    expect(ottkv_cache_config_default(&cfg), OTTKV_OK, "config_default");
    ottkv_cache_shape huge = {65536, 65536, 16, 1 << 20};
    c = NULL;
    expect(ottkv_cache_create(&cfg, &huge, &c), OTTKV_ERR_ALLOC, "create(65536 x 65536 heads)");
    if (c != NULL) {
        printf("FAIL a failed create wrote a handle\n");
        failures++;
    }
    ottkv_cache_shape wide = {1, 1, 1u << 14, UINT64_MAX};
    expect(ottkv_cache_create(&cfg, &wide, &c), OTTKV_ERR_SHAPE, "create(max_tokens UINT64_MAX)");
    ottkv_cache_shape zero = {0, NKV, HD, MAXT};
    expect(ottkv_cache_create(&cfg, &zero, &c), OTTKV_ERR_SHAPE, "create(0 layers)");
    cfg.n_overrides = SIZE_MAX;
    cfg.overrides = NULL;
    expect(ottkv_cache_create(&cfg, &shape, &c), OTTKV_ERR_INVALID_ARGUMENT,
           "create(n_overrides SIZE_MAX)");

    /* ---- spec strings ---- */
    ottkv_layer_override ov[4];
    expect(ottkv_cache_config_from_spec("ott2:k=3,k=4", &cfg, ov, 4), OTTKV_ERR_INVALID_ARGUMENT,
           "spec with a duplicate field");
    expect(ottkv_cache_config_from_spec("ott2:", &cfg, ov, 4), OTTKV_ERR_INVALID_ARGUMENT,
           "spec with nothing after ':'");
    expect(ottkv_cache_config_from_spec("ott2:k=3,,v=2", &cfg, ov, 4),
           OTTKV_ERR_INVALID_ARGUMENT, "spec with an empty field");
    expect(ottkv_cache_config_from_spec("nope", &cfg, ov, 4), OTTKV_ERR_INVALID_ARGUMENT,
           "unknown preset");
    expect(ottkv_cache_config_from_spec("ott2:p@0=4,p@1=4,p@2=4,p@3=4,p@4=4", &cfg, ov, 4),
           OTTKV_ERR_OVERFLOW, "5 overrides, room for 4");
    {
        /* 100000 per-layer fields: refused (the cap on per-layer settings), and fast. */
        size_t cap = 16 + 100000 * 12;
        char *spec = malloc(cap);
        size_t at = (size_t)snprintf(spec, cap, "ott2:");
        for (int i = 0; i < 100000; i++) {
            at += (size_t)snprintf(spec + at, cap - at, "%sp@%d=2", i ? "," : "", i);
        }
        expect(ottkv_cache_config_from_spec(spec, &cfg, ov, 4), OTTKV_ERR_INVALID_ARGUMENT,
               "spec with 100000 per-layer fields");
        free(spec);
    }

    /* ---- ggml op without a context ---- */
    c = make("ott2", MAXT);
    if (ottkv_ggml_attention(c, NULL, 0, NULL, NULL, NULL, 0.25f) != NULL) {
        printf("FAIL ggml_attention without a context returned a tensor\n");
        failures++;
    } else {
        printf("ok   %-52s %s\n", "ggml_attention(ctx NULL) is NULL", ottkv_last_error());
    }
    expect(ottkv_cache_free(c), OTTKV_OK, "free");

    free(q);
    free(k);
    free(out);
    printf(failures ? "FAILED (%d)\n" : "PASSED\n", failures);
    return failures ? 1 : 0;
}
