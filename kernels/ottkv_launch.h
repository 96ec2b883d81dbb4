/*
 * ottkv_launch.h — arguments of the CUDA kernels, passed by value as one struct per kernel.
 *
 * Read by the kernels and by bindgen (build.rs, feature `cuda`), so the host and the device
 * agree on every field by construction. Device buffers are passed as 64-bit addresses.
 *
 * Cache buffers of one layer (shapes in elements; S = sequences, H = kv heads):
 *   key_codes   uint32 [S][H][max_groups][head_dim][key_words]      channel-major, see format
 *   key_params  qparams[S][H][max_groups][head_dim]
 *   val_codes   uint32 [S][H][max_groups * G][value_words]
 *   val_params  qparams[S][H][max_groups * G][head_dim / value_group]
 *   masks       uint32 [S][H][max_groups][mask_words]   bit set = placeholder slot
 *   win_k/v     f16    [S][H][win_cap][head_dim]        ring: window token j at (win_start+j) % win_cap
 *   sink_k/v    f16    [S][H][sink_cap][head_dim]
 *   pool_k/v    f16    [S][H][pool_cap][head_dim]
 *   extra_k/v   f16    [S][H][extra_cap][head_dim]
 *   pool_len, extra_len  uint32 [S][H]
 * (f16 as IEEE binary16 bit patterns; caps of 0 are passed as 1 so no buffer is empty.)
 */
#ifndef OTTKV_LAUNCH_H
#define OTTKV_LAUNCH_H

#include <stdint.h>
#include "ottkv_format.h"

/* Query rows one attention block handles (query heads of one kv head). */
#define OTTKV_ATTEND_ROWS 4
/* Threads of an attention block and most tokens of one split (scores live in shared memory). */
#define OTTKV_ATTEND_THREADS 128
#define OTTKV_ATTEND_MAX_SPLIT 1024
/* Largest head_dim the attention kernels take (channels per thread are held in registers). */
#define OTTKV_ATTEND_MAX_HEAD_DIM 1024
/* Threads of a flush block (one block per kv head). */
#define OTTKV_FLUSH_THREADS 256
/* Score kinds of the flush (cache::Score). */
#define OTTKV_SCORE_L1 0
#define OTTKV_SCORE_L2 1

typedef struct ottkv_cache_ptrs {
    uint64_t key_codes, key_params, val_codes, val_params, masks;
    uint64_t win_k, win_v, sink_k, sink_v, pool_k, pool_v, extra_k, extra_v;
    uint64_t pool_len, extra_len;
} ottkv_cache_ptrs;

typedef struct ottkv_cache_dims {
    ottkv_geometry geo;
    uint32_t n_head_kv;
    uint32_t key_words;   /* words of one key channel of one group */
    uint32_t value_words; /* words of one value row */
    uint32_t mask_words;  /* words of one group's mask */
    uint32_t max_groups;
    uint32_t win_cap, sink_cap, pool_cap, extra_cap; /* allocated rows (each >= 1) */
} ottkv_cache_dims;

/* Decode / small-batch attention over the mixed cache. Grid: (n_split, H * row_blocks,
 * S * n_q). Query token i (0-based in this batch) sees every quantized slot, the sinks and
 * pools, and window tokens 0 .. win_len - n_q + i (causal within the batch). */
typedef struct ottkv_attend_args {
    ottkv_cache_ptrs c;
    ottkv_cache_dims d;
    uint64_t q;       /* f32 [S][n_q][n_head][head_dim] */
    uint64_t part_o;  /* f32 [S][n_q][n_head][n_split][head_dim] */
    uint64_t part_ml; /* f32 [S][n_q][n_head][n_split][2]: running max, sum of exp */
    uint64_t out;     /* f32 [S][n_q][n_head][head_dim] */
    uint32_t n_seq, n_q, n_head;
    uint32_t n_groups;  /* quantized groups now (slots n_groups * G) */
    uint32_t sink_len;  /* sink rows now */
    uint32_t win_start, win_len;
    uint32_t n_split, split_len; /* split_len: a multiple of 16 tokens */
    float scale;
} ottkv_attend_args;

/* Plain f16 attention (the speed reference). Grid as ottkv_attend_args. */
typedef struct ottkv_f16_attend_args {
    uint64_t k, v;    /* f16 [S][H][cap][head_dim] */
    uint64_t q, part_o, part_ml, out; /* as ottkv_attend_args */
    uint32_t n_seq, n_q, n_head, n_head_kv, head_dim;
    uint32_t cap, len; /* rows allocated and held per (sequence, kv head); causal as above */
    uint32_t n_split, split_len;
    float scale;
} ottkv_f16_attend_args;

/* Merge of the per-split partial results (flash-decoding's second step). Grid: (rows). */
typedef struct ottkv_merge_args {
    uint64_t part_o, part_ml, out; /* as ottkv_attend_args; rows = S * n_q * n_head */
    uint32_t n_rows, n_split, head_dim;
} ottkv_merge_args;

/* Group flush of one layer, one sequence. Grid: (H). The oldest G window tokens become
 * quantized group `group`; scratch buffers are per kv head. */
typedef struct ottkv_flush_args {
    ottkv_cache_ptrs c;
    ottkv_cache_dims d;
    uint64_t pool_slots;  /* ottkv_outlier_slot [H][pool_cap] */
    uint64_t extra_slots; /* ottkv_outlier_slot [H][extra_cap] */
    uint64_t stopped_at;  /* uint32 [H], OTTKV_NO_GROUP while tracing runs */
    uint64_t scratch_kv;  /* f32 [H][2][G][head_dim] the group's K then V */
    uint64_t scratch_cand; /* f32 [H][pool_cap + G][head_dim] candidate rows, unrotated */
    uint64_t scratch_score; /* f32 [H][pool_cap + G] */
    uint64_t scratch_rank;  /* uint32 [H][pool_cap + G] */
    uint64_t scratch_sel;   /* uint32 [H][G] 1 = slot leaves for a sink or the pool */
    uint64_t scratch_pool_slots; /* ottkv_outlier_slot [H][pool_cap] the new pool, staged */
    uint64_t scratch_pool_kv;    /* f16 [H][2][pool_cap][head_dim] its K then V rows */
    uint32_t group;     /* index of the group being written */
    uint32_t win_start; /* ring index of the oldest window token */
    uint32_t sink_len;  /* sink rows before this flush */
    uint32_t n_sink;    /* leading slots of this group that become sinks */
    uint32_t pool_cap, extra_cap; /* this layer's capacities (0 = no tracing) */
    uint32_t score;     /* OTTKV_SCORE_* */
    uint32_t rot;       /* Hadamard block of stored rows, 0 = none */
} ottkv_flush_args;

#endif /* OTTKV_LAUNCH_H */
