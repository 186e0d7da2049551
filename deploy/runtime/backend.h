/* The model backend interface: what the greedy loop (translate.c) needs from an encoder and a one-step decoder.
   Shapes and names follow docs/CONTRACTS.md; all tensors are float32, row-major, in ONNX (NCHW) order. */
#ifndef RKT_BACKEND_H
#define RKT_BACKEND_H

#include <stdint.h>

typedef enum { RKT_RECURRENT = 1, RKT_TRANSFORMER = 2 } rkt_decoder_kind;

/* The static shapes, read from the models' inputs and outputs. */
typedef struct {
    rkt_decoder_kind kind;
    uint32_t src_len;    /* S */
    uint32_t dim;        /* D */
    uint32_t vocab;      /* V */
    uint32_t layers;     /* L */
    uint32_t heads;      /* H (transformer) */
    uint32_t cache_len;  /* Tc (transformer: the cache length; recurrent: 0, the model does not fix it) */
} rkt_dims;

/* One decoder step. Recurrent: state [L,1,D] -> new_state. Transformer: cache_k/cache_v [L,H,Tc,D/H] and
   cache_mask_bias [1,Tc] -> new_cache_k/new_cache_v. Unused pointers are NULL. */
typedef struct {
    const float *tok_embeds;    /* [1,1,D] */
    const float *enc_out;       /* [1,S,D] */
    const float *src_mask_bias; /* [1,S] */
    const float *state, *cache_k, *cache_v, *cache_mask_bias;
    float *logits; /* [1,V] */
    float *new_state, *new_cache_k, *new_cache_v;
} rkt_step_io;

typedef struct rkt_backend {
    const char *name;
    /* Loads both models; NULL (after printing why) on failure. */
    void *(*load)(const char *encoder_path, const char *decoder_path);
    /* Reads the models' input/output attributes, checks them against CONTRACTS.md and fills dims. */
    int (*query)(void *ctx, rkt_dims *dims);
    int (*run_encoder)(void *ctx, const float *src_embeds, const float *src_mask_bias, float *enc_out);
    int (*run_decoder)(void *ctx, const rkt_step_io *io);
    void (*release)(void *ctx);
} rkt_backend;

/* Replays a recording (backend_replay.c); always built. */
extern const rkt_backend rkt_replay_backend;
#ifdef RKT_HAVE_RKNN
/* The RKNN C API on the board's NPU (backend_rknn.c); built with an RKNN SDK. */
extern const rkt_backend rkt_rknn_backend;
#endif

#endif
