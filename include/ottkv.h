/*
 * ottkv.h: C ABI of ottkv, a 2-bit KV cache with outlier-token tracing (OTT, on top of KIVI).
 *
 * Hand-written; the Rust side is src/capi/. tests/capi.rs compiles examples/c/ *.c against this
 * file and the built library, and calls every function below with bad arguments.
 *
 * Build and link (after `cargo build --release` in the ottkv checkout):
 *     export PKG_CONFIG_PATH=/path/to/ottkv/target/release
 *     cc prog.c $(pkg-config --cflags --libs ottkv)
 * The static library contains ggml and libllama (the copies ottkv was built with): a program
 * that uses ggml must take ggml from libottkv.a, not link a second copy.
 *
 * Conventions
 * - Functions return an ottkv_status; results go through out-parameters.
 * - On any status other than OTTKV_OK, ottkv_last_error() describes what went wrong.
 * - Buffers are passed as (pointer, number of floats the buffer holds); the library checks the
 *   count against what the call needs and never reads or writes past it. A pointer may be NULL
 *   only when its count is 0. Float buffers must be 4-byte aligned; an output buffer must not
 *   overlap an input buffer.
 * - Handles (ottkv_cache *) are opaque tokens, not pointers to memory: never dereference one.
 *   A handle that was freed (or never created) is rejected with OTTKV_ERR_HANDLE; tokens are
 *   never reused within a process, so use-after-free and double free are errors, not crashes.
 * - No function aborts or unwinds into C: internal failures return OTTKV_ERR_INTERNAL, and
 *   memory that cannot be had returns OTTKV_ERR_ALLOC (sizes are checked against the
 *   machine's memory and allocations made fallibly before anything changes).
 *
 * Threads
 * - Every function may be called from any thread.
 * - Distinct handles are independent.
 * - Calls on one handle are serialized by a lock inside the handle, so concurrent calls are
 *   memory-safe; their ORDER is the caller's business (two threads appending to one layer at
 *   once append in an unspecified order), so in practice drive one cache from one thread.
 *   ottkv_cache_attend / _len / _memory take the lock shared and may run concurrently.
 * - ottkv_last_error() is per thread.
 */
#ifndef OTTKV_H
#define OTTKV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any incompatible change of a type or function below. */
#define OTTKV_ABI_VERSION 3
/* The ggml version ottkv is built against and bundles (llama-cpp-sys-2 0.1.161). */
#define OTTKV_GGML_VERSION "0.26.0"

typedef enum ottkv_status {
    OTTKV_OK = 0,
    OTTKV_ERR_NULL = 1,             /* a required pointer (handle, buffer, out-parameter) is NULL */
    OTTKV_ERR_INVALID_ARGUMENT = 2, /* bad config, spec string, scale, alignment or aliasing */
    OTTKV_ERR_SHAPE = 3,            /* shapes or buffer sizes that do not match the cache */
    OTTKV_ERR_OVERFLOW = 4,         /* more tokens than max_tokens, or an output array too small */
    OTTKV_ERR_NO_DEVICE = 5,        /* CUDA requested but not built in or no device */
    OTTKV_ERR_INTERNAL = 6,         /* a bug in ottkv (the message says where) */
    OTTKV_ERR_HANDLE = 7,           /* a handle that was freed or never created */
    OTTKV_ERR_RANGE = 8,            /* layer or row index out of range */
    OTTKV_ERR_NON_FINITE = 9,       /* a K/V value that is NaN/inf or overflows f16 */
    OTTKV_ERR_SUBBATCH = 10,        /* attend over tokens that straddle a flush: see _plan */
    OTTKV_ERR_VERSION = 11,         /* the ggml in the process is not OTTKV_GGML_VERSION */
    OTTKV_ERR_ALLOC = 12            /* the memory a call needs is not there (nothing changed) */
} ottkv_status;

/* Outlier score: smallest score wins a pool slot (OTT.md). */
#define OTTKV_SCORE_L1 0u /* sum |k_c| over head_dim (default) */
#define OTTKV_SCORE_L2 1u /* sqrt(sum k_c^2) */

/* Pool sizes of one layer, replacing the global ones. */
typedef struct ottkv_layer_override {
    uint32_t layer;
    int32_t pool;  /* < 0: keep the global pool (P) */
    int32_t extra; /* < 0: keep the global extra pool (E) */
    int32_t key_bits;   /* < 0: keep the global key bits */
    int32_t value_bits; /* < 0: keep the global value bits */
} ottkv_layer_override;

/*
 * Cache settings. There is no separate "mode": KIVI is this cache with pool = 0 (the presets
 * kivi2 / kivi4 also use G = 32, R = 128). Start from ottkv_cache_config_default() or
 * ottkv_cache_config_from_spec() and change fields.
 */
#define OTTKV_VALUE_PER_TOKEN 0u   /* values quantized per token over value_group channels */
#define OTTKV_VALUE_PER_CHANNEL 1u /* values quantized per channel over G tokens, as keys */
#define OTTKV_VALUE_AUTO 2u        /* per channel when head_dim < 32, else per token */

typedef struct ottkv_cache_config {
    uint32_t key_bits;        /* 2..4 */
    uint32_t value_bits;      /* 2..4 */
    uint32_t group;           /* G: tokens per key group, a positive multiple of 16 */
    uint32_t residual;        /* R: tokens always kept f16 after a flush */
    uint32_t pool;            /* P: outlier pool per (layer, kv head); 0 turns tracing off */
    uint32_t extra;           /* E: extra pool */
    uint32_t untraced_layers; /* tracing is off in layers < this (unless overridden) */
    uint32_t score;           /* OTTKV_SCORE_L1 or OTTKV_SCORE_L2 */
    uint32_t value_group;     /* Gv: channels per value group; 0 = min(G, head_dim) */
    uint32_t rotate;          /* 1: Walsh-Hadamard-rotate K/V before storing (invisible to
                                 callers; the ott3 preset), 0: off, 2: values rotated, keys
                                 per (layer, kv head) as the first flush finds best */
    uint32_t sink;            /* the first `sink` tokens stay exact f16 forever (0: none) */
    uint32_t window_bits;     /* 16: window, sinks and pools in f16; 8: in q8_0 blocks;
                                 0: q8_0 per (layer, kv head) unless its keys are dominated
                                 by a few channels (then f16), chosen at its first flush */
    uint32_t value_axis;      /* OTTKV_VALUE_PER_TOKEN (over value_group channels),
                                 OTTKV_VALUE_PER_CHANNEL (over G tokens, as keys) or
                                 OTTKV_VALUE_AUTO (per channel when head_dim < 32) */
    uint32_t untraced_key_bits; /* key bits in layers < untraced_layers; 0 = key_bits */
    uint32_t value_param_bits;  /* 16: f16 (scale, min) per value group; 8: one byte each,
                                   under an f16 pair per value-group column of a key group */
    uint32_t value_fit;         /* 0: value grids span each group's min..max; 1: least-squares
                                   grids (may clip a group's tails to narrow the step) */
    uint32_t key_fit;           /* the same for each key channel's grid over a group */
    const ottkv_layer_override *overrides; /* n_overrides entries, any order, distinct layers */
    size_t n_overrides;
} ottkv_cache_config;

typedef struct ottkv_cache_shape {
    uint32_t n_layer;
    uint32_t n_head_kv;
    uint32_t head_dim;    /* a multiple of the value group */
    uint64_t max_tokens;  /* most tokens a layer may hold (window and pools are sized by it) */
} ottkv_cache_shape;

/* Bytes allocated (capacity, not just used), by segment, over all layers and kv heads. */
typedef struct ottkv_memory_stats {
    uint64_t codes;           /* packed key and value codes */
    uint64_t params;          /* f16 (scale, min) pairs of the quantized groups */
    uint64_t window;          /* the f16 window of recent tokens (K and V) */
    uint64_t pools;           /* f16 K and V of the outlier and extra pools */
    uint64_t masks_positions; /* placeholder masks and positions of pooled tokens */
    uint64_t total;           /* the sum of the above */
} ottkv_memory_stats;

/* Opaque cache handle (a token, see Conventions). */
typedef struct ottkv_cache ottkv_cache;

/* ---- Library ---------------------------------------------------------------------------- */

/* The crate version, e.g. "0.1.0" (static string). Thread-safe; does not touch last_error. */
const char *ottkv_version(void);

/* OTTKV_ABI_VERSION of the library actually linked; compare with the header's macro. */
uint32_t ottkv_abi_version(void);

/* The ggml version in the process (ggml_version()); OTTKV_GGML_VERSION when all is well. */
const char *ottkv_ggml_version(void);

/*
 * The message of the last failed ottkv call on this thread, "" when the last call succeeded.
 * Valid until the next ottkv call on this thread (copy it to keep it). Never NULL.
 */
const char *ottkv_last_error(void);

/* The name of a status, e.g. "OTTKV_ERR_SHAPE" (static string; "unknown" for other values). */
const char *ottkv_status_name(int status);

/*
 * 1 when a CUDA device could be used, else 0 with the reason in ottkv_last_error() (built
 * without the `cuda` feature, no libcuda, no device). There is no CUDA cache yet: the
 * device-pointer API (append/attend on device buffers) comes with it, under this ABI's next
 * version. Thread-safe.
 */
int ottkv_cuda_available(void);

/* ---- Configuration ---------------------------------------------------------------------- */

/* The ott2 preset (2-bit K and V, G = 128, R = 32, P = 3, E = 32, 2 untraced layers, L1). */
ottkv_status ottkv_cache_config_default(ottkv_cache_config *out);

/*
 * Parses a preset (ott2, ott3, ott4, ottk4v2, ottk2v4, ott2-p0, kivi2, kivi4) or a spec string
 * such as "ott2:k=3,v=2,g=64,p=3,e=32,t=2,p@5=8" (fields k v g r p e t s gv rot sink p@L e@L)
 * into *out.
 * Per-layer overrides are written to overrides[0..overrides_cap) and out->overrides points
 * there (NULL when there are none), so `overrides` must outlive the use of *out. When the spec
 * has more than overrides_cap overrides, returns OTTKV_ERR_OVERFLOW with out->n_overrides set
 * to the number needed (call again with a larger array).
 */
ottkv_status ottkv_cache_config_from_spec(const char *spec, ottkv_cache_config *out,
                                          ottkv_layer_override *overrides, size_t overrides_cap);

/* ---- Cache ------------------------------------------------------------------------------ */

/*
 * Creates an empty cache. The config (and its overrides array) is copied: it may be freed
 * afterwards. Window and pools are allocated now; quantized storage grows per flush (reserved
 * by each append before it changes anything). OTTKV_ERR_ALLOC when what is allocated now
 * exceeds the machine's memory or cannot be had.
 */
ottkv_status ottkv_cache_create(const ottkv_cache_config *config, const ottkv_cache_shape *shape,
                                ottkv_cache **out);

/*
 * Frees the cache and every ggml op made for it (see ottkv_ggml_attention). free(NULL) is
 * OTTKV_OK, as with free(); a handle freed before returns OTTKV_ERR_HANDLE. A call running
 * on another thread at the same time finishes safely on the old state.
 */
ottkv_status ottkv_cache_free(ottkv_cache *cache);

/* Drops all tokens of all layers (window and pools stay allocated). */
ottkv_status ottkv_cache_reset(ottkv_cache *cache);

/* Tokens held by `layer`. */
ottkv_status ottkv_cache_len(ottkv_cache *cache, uint32_t layer, uint64_t *out_len);

/* Bytes allocated, by segment. */
ottkv_status ottkv_cache_memory(ottkv_cache *cache, ottkv_memory_stats *out);

/*
 * Layouts (row-major, f32, keys and queries after RoPE):
 *   q, out: [n_tokens][n_head][head_dim]     k, v: [n_tokens][n_head_kv][head_dim]
 * n_head must be a positive multiple of n_head_kv (query head h reads kv head
 * h / (n_head / n_head_kv), as in GQA). Query token i sees the cache up to and including its
 * own position (causal). scale is usually 1/sqrt(head_dim).
 */

/*
 * The recommended path: appends n_tokens new tokens to `layer` and computes their attention,
 * splitting the batch at the cache's flush points itself, so the result equals feeding the
 * tokens one at a time (to float rounding; in practice bit-identical). Everything is checked
 * before the cache changes: on error nothing was appended. n_threads: threads used for the
 * attention (0 = one per available CPU; at most one per available CPU); they are started and
 * joined inside the call.
 */
ottkv_status ottkv_cache_forward(ottkv_cache *cache, uint32_t layer, size_t n_tokens,
                                 uint32_t n_head, float scale, const float *q, size_t q_len,
                                 const float *k, size_t k_len, const float *v, size_t v_len,
                                 float *out, size_t out_len, uint32_t n_threads);

/*
 * Low-level path: how n_tokens new tokens of `layer` must be split so that each sub-batch can
 * be appended, then attended, with the cache state a one-token-at-a-time decode would see.
 * Writes the first token index of each sub-batch to starts[] (sub-batch i is
 * [starts[i], starts[i+1]), the last one ends at n_tokens) and their number to *n_sub
 * (0 when n_tokens is 0). OTTKV_ERR_OVERFLOW (with *n_sub set) when cap is too small;
 * cap = n_tokens / group + 2 always suffices. OTTKV_ERR_OVERFLOW (*n_sub untouched) when
 * n_tokens exceeds the room left in the layer (max_tokens minus its length).
 */
ottkv_status ottkv_cache_plan(ottkv_cache *cache, uint32_t layer, size_t n_tokens, size_t *starts,
                              size_t cap, size_t *n_sub);

/*
 * Low-level path: appends n_tokens tokens to `layer` (flushing as they come). Nothing changes
 * on error.
 */
ottkv_status ottkv_cache_append(ottkv_cache *cache, uint32_t layer, size_t n_tokens,
                                const float *k, size_t k_len, const float *v, size_t v_len);

/*
 * Low-level path: attention of the LAST n_tokens appended to `layer` (one sub-batch of
 * ottkv_cache_plan, just appended) for the flattened (token, head) rows
 * [row_begin, row_end) of q ([n_tokens][n_head][head_dim]); writes
 * out[(row_end - row_begin) * head_dim]. OTTKV_ERR_SUBBATCH when those tokens straddle a
 * flush. Takes the handle's lock shared: disjoint row ranges may be computed from several
 * threads at once.
 */
ottkv_status ottkv_cache_attend(ottkv_cache *cache, uint32_t layer, size_t n_tokens,
                                uint32_t n_head, float scale, const float *q, size_t q_len,
                                size_t row_begin, size_t row_end, float *out, size_t out_len);

/* ---- ggml ------------------------------------------------------------------------------- */

struct ggml_context;
struct ggml_tensor;

/*
 * Puts the cache write + attention of `layer` into a ggml graph (ggml OTTKV_GGML_VERSION, CPU
 * backend; the ggml in the process is checked at run time, OTTKV_ERR_VERSION otherwise).
 *
 *   q: [head_dim, n_head, n_tokens]     (ggml ne order: ne[0] = head_dim, innermost)
 *   k, v: [head_dim, n_head_kv, n_tokens]
 *   f32, contiguous, same n_tokens (>= 1), head_dim and n_head_kv equal to the cache's,
 *   n_head a multiple of n_head_kv, in host memory. Returns a new f32 tensor
 *   [head_dim, n_head, n_tokens] of `ctx`; NULL with ottkv_last_error() on a bad call
 *   (including a ctx without room for two more tensors: ggml would abort).
 *
 * Computing the returned tensor appends k/v to the cache and computes the same attention as
 * ottkv_cache_forward, for ANY n_tokens: it is two custom ops. The first runs on ggml's thread
 * 0 alone: it appends the tokens; when the batch straddles flush points it also computes the
 * attention of every sub-batch but the last one (single-threaded) into a side buffer. The
 * second runs on all of ggml's threads, each on its own rows: it attends the last sub-batch
 * and copies the side buffer. Decode (1 token) and batches inside one group are fully
 * parallel; long prefills are partly single-threaded.
 *
 * Each computation of the graph appends again (compute it once per batch). Errors during
 * compute cannot be returned through ggml: the op fills its output with NaN and records the
 * first error, which ottkv_ggml_check() returns.
 *
 * Lifetime: the op objects live in the cache handle, one per layer; the next
 * ottkv_ggml_attention call for the same (cache, layer) replaces them, and ottkv_cache_free
 * drops them all. Build, compute, then build the next graph. Computing a graph whose op was
 * replaced or whose cache was freed does not crash: the output is NaN.
 */
struct ggml_tensor *ottkv_ggml_attention(ottkv_cache *cache, struct ggml_context *ctx,
                                         uint32_t layer, struct ggml_tensor *q,
                                         struct ggml_tensor *k, struct ggml_tensor *v,
                                         float scale);

/*
 * The first error a ggml op of this cache recorded during compute since the last check
 * (OTTKV_OK when none), and clears it. Call it after each graph compute.
 */
ottkv_status ottkv_ggml_check(ottkv_cache *cache);

#ifdef __cplusplus
}
#endif

#endif /* OTTKV_H */
