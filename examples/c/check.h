/*
 * check.h: what both C examples share: a seeded random source, test data shaped like real
 * keys (per-channel offsets, a few outlier tokens), and a naive f32 causal attention to check
 * the cache against. Plain C99, header-only.
 */
#ifndef OTTKV_EXAMPLE_CHECK_H
#define OTTKV_EXAMPLE_CHECK_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* xorshift64*: deterministic across platforms, unlike rand(). */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double rng_uniform(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

/* Approximately N(0, 1): sum of 4 uniforms, rescaled. */
static float rng_normal(void) {
    double s = rng_uniform() + rng_uniform() + rng_uniform() + rng_uniform();
    return (float)((s - 2.0) * 1.7320508);
}

/*
 * Fills q [n][nh][hd] and k, v [n][nkv][hd] shaped like the keys OTT is about (OTT.md §4):
 * every 16th channel is an outlier channel (offset 6), and every 37th token is an outlier
 * token with a tiny key (~0 in every channel), which stretches the per-channel range of its
 * key group in the outlier channels from about [4, 8] to [0, 8].
 */
static void fill_qkv(float *q, float *k, float *v, size_t n, size_t nh, size_t nkv, size_t hd) {
    for (size_t t = 0; t < n; t++) {
        int outlier = (t % 37 == 5);
        for (size_t i = 0; i < nh * hd; i++) q[t * nh * hd + i] = rng_normal();
        for (size_t i = 0; i < nkv * hd; i++) {
            size_t c = i % hd;
            float offset = (c % 16 == 3) ? 6.0f : 0.0f;
            k[t * nkv * hd + i] = outlier ? 0.05f * rng_normal() : rng_normal() + offset;
            v[t * nkv * hd + i] = rng_normal();
        }
    }
}

/*
 * Naive causal attention of n new tokens at positions past..past+n-1, given all keys/values
 * kall, vall [past + n][nkv][hd] and the new queries q [n][nh][hd]; writes out [n][nh][hd].
 * Query head h reads kv head h / (nh / nkv).
 */
static void naive_attention(const float *q, const float *kall, const float *vall, size_t past,
                            size_t n, size_t nh, size_t nkv, size_t hd, float scale, float *out) {
    size_t rep = nh / nkv;
    float *s = malloc((past + n) * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        size_t len = past + i + 1;
        for (size_t h = 0; h < nh; h++) {
            const float *qr = q + (i * nh + h) * hd;
            size_t kv = h / rep;
            float mx = -INFINITY;
            for (size_t j = 0; j < len; j++) {
                const float *kr = kall + (j * nkv + kv) * hd;
                float d = 0.0f;
                for (size_t c = 0; c < hd; c++) d += qr[c] * kr[c];
                s[j] = d * scale;
                if (s[j] > mx) mx = s[j];
            }
            float sum = 0.0f;
            for (size_t j = 0; j < len; j++) {
                s[j] = expf(s[j] - mx);
                sum += s[j];
            }
            float *o = out + (i * nh + h) * hd;
            memset(o, 0, hd * sizeof(float));
            for (size_t j = 0; j < len; j++) {
                const float *vr = vall + (j * nkv + kv) * hd;
                float p = s[j] / sum;
                for (size_t c = 0; c < hd; c++) o[c] += p * vr[c];
            }
        }
    }
    free(s);
}

/* Error of `got` against `want` (m floats): NMSE = sum (g - w)^2 / sum w^2, and max |g - w|. */
typedef struct {
    double nmse;
    double max_abs;
} err_stats;

static err_stats compare(const float *got, const float *want, size_t m) {
    double num = 0.0, den = 0.0, mx = 0.0;
    for (size_t i = 0; i < m; i++) {
        double d = (double)got[i] - (double)want[i];
        if (isnan(got[i])) d = INFINITY;
        num += d * d;
        den += (double)want[i] * want[i];
        if (fabs(d) > mx) mx = fabs(d);
    }
    err_stats e = {den > 0.0 ? num / den : num, mx};
    return e;
}

static int failures = 0;

/* Prints one check and counts it as failed unless ok. */
static void check(int ok, const char *what, double value, double bound) {
    printf("%s %-58s %.3g (bound %.3g)\n", ok ? "ok  " : "FAIL", what, value, bound);
    if (!ok) failures++;
}

#define CHECK_STATUS(call)                                                                   \
    do {                                                                                     \
        ottkv_status st_ = (call);                                                           \
        if (st_ != OTTKV_OK) {                                                               \
            fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call,              \
                    ottkv_status_name(st_), ottkv_last_error());                             \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

#endif /* OTTKV_EXAMPLE_CHECK_H */
