#include "translate.h"

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

static int decode_loop(const rkt_backend *be, void *ctx, const rkt_embed *emb, const rkt_decode_params *p,
                       float *tok, rkt_u32vec *out, rkt_timing *timing)
{
    uint32_t token = p->bos, step;
    for (step = 0; step < p->max_tokens; step++) {
        double start = rkt_now_ms();
        int rc;
        rkt_embed_row(emb, token, p->direction, step, tok);
        rc = be->step(ctx, step, tok, &token);
        timing->decoder_ms += rkt_now_ms() - start;
        timing->steps++;
        if (rc)
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
    float *src_embeds, *src_mask, *tok;
    uint32_t i;
    double start;
    int rc = -1;
    memset(timing, 0, sizeof *timing);
    if (n_src == 0)
        return rkt_fail("input", "no tokens to translate");
    if (n_src > d->src_len)
        return rkt_fail("input", "%zu tokens, the encoder takes at most S = %u; shorten the text or split it into "
                        "sentences", n_src, d->src_len);
    for (i = 0; i < n_src; i++)
        if (src[i] >= d->vocab)
            return rkt_fail("input", "token %u has id %u, not below V = %u", i, src[i], d->vocab);
    src_embeds = rkt_calloc((size_t)d->src_len * d->dim, sizeof(float), "buffers");
    src_mask = rkt_calloc(d->src_len, sizeof(float), "buffers");
    tok = rkt_calloc(d->dim, sizeof(float), "buffers");
    if (src_embeds && src_mask && tok) {
        /* Padding rows hold the pad token and are masked out (0 in the 0/1 mask). */
        for (i = 0; i < d->src_len; i++) {
            rkt_embed_row(emb, i < n_src ? src[i] : p->pad, p->direction, i, src_embeds + (size_t)i * d->dim);
            src_mask[i] = i < n_src ? 1.0f : 0.0f;
        }
        start = rkt_now_ms();
        rc = be->start_sentence(ctx, src_embeds, src_mask);
        timing->encoder_ms = rkt_now_ms() - start;
        if (rc == 0)
            rc = decode_loop(be, ctx, emb, p, tok, out, timing);
    }
    free(src_embeds);
    free(src_mask);
    free(tok);
    return rc;
}
