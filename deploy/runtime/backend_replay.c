/* The replay backend: a recorded run of the encoder and decoder standing in for the NPU, so the greedy loop,
   the embedding sums, padding, masks and the state/cache hand-over are testable on any host.

   It returns the recorded outputs and checks every input the loop gives it against the recording (values
   within a relative 1e-6), so a loop that feeds the wrong token, position, mask or state fails loudly.

   Recording format (little-endian; tests/test_runtime.py writes it):
     magic "RKRPL1\0\0"; u32 kind (1 recurrent, 2 transformer), S, D, V, L, H, Tc, n_steps
       (recurrent: H = Tc = 0; transformer: H divides D, hd = D / H)
     float32 src_embeds[S*D] (expected), src_mask_bias[S] (expected), enc_out[S*D] (returned)
     then per step: tok_embeds[D] (expected); transformer: cache_mask_bias[Tc] (expected); logits[V] (returned);
       recurrent: new_state[L*D] (returned); transformer: new_cache_k[L*H*Tc*hd], new_cache_v[same] (returned)
   The expected state or cache input of step t is what step t-1 returned (zeros at step 0). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "util.h"

enum { HEADER = 40 };

typedef struct {
    const char *path;
    rkt_dims dims;
    uint32_t n_steps, step;
    float *data;
    const float *src_embeds, *src_mask_bias, *enc_out, *steps;
    uint64_t state_len, step_len; /* floats of one state tensor (new_state, or one of the caches); of one step */
    float *zeros;                 /* the expected state before step 0 */
} replay;

/* Saturating arithmetic: a saturated count never equals a real file's size, so it fails the size check. */
static uint64_t sat_mul(uint64_t a, uint64_t b)
{
    return a && b > UINT64_MAX / a ? UINT64_MAX : a * b;
}

static uint64_t sat_add(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static int check_header(replay *r, size_t size, const uint8_t *data)
{
    rkt_dims *d = &r->dims;
    uint64_t n_states, floats;
    uint32_t kind = rkt_le32(data + 8);
    d->src_len = rkt_le32(data + 12);
    d->dim = rkt_le32(data + 16);
    d->vocab = rkt_le32(data + 20);
    d->layers = rkt_le32(data + 24);
    d->heads = rkt_le32(data + 28);
    d->cache_len = rkt_le32(data + 32);
    r->n_steps = rkt_le32(data + 36);
    if (!r->n_steps)
        return rkt_fail(r->path, "the recording has no decoder steps");
    if (kind != RKT_RECURRENT && kind != RKT_TRANSFORMER)
        return rkt_fail(r->path, "decoder kind %u is neither 1 (recurrent) nor 2 (transformer)", kind);
    d->kind = (rkt_decoder_kind)kind;
    if (!d->src_len || !d->dim || !d->vocab || !d->layers)
        return rkt_fail(r->path, "S, D, V and L must be positive (got %u, %u, %u, %u)", d->src_len, d->dim,
                        d->vocab, d->layers);
    if (kind == RKT_RECURRENT ? d->heads || d->cache_len : !d->heads || d->dim % d->heads || !d->cache_len)
        return rkt_fail(r->path, "H = %u, Tc = %u do not fit a %s decoder of width %u", d->heads, d->cache_len,
                        kind == RKT_RECURRENT ? "recurrent" : "transformer", d->dim);
    /* One state tensor: [L,1,D] (recurrent) or one cache [L,H,Tc,hd] = L*Tc*D floats (transformer, two of them). */
    n_states = kind == RKT_TRANSFORMER ? 2 : 1;
    r->state_len = sat_mul((uint64_t)d->layers * d->dim, kind == RKT_TRANSFORMER ? d->cache_len : 1);
    r->step_len = sat_add((uint64_t)d->dim + d->vocab + (kind == RKT_TRANSFORMER ? d->cache_len : 0),
                          sat_mul(n_states, r->state_len));
    floats = sat_add(sat_add(sat_mul(2, (uint64_t)d->src_len * d->dim), d->src_len), sat_mul(r->n_steps, r->step_len));
    if ((size - HEADER) % 4 || floats != (size - HEADER) / 4)
        return rkt_fail(r->path, "%zu bytes do not match the header's shapes and %u steps", size, r->n_steps);
    return 0;
}

static void *replay_load(const char *encoder_path, const char *decoder_path)
{
    replay *r;
    uint8_t *data;
    size_t size, i;
    if (strcmp(decoder_path, "-") != 0) {
        rkt_fail(decoder_path, "the replay backend reads its recording from ENCODER; pass - as DECODER");
        return NULL;
    }
    if (rkt_read_file(encoder_path, &data, &size))
        return NULL;
    if (!(r = rkt_calloc(1, sizeof *r, encoder_path))) {
        free(data);
        return NULL;
    }
    r->path = encoder_path;
    if (size < HEADER || memcmp(data, "RKRPL1\0\0", 8) != 0) {
        rkt_fail(encoder_path, "not a replay recording (%s)", size < HEADER ? "too short" : "bad magic");
    } else if (check_header(r, size, data) == 0 && (r->data = rkt_calloc((size - HEADER) / 4, 4, r->path)) &&
               (r->zeros = rkt_calloc((size_t)r->state_len, sizeof(float), r->path))) {
        for (i = 0; i < (size - HEADER) / 4; i++)
            r->data[i] = rkt_lef32(data + HEADER + 4 * i);
        r->src_embeds = r->data;
        r->src_mask_bias = r->src_embeds + (size_t)r->dims.src_len * r->dims.dim;
        r->enc_out = r->src_mask_bias + r->dims.src_len;
        r->steps = r->enc_out + (size_t)r->dims.src_len * r->dims.dim;
        free(data);
        return r;
    }
    free(data);
    free(r->data);
    free(r);
    return NULL;
}

static int replay_query(void *ctx, rkt_dims *dims)
{
    *dims = ((replay *)ctx)->dims;
    return 0;
}

static int same(const replay *r, const char *what, const float *got, const float *want, uint64_t n)
{
    uint64_t i;
    for (i = 0; i < n; i++)
        if (!(fabsf(got[i] - want[i]) <= 1e-6f * fmaxf(1.0f, fabsf(want[i]))))
            return rkt_fail(r->path, "step %u: %s[%llu] is %g, the recording has %g", r->step, what,
                            (unsigned long long)i, (double)got[i], (double)want[i]);
    return 0;
}

static int replay_run_encoder(void *ctx, const float *src_embeds, const float *src_mask_bias, float *enc_out)
{
    replay *r = ctx;
    uint64_t sd = (uint64_t)r->dims.src_len * r->dims.dim;
    if (same(r, "encoder src_embeds", src_embeds, r->src_embeds, sd) ||
        same(r, "encoder src_mask_bias", src_mask_bias, r->src_mask_bias, r->dims.src_len))
        return -1;
    memcpy(enc_out, r->enc_out, (size_t)sd * sizeof *enc_out);
    return 0;
}

static int replay_run_decoder(void *ctx, const rkt_step_io *io)
{
    replay *r = ctx;
    const rkt_dims *d = &r->dims;
    const float *rec, *prev_state;
    uint64_t sd = (uint64_t)d->src_len * d->dim;
    size_t state_bytes = (size_t)r->state_len * sizeof(float);
    if (r->step >= r->n_steps)
        return rkt_fail(r->path, "the loop asked for step %u, the recording has %u", r->step, r->n_steps);
    rec = r->steps + (size_t)(r->step * r->step_len);
    /* The previous step's returned state sits at the end of its record. */
    prev_state = r->step ? rec - (d->kind == RKT_TRANSFORMER ? 2 : 1) * r->state_len : r->zeros;
    if (same(r, "tok_embeds", io->tok_embeds, rec, d->dim) || same(r, "enc_out", io->enc_out, r->enc_out, sd) ||
        same(r, "src_mask_bias", io->src_mask_bias, r->src_mask_bias, d->src_len))
        return -1;
    rec += d->dim;
    if (d->kind == RKT_TRANSFORMER) {
        if (same(r, "cache_mask_bias", io->cache_mask_bias, rec, d->cache_len) ||
            same(r, "cache_k", io->cache_k, prev_state, r->state_len) ||
            same(r, "cache_v", io->cache_v, r->step ? prev_state + r->state_len : r->zeros, r->state_len))
            return -1;
        rec += d->cache_len;
        memcpy(io->logits, rec, d->vocab * sizeof(float));
        memcpy(io->new_cache_k, rec + d->vocab, state_bytes);
        memcpy(io->new_cache_v, rec + d->vocab + r->state_len, state_bytes);
    } else {
        if (same(r, "state", io->state, prev_state, r->state_len))
            return -1;
        memcpy(io->logits, rec, d->vocab * sizeof(float));
        memcpy(io->new_state, rec + d->vocab, state_bytes);
    }
    r->step++;
    return 0;
}

static void replay_release(void *ctx)
{
    replay *r = ctx;
    if (!r)
        return;
    free(r->data);
    free(r->zeros);
    free(r);
}

const rkt_backend rkt_replay_backend = {"replay", replay_load, replay_query, replay_run_encoder, replay_run_decoder,
                                        replay_release};
