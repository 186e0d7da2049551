#include "translate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int rkt_check_setup(const rkt_dims *d, const rkt_embed *e, const rkt_decode_params *p)
{
    if (e->vocab != d->vocab || e->dim != d->dim)
        return rkt_fail("embed.bin", "token table is [%u, %u], the models have V = %u, D = %u", e->vocab, e->dim,
                        d->vocab, d->dim);
    if (p->direction >= e->n_directions)
        return rkt_fail("embed.bin", "direction %u has no row (%u directions)", p->direction, e->n_directions);
    if (e->max_positions < d->src_len)
        return rkt_fail("embed.bin", "%u positions, the encoder needs S = %u", e->max_positions, d->src_len);
    if (p->max_tokens == 0 || p->max_tokens > e->max_positions)
        return rkt_fail("max_tokens", "%u, must be between 1 and the %u positions of embed.bin", p->max_tokens,
                        e->max_positions);
    if (d->kind == RKT_TRANSFORMER && p->max_tokens > d->cache_len)
        return rkt_fail("max_tokens", "%u, but the decoder's cache holds Tc = %u positions", p->max_tokens,
                        d->cache_len);
    if (p->pad >= d->vocab || p->bos >= d->vocab || p->eos >= d->vocab)
        return rkt_fail("tokenizer", "pad/bos/eos %u/%u/%u are not below V = %u", p->pad, p->bos, p->eos, d->vocab);
    return 0;
}

/* First index of the largest logit (torch.argmax picks the first of equal maxima too). */
static int argmax(const float *logits, uint32_t n, uint32_t step, uint32_t *best)
{
    uint32_t i;
    *best = 0;
    for (i = 0; i < n; i++) {
        if (isnan(logits[i]))
            return rkt_fail("decoder", "step %u: logit %u is NaN", step, i);
        if (logits[i] > logits[*best])
            *best = i;
    }
    return 0;
}

typedef struct {
    float *src_embeds, *src_mask, *enc_out, *tok, *logits, *cache_mask;
    float *state[2], *cache_k[2], *cache_v[2]; /* [0] is fed to the step, [1] receives its output */
} buffers;

static void free_buffers(buffers *b)
{
    int i;
    free(b->src_embeds);
    free(b->src_mask);
    free(b->enc_out);
    free(b->tok);
    free(b->logits);
    free(b->cache_mask);
    for (i = 0; i < 2; i++) {
        free(b->state[i]);
        free(b->cache_k[i]);
        free(b->cache_v[i]);
    }
}

static int alloc_buffers(buffers *b, const rkt_dims *d)
{
    size_t sd = (size_t)d->src_len * d->dim, i;
    memset(b, 0, sizeof *b);
    if (!(b->src_embeds = rkt_calloc(sd, sizeof(float), "buffers")) ||
        !(b->src_mask = rkt_calloc(d->src_len, sizeof(float), "buffers")) ||
        !(b->enc_out = rkt_calloc(sd, sizeof(float), "buffers")) ||
        !(b->tok = rkt_calloc(d->dim, sizeof(float), "buffers")) ||
        !(b->logits = rkt_calloc(d->vocab, sizeof(float), "buffers")))
        return -1;
    for (i = 0; i < 2; i++) {
        /* Zeros: the initial state, and the initial cache whose positions the mask hides anyway. */
        if (d->kind == RKT_RECURRENT) {
            if (!(b->state[i] = rkt_calloc((size_t)d->layers * d->dim, sizeof(float), "buffers")))
                return -1;
        } else if (!(b->cache_k[i] = rkt_calloc((size_t)d->layers * d->cache_len * d->dim, sizeof(float), "buffers")) ||
                   !(b->cache_v[i] = rkt_calloc((size_t)d->layers * d->cache_len * d->dim, sizeof(float), "buffers"))) {
            return -1;
        }
    }
    if (d->kind == RKT_TRANSFORMER && !(b->cache_mask = rkt_calloc(d->cache_len, sizeof(float), "buffers")))
        return -1;
    return 0;
}

static void swap(float **pair)
{
    float *t = pair[0];
    pair[0] = pair[1];
    pair[1] = t;
}

static int decode_loop(const rkt_backend *be, void *ctx, const rkt_dims *d, const rkt_embed *emb,
                       const rkt_decode_params *p, buffers *b, rkt_u32vec *out, rkt_timing *timing)
{
    uint32_t token = p->bos, step, j;
    for (step = 0; step < p->max_tokens; step++) {
        rkt_step_io io;
        double start;
        rkt_embed_row(emb, token, p->direction, step, b->tok);
        memset(&io, 0, sizeof io);
        io.tok_embeds = b->tok;
        io.enc_out = b->enc_out;
        io.src_mask_bias = b->src_mask;
        io.logits = b->logits;
        if (d->kind == RKT_RECURRENT) {
            io.state = b->state[0];
            io.new_state = b->state[1];
        } else {
            /* The step shifts its cache one position left and appends its own key/value, so after step t the
               last t+1 positions are real: unmask exactly those (CONTRACTS.md). */
            for (j = 0; j < d->cache_len; j++)
                b->cache_mask[j] = j >= d->cache_len - (step + 1) ? 0.0f : RKT_MASK_BIAS;
            io.cache_k = b->cache_k[0];
            io.cache_v = b->cache_v[0];
            io.cache_mask_bias = b->cache_mask;
            io.new_cache_k = b->cache_k[1];
            io.new_cache_v = b->cache_v[1];
        }
        start = rkt_now_ms();
        if (be->run_decoder(ctx, &io))
            return -1;
        timing->decoder_ms += rkt_now_ms() - start;
        timing->steps++;
        swap(b->state);
        swap(b->cache_k);
        swap(b->cache_v);
        if (argmax(b->logits, d->vocab, step, &token))
            return -1;
        if (token == p->eos)
            break;
        if (rkt_u32vec_push(out, token))
            return -1;
    }
    return 0;
}

int rkt_translate_ids(const rkt_backend *be, void *ctx, const rkt_dims *d, const rkt_embed *emb,
                      const rkt_decode_params *p, const uint32_t *src, size_t n_src, rkt_u32vec *out,
                      rkt_timing *timing)
{
    buffers b;
    uint32_t i;
    double start;
    int rc;
    memset(timing, 0, sizeof *timing);
    if (n_src == 0)
        return rkt_fail("input", "no tokens to translate");
    if (n_src > d->src_len)
        return rkt_fail("input", "%zu tokens, the encoder takes at most S = %u; shorten the text or split it into "
                        "sentences", n_src, d->src_len);
    for (i = 0; i < n_src; i++)
        if (src[i] >= d->vocab)
            return rkt_fail("input", "token %u has id %u, not below V = %u", i, src[i], d->vocab);
    if (alloc_buffers(&b, d)) {
        free_buffers(&b);
        return -1;
    }
    /* Padding rows hold the pad token and are masked with a finite bias (the NPU clamps -inf). */
    for (i = 0; i < d->src_len; i++) {
        rkt_embed_row(emb, i < n_src ? src[i] : p->pad, p->direction, i, b.src_embeds + (size_t)i * d->dim);
        b.src_mask[i] = i < n_src ? 0.0f : RKT_MASK_BIAS;
    }
    start = rkt_now_ms();
    rc = be->run_encoder(ctx, b.src_embeds, b.src_mask, b.enc_out);
    timing->encoder_ms = rkt_now_ms() - start;
    if (rc == 0)
        rc = decode_loop(be, ctx, d, emb, p, &b, out, timing);
    free_buffers(&b);
    return rc;
}
