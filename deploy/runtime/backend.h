/* The model backend interface: what the greedy loop (translate.c) needs from an encoder and a one-step decoder.
   The backend owns the decoder's carried state (caches or recurrent states) and the per-sentence inputs
   (docs/CONTRACTS.md); the loop hands it float32 embeddings and gets argmax tokens back. */
#ifndef RKT_BACKEND_H
#define RKT_BACKEND_H

#include <stdint.h>

typedef enum { RKT_RECURRENT = 1, RKT_TRANSFORMER = 2 } rkt_decoder_kind;

/* The static shapes, read from the models' inputs and outputs. */
typedef struct {
    rkt_decoder_kind kind;
    uint32_t src_len;   /* S */
    uint32_t dim;       /* D */
    uint32_t vocab;     /* V */
    uint32_t layers;    /* L */
    uint32_t heads;     /* H */
    uint32_t cache_len; /* Tc (transformer: self_mask's length; recurrent: 0, the model does not fix it) */
} rkt_dims;

/* Time inside the runtime's own calls since load (zeros for a backend without one). */
typedef struct {
    double encoder_run_ms, decoder_run_ms; /* wall clock around rknn_run */
    double decoder_perf_us;                /* RKNN_QUERY_PERF_RUN's run_duration summed; < 0 when not measured */
    double probe_ms;                       /* the RKNN_QUERY_PERF_RUN calls themselves */
} rkt_runtime_time;

typedef struct rkt_backend {
    const char *name;
    /* Loads both models; NULL (after printing why) on failure. measure: query RKNN_QUERY_PERF_RUN after each run. */
    void *(*load)(const char *encoder_path, const char *decoder_path, int measure);
    /* Reads the models' input/output attributes, checks them against CONTRACTS.md and fills dims. */
    int (*query)(void *ctx, rkt_dims *dims);
    /* Runs the encoder on one source (src_embeds [S*D], src_mask [S]: 1 real, 0 padding) and sets the decoder's
       per-sentence inputs and initial state. */
    int (*start_sentence)(void *ctx, const float *src_embeds, const float *src_mask);
    /* Decoder step `step` (0 first) on tok_embeds [D]; *token = the argmax of its logits. */
    int (*step)(void *ctx, uint32_t step, const float *tok_embeds, uint32_t *token);
    void (*runtime_time)(void *ctx, rkt_runtime_time *t);
    void (*release)(void *ctx);
} rkt_backend;

/* Replays a recording (backend_replay.c). */
extern const rkt_backend rkt_replay_backend;
/* The RKNN C API on the board's NPU (backend_rknn.c), librknnrt.so loaded at run time. */
extern const rkt_backend rkt_rknn_backend;

#endif
