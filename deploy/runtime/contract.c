#include "contract.h"

#include <stdio.h>
#include <string.h>

#include "util.h"

static const char *kind_name(int input)
{
    return input ? "input" : "output";
}

void rkt_shape_str(char *buf, size_t size, const uint32_t *dims, uint32_t rank)
{
    uint32_t i;
    size_t used = (size_t)snprintf(buf, size, "[");
    for (i = 0; i < rank && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ", %u" : "%u", dims[i]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
}

/* The index of the tensor named `name`, or -1 (printing why unless quiet). */
static int64_t find(const rkt_model_shapes *m, int input, const char *name, int quiet)
{
    const rkt_shape *list = input ? m->in : m->out;
    uint32_t i, n = input ? m->n_in : m->n_out;
    for (i = 0; i < n; i++)
        if (strcmp(list[i].name, name) == 0)
            return i;
    if (!quiet)
        rkt_fail(m->path, "no %s named '%s' (docs/CONTRACTS.md names; was the ONNX exported by deploy/export_onnx.py?)",
                 kind_name(input), name);
    return -1;
}

/* A tensor the sizes are read from: the rank given and no dimension 0, checked before any dims[] is used. */
static const rkt_shape *anchor(const rkt_model_shapes *m, int input, const char *name, uint32_t rank,
                               const char *form)
{
    int64_t index = find(m, input, name, 0);
    const rkt_shape *s;
    uint32_t i = 0;
    char got[200];
    if (index < 0)
        return NULL;
    s = &(input ? m->in : m->out)[index];
    while (s->rank == rank && i < rank && s->dims[i])
        i++;
    if (s->rank != rank || i < rank) {
        rkt_shape_str(got, sizeof got, s->dims, s->rank);
        rkt_fail(m->path, "%s '%s' has shape %s; expected %s, no dimension 0", kind_name(input), name, got, form);
        return NULL;
    }
    return s;
}

/* The tensor `name` (a printf format with one %u, the layer) exists with exactly this shape; *index is its place. */
static int expect(const rkt_model_shapes *m, int input, const char *format, uint32_t layer, const uint32_t *want,
                  uint32_t rank, uint32_t *index)
{
    char name[64], got[200], wanted[200];
    const rkt_shape *s;
    int64_t i;
    snprintf(name, sizeof name, format, layer);
    if ((i = find(m, input, name, 0)) < 0)
        return -1;
    s = &(input ? m->in : m->out)[i];
    if (s->rank != rank || memcmp(s->dims, want, rank * sizeof *want) != 0) {
        rkt_shape_str(got, sizeof got, s->dims, s->rank);
        rkt_shape_str(wanted, sizeof wanted, want, rank);
        return rkt_fail(m->path, "%s '%s' has shape %s, expected %s", kind_name(input), name, got, wanted);
    }
    *index = (uint32_t)i;
    return 0;
}

static int bind_encoder(const rkt_model_shapes *m, rkt_contract *c, uint32_t hd)
{
    const rkt_dims *d = &c->dims;
    const uint32_t embeds[] = {1, d->src_len, d->dim}, mask[] = {1, d->src_len}, kv[] = {1, d->heads, d->src_len, hd};
    uint32_t l;
    if (expect(m, 1, "src_embeds", 0, embeds, 3, &c->enc_src_embeds) ||
        expect(m, 1, "src_mask", 0, mask, 2, &c->enc_src_mask))
        return -1;
    for (l = 0; l < d->layers; l++)
        if (expect(m, 0, "cross_k_%u", l, kv, 4, &c->enc_cross[2 * l]) ||
            expect(m, 0, "cross_v_%u", l, kv, 4, &c->enc_cross[2 * l + 1]))
            return -1;
    return 0;
}

static int bind_decoder(const rkt_model_shapes *m, rkt_contract *c, uint32_t hd)
{
    const rkt_dims *d = &c->dims;
    const uint32_t tok[] = {1, 1, d->dim}, mask[] = {1, d->src_len}, kv[] = {1, d->heads, d->src_len, hd},
                   logits[] = {1, d->vocab}, self_mask[] = {1, d->cache_len},
                   cache[] = {1, d->heads, d->cache_len - 1, hd}, step[] = {1, d->heads, 1, hd}, state[] = {1, d->dim};
    uint32_t l;
    if (expect(m, 1, "tok_embeds", 0, tok, 3, &c->tok_embeds) || expect(m, 1, "src_mask", 0, mask, 2, &c->src_mask) ||
        expect(m, 0, "logits", 0, logits, 2, &c->logits))
        return -1;
    if (d->kind == RKT_TRANSFORMER && expect(m, 1, "self_mask", 0, self_mask, 2, &c->self_mask))
        return -1;
    for (l = 0; l < d->layers; l++) {
        if (expect(m, 1, "cross_k_%u", l, kv, 4, &c->cross[2 * l]) ||
            expect(m, 1, "cross_v_%u", l, kv, 4, &c->cross[2 * l + 1]))
            return -1;
        if (d->kind == RKT_TRANSFORMER
                ? expect(m, 1, "self_k_%u", l, cache, 4, &c->carried_in[2 * l]) ||
                  expect(m, 1, "self_v_%u", l, cache, 4, &c->carried_in[2 * l + 1]) ||
                  expect(m, 0, "step_k_%u", l, step, 4, &c->carried_out[2 * l]) ||
                  expect(m, 0, "step_v_%u", l, step, 4, &c->carried_out[2 * l + 1])
                : expect(m, 1, "state_%u", l, state, 2, &c->carried_in[l]) ||
                  expect(m, 0, "new_state_%u", l, state, 2, &c->carried_out[l]))
            return -1;
    }
    return 0;
}

int rkt_contract_bind(const rkt_model_shapes *enc, const rkt_model_shapes *dec, rkt_contract *c)
{
    rkt_dims *d = &c->dims;
    const rkt_shape *s;
    uint32_t hd, want_in, want_out;
    memset(c, 0, sizeof *c);
    if (enc->n_in != 2 || enc->n_out < 2 || enc->n_out % 2 || enc->n_out > 2 * RKT_MAX_LAYERS)
        return rkt_fail(enc->path, "%u inputs and %u outputs; an encoder has 2 inputs and 2 outputs per decoder layer "
                        "(1 to %d layers)", enc->n_in, enc->n_out, RKT_MAX_LAYERS);
    d->layers = enc->n_out / 2;
    if (!(s = anchor(enc, 1, "src_embeds", 3, "[1, S, D]")))
        return -1;
    d->src_len = s->dims[1];
    d->dim = s->dims[2];
    if (!(s = anchor(enc, 0, "cross_k_0", 4, "[1, H, S, hd]")))
        return -1;
    d->heads = s->dims[1];
    hd = s->dims[3];
    if ((uint64_t)d->heads * hd != d->dim)
        return rkt_fail(enc->path, "output 'cross_k_0': H = %u heads of hd = %u, H * hd is not D = %u", d->heads, hd,
                        d->dim);
    if (!(s = anchor(dec, 0, "logits", 2, "[1, V]")))
        return -1;
    d->vocab = s->dims[1];
    d->kind = find(dec, 1, "self_mask", 1) >= 0 ? RKT_TRANSFORMER : RKT_RECURRENT;
    if (d->kind == RKT_TRANSFORMER) {
        if (!(s = anchor(dec, 1, "self_mask", 2, "[1, Tc]")))
            return -1;
        if ((d->cache_len = s->dims[1]) < 2)
            return rkt_fail(dec->path, "input 'self_mask' has Tc = %u; the step needs a cache of Tc - 1 >= 1 positions",
                            d->cache_len);
    }
    c->n_carried = d->kind == RKT_TRANSFORMER ? 2 * d->layers : d->layers;
    want_in = 2 + 2 * d->layers + c->n_carried + (d->kind == RKT_TRANSFORMER);
    want_out = 1 + c->n_carried;
    if (dec->n_in != want_in || dec->n_out != want_out)
        return rkt_fail(dec->path, "%u inputs and %u outputs; a %s decoder of %u layers has %u and %u", dec->n_in,
                        dec->n_out, d->kind == RKT_TRANSFORMER ? "transformer" : "recurrent", d->layers, want_in,
                        want_out);
    return bind_encoder(enc, c, hd) || bind_decoder(dec, c, hd);
}
