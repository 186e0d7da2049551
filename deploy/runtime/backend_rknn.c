/* The RKNN backend: encoder.rknn and decoder.rknn on the NPU through the RKNN C API (librknnrt).

   Every tensor attribute is checked against docs/CONTRACTS.md before the first run, and every call's return code is
   checked and reported by name. Inputs are given as float32 with pass_through = 0, so the runtime converts them to
   whatever the model was built with (fp16, int8); outputs are asked for as float32 (want_float = 1). */
#ifdef RKT_RKNN_SDK_HEADER
#include <rknn_api.h>
#else
#include "rknn_api_min.h"
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "util.h"

#define MAX_IO 8 /* the decoder has at most 6 inputs and 3 outputs */

typedef struct {
    const char *path;
    rknn_context ctx;
    int initialized;
    rknn_input_output_num io;
    rknn_tensor_attr in[MAX_IO], out[MAX_IO];
} model;

/* One tensor the loop exchanges with a model: its attribute index and, for 4-D tensors the runtime lays out as
   NHWC, the fact that outputs must be transposed back to NCHW. */
typedef struct {
    uint32_t index, count;
    int nhwc;
    uint32_t nchw[4]; /* 4-D outputs: the NCHW shape, for the transpose */
} binding;

typedef struct {
    model enc, dec;
    rkt_dims dims;
    binding src_embeds, src_mask_bias, enc_out;            /* encoder */
    binding d_in[6], d_out[3];                             /* decoder, in the order of the names below */
    uint32_t n_dec_in, n_dec_out;
    float *scratch; /* NHWC output before its transpose */
} rknn_backend;

static const char *const recurrent_in[] = {"tok_embeds", "enc_out", "src_mask_bias", "state"};
static const char *const recurrent_out[] = {"logits", "new_state"};
static const char *const transformer_in[] = {"tok_embeds", "enc_out", "src_mask_bias", "cache_k", "cache_v",
                                             "cache_mask_bias"};
static const char *const transformer_out[] = {"logits", "new_cache_k", "new_cache_v"};

static const char *error_name(int ret)
{
    switch (ret) {
    case RKNN_ERR_FAIL: return "RKNN_ERR_FAIL";
    case RKNN_ERR_TIMEOUT: return "RKNN_ERR_TIMEOUT";
    case RKNN_ERR_DEVICE_UNAVAILABLE: return "RKNN_ERR_DEVICE_UNAVAILABLE";
    case RKNN_ERR_MALLOC_FAIL: return "RKNN_ERR_MALLOC_FAIL";
    case RKNN_ERR_PARAM_INVALID: return "RKNN_ERR_PARAM_INVALID";
    case RKNN_ERR_MODEL_INVALID: return "RKNN_ERR_MODEL_INVALID";
    case RKNN_ERR_CTX_INVALID: return "RKNN_ERR_CTX_INVALID";
    case RKNN_ERR_INPUT_INVALID: return "RKNN_ERR_INPUT_INVALID";
    case RKNN_ERR_OUTPUT_INVALID: return "RKNN_ERR_OUTPUT_INVALID";
    case RKNN_ERR_DEVICE_UNMATCH: return "RKNN_ERR_DEVICE_UNMATCH (update librknnrt / the NPU driver)";
    case RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL: return "RKNN_ERR_INCOMPATIBLE_PRE_COMPILE_MODEL";
    case RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION: return "RKNN_ERR_INCOMPATIBLE_OPTIMIZATION_LEVEL_VERSION";
    case RKNN_ERR_TARGET_PLATFORM_UNMATCH: return "RKNN_ERR_TARGET_PLATFORM_UNMATCH (convert for rv1126b)";
    default: return "unknown RKNN error";
    }
}

static int check(const model *m, const char *call, int ret)
{
    if (ret != RKNN_SUCC)
        return rkt_fail(m->path, "%s: %s (%d)", call, error_name(ret), ret);
    return 0;
}

static int query_attrs(model *m, rknn_query_cmd cmd, rknn_tensor_attr *attrs, uint32_t n)
{
    const char *kind = cmd == RKNN_QUERY_INPUT_ATTR ? "input" : "output";
    uint32_t i;
    for (i = 0; i < n; i++) {
        memset(&attrs[i], 0, sizeof attrs[i]);
        attrs[i].index = i;
        if (check(m, cmd == RKNN_QUERY_INPUT_ATTR ? "rknn_query(INPUT_ATTR)" : "rknn_query(OUTPUT_ATTR)",
                  rknn_query(m->ctx, cmd, &attrs[i], sizeof attrs[i])))
            return -1;
        attrs[i].name[RKNN_MAX_NAME_LEN - 1] = '\0'; /* printed and compared below */
        /* dims[] is read up to n_dims and index names the tensor in rknn_inputs_set / rknn_outputs_get. */
        if (attrs[i].index != i)
            return rkt_fail(m->path, "%s %u ('%s'): attribute index is %u, queried %u", kind, i, attrs[i].name,
                            attrs[i].index, i);
        if (attrs[i].n_dims > RKNN_MAX_DIMS)
            return rkt_fail(m->path, "%s %u ('%s'): n_dims is %u, more than RKNN_MAX_DIMS (%d)", kind, i,
                            attrs[i].name, attrs[i].n_dims, RKNN_MAX_DIMS);
    }
    return 0;
}

static int init_model(model *m, const char *path)
{
    m->path = path;
    /* size 0: `model` is a path and the runtime reads the file itself. */
    if (check(m, "rknn_init", rknn_init(&m->ctx, (void *)path, 0, 0, NULL)))
        return -1;
    m->initialized = 1;
    if (check(m, "rknn_query(IN_OUT_NUM)", rknn_query(m->ctx, RKNN_QUERY_IN_OUT_NUM, &m->io, sizeof m->io)))
        return -1;
    /* Checked before the attributes are queried into in[MAX_IO] / out[MAX_IO]. */
    if (!m->io.n_input || m->io.n_input > MAX_IO || !m->io.n_output || m->io.n_output > MAX_IO)
        return rkt_fail(path, "rknn_query(IN_OUT_NUM): n_input %u, n_output %u; the runner's models have 2-6 inputs "
                        "and 1-3 outputs", m->io.n_input, m->io.n_output);
    return query_attrs(m, RKNN_QUERY_INPUT_ATTR, m->in, m->io.n_input) ||
           query_attrs(m, RKNN_QUERY_OUTPUT_ATTR, m->out, m->io.n_output);
}

static void destroy_model(model *m)
{
    if (m->initialized)
        check(m, "rknn_destroy", rknn_destroy(m->ctx));
    m->initialized = 0;
}

static void rknn_release(void *ctx)
{
    rknn_backend *b = ctx;
    if (!b)
        return;
    destroy_model(&b->enc);
    destroy_model(&b->dec);
    free(b->scratch);
    free(b);
}

static void *rknn_load(const char *encoder_path, const char *decoder_path)
{
    rknn_backend *b = rkt_calloc(1, sizeof *b, "rknn");
    if (b && (init_model(&b->enc, encoder_path) || init_model(&b->dec, decoder_path))) {
        rknn_release(b);
        return NULL;
    }
    return b;
}

static const rknn_tensor_attr *find(const model *m, int input, const char *name, uint32_t *index)
{
    const rknn_tensor_attr *attrs = input ? m->in : m->out;
    uint32_t i, n = input ? m->io.n_input : m->io.n_output;
    for (i = 0; i < n; i++)
        if (strcmp(attrs[i].name, name) == 0) {
            *index = i;
            return &attrs[i];
        }
    rkt_fail(m->path, "no %s named '%s' (CONTRACTS.md names; was the ONNX exported by deploy/export_onnx.py?)",
             input ? "input" : "output", name);
    return NULL;
}

static void shape_str(char *buf, size_t size, const uint32_t *dims, uint32_t n)
{
    uint32_t i;
    size_t used = (size_t)snprintf(buf, size, "[");
    for (i = 0; i < n && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, i ? ", %u" : "%u", dims[i]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
}

static const char *format_name(int fmt)
{
    switch (fmt) {
    case RKNN_TENSOR_NCHW: return "NCHW";
    case RKNN_TENSOR_NHWC: return "NHWC";
    case RKNN_TENSOR_NC1HWC2: return "NC1HWC2";
    case RKNN_TENSOR_UNDEFINED: return "UNDEFINED";
    default: return "unknown";
    }
}

/* Bytes per element of the tensor types the runtime converts float32 to and from; 0 for any other type. */
static uint32_t type_bytes(int type)
{
    switch (type) {
    case RKNN_TENSOR_FLOAT32: return 4;
    case RKNN_TENSOR_FLOAT16: case RKNN_TENSOR_INT16: return 2;
    case RKNN_TENSOR_INT8: case RKNN_TENSOR_UINT8: return 1;
    default: return 0;
    }
}

/* A quantized tensor's parameters, which the runtime uses to convert our float32 to and from it. */
static int check_quantization(const model *m, const char *kind, const char *name, const rknn_tensor_attr *a)
{
    int32_t lo = a->type == RKNN_TENSOR_INT8 ? -128 : a->type == RKNN_TENSOR_UINT8 ? 0 : -32768,
            hi = a->type == RKNN_TENSOR_INT8 ? 127 : a->type == RKNN_TENSOR_UINT8 ? 255 : 32767;
    if (a->type == RKNN_TENSOR_FLOAT32 || a->type == RKNN_TENSOR_FLOAT16)
        return 0; /* zp / scale unused */
    if (a->qnt_type == RKNN_TENSOR_QNT_DFP)
        return 0; /* scale 2^-fl: finite for every int8 fl */
    if (a->qnt_type != RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC)
        return rkt_fail(m->path, "%s '%s': qnt_type %d, a quantized tensor needs DFP (1) or affine asymmetric (2)",
                        kind, name, (int)a->qnt_type);
    if (!isfinite(a->scale) || a->scale <= 0.0f)
        return rkt_fail(m->path, "%s '%s': scale %g is not a positive finite number", kind, name, (double)a->scale);
    if (a->zp < lo || a->zp > hi)
        return rkt_fail(m->path, "%s '%s': zero point zp %d is outside the type's range %d..%d", kind, name,
                        (int)a->zp, (int)lo, (int)hi);
    return 0;
}

/* Checks one tensor's attributes against the NCHW shape the loop uses before anything is sized from them:
   fmt (4-D tensors may be NHWC, dims then in that order), n_dims and dims, n_elems, type, size and the
   quantization parameters. */
static int bind(const model *m, int input, const char *name, const uint32_t *want, uint32_t n, binding *out)
{
    const rknn_tensor_attr *a = find(m, input, name, &out->index);
    const char *kind = input ? "input" : "output";
    uint64_t count = 1;
    uint32_t i, expect[4], bytes;
    char got_s[200], want_s[128];
    if (!a)
        return -1;
    /* Saturating: 4-D caches multiply four factors below 2^32 (L and Tc are free), which could wrap 64 bits to a
       small count that a corrupt n_elems matches. Past UINT32_MAX the count only has to stay too large. */
    for (i = 0; i < n; i++)
        count = count > UINT32_MAX ? count : count * want[i];
    if (a->fmt != RKNN_TENSOR_NCHW && a->fmt != RKNN_TENSOR_NHWC && a->fmt != RKNN_TENSOR_UNDEFINED)
        return rkt_fail(m->path, "%s '%s': fmt %d (%s), the runner handles NCHW, NHWC or UNDEFINED", kind, name,
                        (int)a->fmt, format_name(a->fmt));
    out->nhwc = n == 4 && a->fmt == RKNN_TENSOR_NHWC;
    memcpy(expect, want, n * sizeof *want);
    if (out->nhwc) {
        expect[1] = want[2];
        expect[2] = want[3];
        expect[3] = want[1];
    }
    if (a->n_dims != n || memcmp(a->dims, expect, n * sizeof *expect) != 0) {
        shape_str(got_s, sizeof got_s, a->dims, a->n_dims);
        shape_str(want_s, sizeof want_s, expect, n);
        return rkt_fail(m->path, "%s '%s' has n_dims %u, dims %s (fmt %s), expected %s", kind, name, a->n_dims, got_s,
                        format_name(a->fmt), want_s);
    }
    if (count == 0 || count > UINT32_MAX / 4 || a->n_elems != count)
        return rkt_fail(m->path, "%s '%s': n_elems is %u, its shape has %llu%s elements (the runner takes 1 to %u)",
                        kind, name, a->n_elems, (unsigned long long)count, count > UINT32_MAX ? " or more" : "",
                        UINT32_MAX / 4);
    /* float32 in and out; the runtime converts to and from the model's own type, which must be one it can. */
    if (!(bytes = type_bytes(a->type)))
        return rkt_fail(m->path, "%s '%s': type %d is not float32, float16, int8, uint8 or int16", kind, name,
                        (int)a->type);
    if (a->size < count * bytes)
        return rkt_fail(m->path, "%s '%s': size is %u bytes, its %llu elements of %u bytes need %llu", kind, name,
                        a->size, (unsigned long long)count, bytes, (unsigned long long)(count * bytes));
    if (check_quantization(m, kind, name, a))
        return -1;
    out->count = (uint32_t)count;
    if (n == 4)
        memcpy(out->nchw, want, sizeof out->nchw);
    return 0;
}

/* A tensor the shapes are read from: n_dims n and no zero dimension, checked before any dims[] is used. bind()
   later checks it in full like every other tensor. */
static const rknn_tensor_attr *anchor(const model *m, int input, const char *name, uint32_t n, const char *form)
{
    uint32_t index, i = 0;
    const rknn_tensor_attr *a = find(m, input, name, &index);
    char got_s[200];
    if (!a)
        return NULL;
    while (a->n_dims == n && i < n && a->dims[i])
        i++;
    if (a->n_dims != n || i < n) {
        shape_str(got_s, sizeof got_s, a->dims, a->n_dims);
        rkt_fail(m->path, "%s '%s' has n_dims %u, dims %s; expected %s, no dimension 0", input ? "input" : "output",
                 name, a->n_dims, got_s, form);
        return NULL;
    }
    return a;
}

static int expect_io(const model *m, uint32_t n_in, uint32_t n_out, const char *what)
{
    if (m->io.n_input != n_in || m->io.n_output != n_out)
        return rkt_fail(m->path, "%u inputs and %u outputs, %s has %u and %u", m->io.n_input, m->io.n_output, what,
                        n_in, n_out);
    return 0;
}

static int rknn_query_dims(void *ctx, rkt_dims *dims)
{
    rknn_backend *b = ctx;
    rkt_dims *d = &b->dims;
    const rknn_tensor_attr *a;
    uint32_t S, D, V, L, H = 0, Tc = 0, hd = 0, i;
    int transformer;
    /* The shapes come from a few anchor tensors; bind() then checks every tensor against them. */
    if (expect_io(&b->enc, 2, 1, "an encoder") || !(a = anchor(&b->enc, 1, "src_embeds", 3, "[1, S, D]")))
        return -1;
    S = a->dims[1];
    D = a->dims[2];
    transformer = b->dec.io.n_input == 6;
    if (expect_io(&b->dec, transformer ? 6 : 4, transformer ? 3 : 2, "a recurrent (4/2) or transformer (6/3) decoder"))
        return -1;
    if (!(a = anchor(&b->dec, 0, "logits", 2, "[1, V]")))
        return -1;
    V = a->dims[1];
    if (!(a = anchor(&b->dec, 1, transformer ? "cache_k" : "state", transformer ? 4 : 3,
                     transformer ? "[L, H, Tc, hd] (NHWC: [L, Tc, hd, H])" : "[L, 1, D]")))
        return -1;
    L = a->dims[0];
    if (transformer) {
        int nhwc = a->fmt == RKNN_TENSOR_NHWC;
        H = nhwc ? a->dims[3] : a->dims[1];
        Tc = nhwc ? a->dims[1] : a->dims[2];
        hd = nhwc ? a->dims[2] : a->dims[3];
        if ((uint64_t)H * hd != D)
            return rkt_fail(b->dec.path, "input 'cache_k': dims give H = %u, hd = %u (Tc = %u), H * hd is not D = %u",
                            H, hd, Tc, D);
    }
    {
        const uint32_t s_embeds[] = {1, S, D}, s_mask[] = {1, S}, s_tok[] = {1, 1, D}, s_logits[] = {1, V},
                       s_state[] = {L, 1, D}, s_cache[] = {L, H, Tc, hd}, s_cmask[] = {1, Tc};
        const uint32_t *in_shapes[] = {s_tok, s_embeds, s_mask, transformer ? s_cache : s_state, s_cache, s_cmask};
        const uint32_t in_dims[] = {3, 3, 2, transformer ? 4u : 3u, 4, 2};
        const uint32_t *out_shapes[] = {s_logits, transformer ? s_cache : s_state, s_cache};
        const uint32_t out_dims[] = {2, transformer ? 4u : 3u, 4};
        b->n_dec_in = transformer ? 6 : 4;
        b->n_dec_out = transformer ? 3 : 2;
        if (bind(&b->enc, 1, "src_embeds", s_embeds, 3, &b->src_embeds) ||
            bind(&b->enc, 1, "src_mask_bias", s_mask, 2, &b->src_mask_bias) ||
            bind(&b->enc, 0, "enc_out", s_embeds, 3, &b->enc_out))
            return -1;
        for (i = 0; i < b->n_dec_in; i++)
            if (bind(&b->dec, 1, transformer ? transformer_in[i] : recurrent_in[i], in_shapes[i], in_dims[i],
                     &b->d_in[i]))
                return -1;
        for (i = 0; i < b->n_dec_out; i++)
            if (bind(&b->dec, 0, transformer ? transformer_out[i] : recurrent_out[i], out_shapes[i], out_dims[i],
                     &b->d_out[i]))
                return -1;
    }
    if (transformer && !(b->scratch = rkt_calloc((size_t)L * Tc * D, sizeof(float), "rknn")))
        return -1;
    d->kind = transformer ? RKT_TRANSFORMER : RKT_RECURRENT;
    d->src_len = S;
    d->dim = D;
    d->vocab = V;
    d->layers = L;
    d->heads = H;
    d->cache_len = Tc;
    *dims = *d;
    return 0;
}

/* NHWC [N, H, W, C] -> NCHW [N, C, H, W]; nchw holds the target shape. */
static void nhwc_to_nchw(const float *src, float *dst, const uint32_t *nchw)
{
    size_t n, c, h, w, N = nchw[0], C = nchw[1], H = nchw[2], W = nchw[3];
    for (n = 0; n < N; n++)
        for (c = 0; c < C; c++)
            for (h = 0; h < H; h++)
                for (w = 0; w < W; w++)
                    dst[((n * C + c) * H + h) * W + w] = src[((n * H + h) * W + w) * C + c];
}

/* rknn_inputs_set, rknn_run, rknn_outputs_get, copy out, rknn_outputs_release. */
static int run_model(rknn_backend *b, const model *m, const binding *in, const float *const *in_bufs, uint32_t n_in,
                     const binding *out, float *const *out_bufs, uint32_t n_out)
{
    rknn_input inputs[MAX_IO];
    rknn_output outputs[MAX_IO];
    uint32_t i;
    int rc = 0;
    memset(inputs, 0, sizeof inputs);
    memset(outputs, 0, sizeof outputs);
    for (i = 0; i < n_in; i++) {
        inputs[i].index = in[i].index;
        inputs[i].buf = (void *)in_bufs[i]; /* the runtime only reads inputs */
        inputs[i].size = in[i].count * 4;
        inputs[i].pass_through = 0;
        inputs[i].type = RKNN_TENSOR_FLOAT32;
        /* Our 4-D buffers are NCHW whatever the model's native layout; others keep the model's format. */
        inputs[i].fmt = m->in[in[i].index].n_dims == 4 ? RKNN_TENSOR_NCHW : m->in[in[i].index].fmt;
    }
    for (i = 0; i < n_out; i++) {
        outputs[i].index = out[i].index;
        outputs[i].want_float = 1;
    }
    if (check(m, "rknn_inputs_set", rknn_inputs_set(m->ctx, n_in, inputs)) ||
        check(m, "rknn_run", rknn_run(m->ctx, NULL)) ||
        check(m, "rknn_outputs_get", rknn_outputs_get(m->ctx, n_out, outputs, NULL)))
        return -1;
    for (i = 0; i < n_out && rc == 0; i++) {
        if (!outputs[i].buf || outputs[i].size != out[i].count * 4) {
            rc = rkt_fail(m->path, "output '%s': rknn_outputs_get gave %s%u bytes, expected %u float32",
                          m->out[out[i].index].name, outputs[i].buf ? "" : "no buffer and ", outputs[i].size,
                          out[i].count);
        } else if (out[i].nhwc) {
            memcpy(b->scratch, outputs[i].buf, outputs[i].size);
            nhwc_to_nchw(b->scratch, out_bufs[i], out[i].nchw);
        } else {
            memcpy(out_bufs[i], outputs[i].buf, outputs[i].size);
        }
    }
    if (check(m, "rknn_outputs_release", rknn_outputs_release(m->ctx, n_out, outputs)))
        rc = -1;
    return rc;
}

static int rknn_run_encoder(void *ctx, const float *src_embeds, const float *src_mask_bias, float *enc_out)
{
    rknn_backend *b = ctx;
    const binding in[] = {b->src_embeds, b->src_mask_bias};
    const float *const in_bufs[] = {src_embeds, src_mask_bias};
    float *const out_bufs[] = {enc_out};
    return run_model(b, &b->enc, in, in_bufs, 2, &b->enc_out, out_bufs, 1);
}

static int rknn_run_decoder(void *ctx, const rkt_step_io *io)
{
    rknn_backend *b = ctx;
    int transformer = b->dims.kind == RKT_TRANSFORMER;
    const float *const in_bufs[] = {io->tok_embeds, io->enc_out, io->src_mask_bias,
                                    transformer ? io->cache_k : io->state, io->cache_v, io->cache_mask_bias};
    float *const out_bufs[] = {io->logits, transformer ? io->new_cache_k : io->new_state, io->new_cache_v};
    return run_model(b, &b->dec, b->d_in, in_bufs, b->n_dec_in, b->d_out, out_bufs, b->n_dec_out);
}

const rkt_backend rkt_rknn_backend = {"rknn", rknn_load, rknn_query_dims, rknn_run_encoder, rknn_run_decoder,
                                      rknn_release};
