/* The replay backend: a recorded greedy decode (recording.h) standing in for the NPU, so the loop, the embedding
   sums, padding and the source mask are testable on any host.

   It binds the recording's tensor lists through the contract like the rknn backend binds a model's, checks every
   input the loop gives it (src_embeds, src_mask, each step's tok_embeds) against the recording (relative 1e-6) and
   answers each step with the argmax of the recorded logits. The carried state (caches, recurrent states) never
   reaches a backend's caller, so it is not replayed here: test/fake_rknnrt.c checks it through the rknn backend. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "contract.h"
#include "recording.h"
#include "tensor.h"
#include "util.h"

typedef struct {
    rkt_recording rec;
    rkt_contract contract;
    uint32_t step;
} replay;

static void replay_release(void *ctx)
{
    replay *r = ctx;
    if (!r)
        return;
    rkt_recording_free(&r->rec);
    free(r);
}

static void *replay_load(const char *encoder_path, const char *decoder_path, int measure)
{
    replay *r;
    (void)measure;
    if (strcmp(decoder_path, "-") != 0) {
        rkt_fail(decoder_path, "the replay backend reads its recording from ENCODER; pass - as DECODER");
        return NULL;
    }
    if (!(r = rkt_calloc(1, sizeof *r, encoder_path)))
        return NULL;
    if (rkt_recording_load(encoder_path, &r->rec)) {
        free(r);
        return NULL;
    }
    return r;
}

static int replay_query(void *ctx, rkt_dims *dims)
{
    replay *r = ctx;
    rkt_model_shapes enc = rkt_recording_model(&r->rec, 0), dec = rkt_recording_model(&r->rec, 1);
    if (rkt_contract_bind(&enc, &dec, &r->contract))
        return -1;
    *dims = r->contract.dims;
    return 0;
}

static int same(const replay *r, const char *what, const float *got, const float *want, uint64_t n)
{
    uint64_t i;
    for (i = 0; i < n; i++)
        if (!(fabsf(got[i] - want[i]) <= 1e-6f * fmaxf(1.0f, fabsf(want[i]))))
            return rkt_fail(r->rec.path, "step %u: %s[%llu] is %g, the recording has %g", r->step, what,
                            (unsigned long long)i, (double)got[i], (double)want[i]);
    return 0;
}

static int replay_start_sentence(void *ctx, const float *src_embeds, const float *src_mask)
{
    replay *r = ctx;
    const rkt_contract *c = &r->contract;
    r->step = 0;
    return same(r, "encoder src_embeds", src_embeds, rkt_recording_tensor(&r->rec, RKT_ENC_IN, c->enc_src_embeds, 0),
                (uint64_t)c->dims.src_len * c->dims.dim) ||
           same(r, "encoder src_mask", src_mask, rkt_recording_tensor(&r->rec, RKT_ENC_IN, c->enc_src_mask, 0),
                c->dims.src_len);
}

static int replay_step(void *ctx, uint32_t step, const float *tok_embeds, uint32_t *token)
{
    replay *r = ctx;
    const rkt_contract *c = &r->contract;
    rkt_tensor logits;
    r->step = step;
    if (step >= r->rec.n_steps)
        return rkt_fail(r->rec.path, "the loop asked for step %u, the recording has %u", step, r->rec.n_steps);
    if (same(r, "tok_embeds", tok_embeds, rkt_recording_tensor(&r->rec, RKT_DEC_IN, c->tok_embeds, step),
             c->dims.dim))
        return -1;
    memset(&logits, 0, sizeof logits);
    logits.data = (void *)rkt_recording_tensor(&r->rec, RKT_DEC_OUT, c->logits, step); /* only read */
    logits.dtype = RKT_F32;
    if (rkt_tensor_argmax(&logits, c->dims.vocab, token))
        return rkt_fail(r->rec.path, "step %u: a recorded logit is NaN", step);
    return 0;
}

static void replay_runtime_time(void *ctx, rkt_runtime_time *t)
{
    (void)ctx;
    memset(t, 0, sizeof *t);
    t->decoder_perf_us = -1;
}

const rkt_backend rkt_replay_backend = {"replay",          replay_load,         replay_query, replay_start_sentence,
                                        replay_step,       replay_runtime_time, replay_release};
