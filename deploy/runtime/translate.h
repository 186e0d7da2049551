/* The greedy decode loop, written once against the backend interface (backend.h). */
#ifndef RKT_TRANSLATE_H
#define RKT_TRANSLATE_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "embed.h"
#include "util.h"

typedef struct {
    uint32_t direction;  /* 0 = zh-en, 1 = en-zh */
    uint32_t max_tokens; /* stop after this many output tokens */
    uint32_t pad, bos, eos;
} rkt_decode_params;

/* One sentence's wall clock, summed over its calls. */
typedef struct {
    double encoder_ms; /* start_sentence: source in, encoder run, per-sentence decoder inputs set */
    double decoder_ms; /* every step: embedding, conversion, run, argmax, carried state */
    uint32_t steps;
} rkt_timing;

/* Checks that the backend's shapes, the embedding tables and the parameters agree; prints what does not. */
int rkt_check_setup(const rkt_dims *dims, const rkt_embed *emb, const rkt_decode_params *p);

/* Source student ids -> output student ids (without bos/eos), greedy: start from bos at position 0, feed each
   argmax back, stop at eos or after max_tokens tokens. */
int rkt_translate_ids(const rkt_backend *be, void *ctx, const rkt_dims *dims, const rkt_embed *emb,
                      const rkt_decode_params *p, const uint32_t *src, size_t n_src, rkt_u32vec *out,
                      rkt_timing *timing);

#endif
