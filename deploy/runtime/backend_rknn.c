/* The RKNN backend: encoder.rknn and decoder.rknn on the NPU through the RKNN C API (librknnrt, rknn_runtime.h).

   Every tensor attribute is checked before anything is sized or indexed with it, then every input and output gets a
   zero-copy buffer (rknn_create_mem + rknn_set_io_mem) in the model's own type and layout, so no call copies or
   converts a tensor behind the runner's back. Per sentence: the source goes in, the encoder runs, its cross-attention
   keys/values and the source mask are put into the decoder's buffers once. Per step: one embedding row is converted
   in, rknn_run, the argmax is read off the logits in their own type, and the carried state moves in place (caches
   shifted with memmove, the step's key/value appended; recurrent states copied). The runtime flushes and invalidates
   the buffers' CPU caches around rknn_run itself (rknn_init's flags leave it on), so no rknn_mem_sync is needed. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "contract.h"
#include "rknn_runtime.h"
#include "tensor.h"
#include "util.h"

typedef struct {
    const char *path;
    rknn_context ctx;
    int initialized;
    uint32_t n_in, n_out;
    rknn_tensor_attr *attr; /* inputs, then outputs */
    rkt_shape *shape;       /* the same tensors in NCHW order, for the contract */
    rknn_tensor_mem **mem;
    rkt_tensor *view; /* the mems in the model's type and layout */
} model;

typedef struct {
    rkt_rknn_api api;
    model enc, dec;
    rkt_contract c;
    int measure;
    rkt_runtime_time time;
} rknn_backend;

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

static const char *kind(const model *m, uint32_t i)
{
    return i < m->n_in ? "input" : "output";
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

/* ------------------------------------------------------------------ loading */

static void print_versions(rknn_backend *b)
{
    rknn_sdk_version v;
    int ret;
    memset(&v, 0, sizeof v);
    ret = b->api.query(b->enc.ctx, RKNN_QUERY_SDK_VERSION, &v, sizeof v);
    v.api_version[sizeof v.api_version - 1] = v.drv_version[sizeof v.drv_version - 1] = '\0';
    if (ret == RKNN_SUCC)
        fprintf(stderr, "librknnrt: api version %s, driver version %s (%s)\n", v.api_version, v.drv_version,
                b->api.library);
    else
        fprintf(stderr, "librknnrt: versions unknown, RKNN_QUERY_SDK_VERSION gave %s (%d) (%s)\n", error_name(ret),
                ret, b->api.library);
}

static int query_attrs(rknn_backend *b, model *m)
{
    uint32_t i;
    for (i = 0; i < m->n_in + m->n_out; i++) {
        rknn_tensor_attr *a = &m->attr[i];
        uint32_t index = i < m->n_in ? i : i - m->n_in;
        int input = i < m->n_in;
        memset(a, 0, sizeof *a);
        a->index = index;
        if (check(m, input ? "rknn_query(INPUT_ATTR)" : "rknn_query(OUTPUT_ATTR)",
                  b->api.query(m->ctx, input ? RKNN_QUERY_INPUT_ATTR : RKNN_QUERY_OUTPUT_ATTR, a, sizeof *a)))
            return -1;
        a->name[RKNN_MAX_NAME_LEN - 1] = '\0'; /* printed and compared below */
        if (a->index != index)
            return rkt_fail(m->path, "%s %u ('%s'): attribute index is %u, queried %u", kind(m, i), index, a->name,
                            a->index, index);
    }
    return 0;
}

static int init_model(rknn_backend *b, model *m, const char *path)
{
    rknn_input_output_num io;
    m->path = path;
    /* size 0: `model` is a path and the runtime reads the file itself. */
    if (check(m, "rknn_init", b->api.init(&m->ctx, (void *)path, 0, 0, NULL)))
        return -1;
    m->initialized = 1;
    if (m == &b->enc)
        print_versions(b);
    memset(&io, 0, sizeof io);
    if (check(m, "rknn_query(IN_OUT_NUM)", b->api.query(m->ctx, RKNN_QUERY_IN_OUT_NUM, &io, sizeof io)))
        return -1;
    if (!io.n_input || io.n_input > RKT_MAX_IO || !io.n_output || io.n_output > RKT_MAX_IO)
        return rkt_fail(path, "rknn_query(IN_OUT_NUM): n_input %u, n_output %u; the runner's models have 1 to %d of "
                        "each", io.n_input, io.n_output, RKT_MAX_IO);
    m->n_in = io.n_input;
    m->n_out = io.n_output;
    if (!(m->attr = rkt_calloc(m->n_in + m->n_out, sizeof *m->attr, path)) ||
        !(m->shape = rkt_calloc(m->n_in + m->n_out, sizeof *m->shape, path)) ||
        !(m->mem = rkt_calloc(m->n_in + m->n_out, sizeof *m->mem, path)) ||
        !(m->view = rkt_calloc(m->n_in + m->n_out, sizeof *m->view, path)))
        return -1;
    return query_attrs(b, m);
}

static void destroy_model(rknn_backend *b, model *m)
{
    uint32_t i;
    /* The buffers belong to the context: they go first. */
    for (i = 0; m->mem && i < m->n_in + m->n_out; i++)
        if (m->mem[i])
            check(m, "rknn_destroy_mem", b->api.destroy_mem(m->ctx, m->mem[i]));
    if (m->initialized)
        check(m, "rknn_destroy", b->api.destroy(m->ctx));
    free(m->attr);
    free(m->shape);
    free(m->mem);
    free(m->view);
    memset(m, 0, sizeof *m);
}

static void rknn_release(void *ctx)
{
    rknn_backend *b = ctx;
    if (!b)
        return;
    destroy_model(b, &b->enc);
    destroy_model(b, &b->dec);
    rkt_rknn_api_close(&b->api);
    free(b);
}

static void *rknn_load(const char *encoder_path, const char *decoder_path, int measure)
{
    rknn_backend *b = rkt_calloc(1, sizeof *b, "rknn");
    if (!b)
        return NULL;
    b->measure = measure;
    b->time.decoder_perf_us = measure ? 0.0 : -1.0;
    if (rkt_rknn_api_open(&b->api)) {
        free(b);
        return NULL;
    }
    if (init_model(b, &b->enc, encoder_path) || init_model(b, &b->dec, decoder_path)) {
        rknn_release(b);
        return NULL;
    }
    return b;
}

/* ------------------------------------------------------------------ attributes -> tensors */

static int dtype_of(int type, rkt_dtype *dtype)
{
    switch (type) {
    case RKNN_TENSOR_FLOAT32: *dtype = RKT_F32; return 0;
    case RKNN_TENSOR_FLOAT16: *dtype = RKT_F16; return 0;
    case RKNN_TENSOR_INT8: *dtype = RKT_I8; return 0;
    case RKNN_TENSOR_UINT8: *dtype = RKT_U8; return 0;
    case RKNN_TENSOR_INT16: *dtype = RKT_I16; return 0;
    default: return -1;
    }
}

/* A quantized tensor's parameters, with which the runner converts values to and from its codes. */
static int quantization(const model *m, uint32_t i, rkt_tensor *t)
{
    const rknn_tensor_attr *a = &m->attr[i];
    int32_t lo = t->dtype == RKT_I8 ? -128 : t->dtype == RKT_U8 ? 0 : -32768,
            hi = t->dtype == RKT_I8 ? 127 : t->dtype == RKT_U8 ? 255 : 32767;
    if (t->dtype == RKT_F32 || t->dtype == RKT_F16)
        return 0; /* zp / scale unused */
    if (a->qnt_type == RKNN_TENSOR_QNT_DFP) {
        t->scale = ldexpf(1.0f, -a->fl); /* value = q * 2^-fl: finite for every int8 fl */
        return 0;
    }
    if (a->qnt_type != RKNN_TENSOR_QNT_AFFINE_ASYMMETRIC)
        return rkt_fail(m->path, "%s '%s': qnt_type %d, a quantized tensor needs DFP (1) or affine asymmetric (2)",
                        kind(m, i), a->name, (int)a->qnt_type);
    if (!isfinite(a->scale) || a->scale <= 0.0f)
        return rkt_fail(m->path, "%s '%s': scale %g is not a positive finite number", kind(m, i), a->name,
                        (double)a->scale);
    if (a->zp < lo || a->zp > hi)
        return rkt_fail(m->path, "%s '%s': zero point zp %d is outside the type's range %d..%d", kind(m, i), a->name,
                        (int)a->zp, (int)lo, (int)hi);
    t->scale = a->scale;
    t->zp = a->zp;
    return 0;
}

/* Checks tensor i's attributes and fills its NCHW shape and its view's type and layout (data comes later):
   fmt (4-D tensors may be NHWC, their dims then in that order), n_dims and dims, n_elems, type, quantization,
   w_stride and size, each before anything is sized from it. */
static int describe(const model *m, uint32_t i)
{
    const rknn_tensor_attr *a = &m->attr[i];
    rkt_shape *s = &m->shape[i];
    rkt_tensor *t = &m->view[i];
    uint64_t count = 1;
    uint32_t d, width;
    char dims[200];
    if (a->fmt != RKNN_TENSOR_NCHW && a->fmt != RKNN_TENSOR_NHWC && a->fmt != RKNN_TENSOR_UNDEFINED)
        return rkt_fail(m->path, "%s '%s': fmt %d (%s), the runner handles NCHW, NHWC or UNDEFINED", kind(m, i),
                        a->name, (int)a->fmt, format_name(a->fmt));
    if (a->n_dims == 0 || a->n_dims > RKT_MAX_RANK)
        return rkt_fail(m->path, "%s '%s': n_dims is %u; the contract's tensors have 1 to %d", kind(m, i), a->name,
                        a->n_dims, RKT_MAX_RANK);
    for (d = 0; d < a->n_dims; d++)
        count = rkt_sat_mul(count, a->dims[d]);
    rkt_shape_str(dims, sizeof dims, a->dims, a->n_dims);
    if (count == 0 || count > (1u << 30) || a->n_elems != count)
        return rkt_fail(m->path, "%s '%s': n_elems is %u, its dims %s make %llu%s (the runner takes 1 to 2^30)",
                        kind(m, i), a->name, a->n_elems, dims, (unsigned long long)count,
                        count == UINT64_MAX ? " or more" : "");
    if (dtype_of(a->type, &t->dtype))
        return rkt_fail(m->path, "%s '%s': type %d is not float32, float16, int8, uint8 or int16", kind(m, i), a->name,
                        (int)a->type);
    if (quantization(m, i, t))
        return -1;
    t->nhwc = a->n_dims == 4 && a->fmt == RKNN_TENSOR_NHWC;
    s->name = a->name;
    s->rank = a->n_dims;
    memcpy(s->dims, a->dims, a->n_dims * sizeof *a->dims);
    if (t->nhwc) { /* [N, H, W, C] -> NCHW */
        s->dims[1] = a->dims[3];
        s->dims[2] = a->dims[1];
        s->dims[3] = a->dims[2];
    }
    width = t->nhwc ? a->dims[2] : a->dims[a->n_dims - 1];
    if (a->w_stride && (t->nhwc ? a->w_stride < width : a->w_stride != width))
        return rkt_fail(m->path, "%s '%s': w_stride %u with dims %s (fmt %s): the runner lays out rows of %u%s",
                        kind(m, i), a->name, a->w_stride, dims, format_name(a->fmt), width,
                        t->nhwc ? " or more" : " only");
    rkt_tensor_layout(t, s->dims, s->rank, a->w_stride);
    if ((uint64_t)a->size < count * rkt_dtype_size(t->dtype) ||
        (uint64_t)(a->size > a->size_with_stride ? a->size : a->size_with_stride) < t->bytes)
        return rkt_fail(m->path, "%s '%s': size is %u bytes (size_with_stride %u), its %llu elements of %zu bytes "
                        "take %zu", kind(m, i), a->name, a->size, a->size_with_stride, (unsigned long long)count,
                        rkt_dtype_size(t->dtype), t->bytes);
    return 0;
}

/* A zero-copy buffer for tensor i, bound in the model's own type and layout. */
static int bind_memory(rknn_backend *b, model *m, uint32_t i)
{
    rknn_tensor_attr attr = m->attr[i];
    rkt_tensor *t = &m->view[i];
    uint32_t size = attr.size > attr.size_with_stride ? attr.size : attr.size_with_stride;
    rknn_tensor_mem *mem = b->api.create_mem(m->ctx, size);
    if (!mem || !mem->virt_addr || mem->size < size) {
        if (mem)
            b->api.destroy_mem(m->ctx, mem);
        return rkt_fail(m->path, "rknn_create_mem(%u) for %s '%s' gave %s", size, kind(m, i), attr.name,
                        mem ? "a smaller buffer or none" : "nothing (out of NPU memory?)");
    }
    m->mem[i] = mem;
    t->data = mem->virt_addr;
    /* pass_through 0 with the model's own type and fmt: the runtime takes the data as is, converting only to its
       internal layout where that differs (NC1HWC2). */
    attr.pass_through = 0;
    return check(m, "rknn_set_io_mem", b->api.set_io_mem(m->ctx, mem, &attr));
}

static int prepare(const model *m)
{
    uint32_t i;
    for (i = 0; i < m->n_in + m->n_out; i++)
        if (describe(m, i))
            return -1;
    return 0;
}

static rkt_model_shapes shapes_of(const model *m)
{
    rkt_model_shapes s;
    s.path = m->path;
    s.n_in = m->n_in;
    s.n_out = m->n_out;
    s.in = m->shape;
    s.out = m->shape + m->n_in;
    return s;
}

static int rknn_query_dims(void *ctx, rkt_dims *dims)
{
    rknn_backend *b = ctx;
    rkt_model_shapes enc, dec;
    uint32_t i;
    if (prepare(&b->enc) || prepare(&b->dec))
        return -1;
    enc = shapes_of(&b->enc);
    dec = shapes_of(&b->dec);
    if (rkt_contract_bind(&enc, &dec, &b->c))
        return -1;
    for (i = 0; i < b->enc.n_in + b->enc.n_out; i++)
        if (bind_memory(b, &b->enc, i))
            return -1;
    for (i = 0; i < b->dec.n_in + b->dec.n_out; i++)
        if (bind_memory(b, &b->dec, i))
            return -1;
    *dims = b->c.dims;
    return 0;
}

/* ------------------------------------------------------------------ running */

static int run(rknn_backend *b, model *m, double *run_ms)
{
    double start = rkt_now_ms();
    int ret = b->api.run(m->ctx, NULL);
    *run_ms += rkt_now_ms() - start;
    return check(m, "rknn_run", ret);
}

static const rkt_tensor *input(const model *m, uint32_t index)
{
    return &m->view[index];
}

static const rkt_tensor *output(const model *m, uint32_t index)
{
    return &m->view[m->n_in + index];
}

static int rknn_start_sentence(void *ctx, const float *src_embeds, const float *src_mask)
{
    rknn_backend *b = ctx;
    const rkt_contract *c = &b->c;
    uint32_t i;
    rkt_tensor_store(input(&b->enc, c->enc_src_embeds), src_embeds);
    rkt_tensor_store(input(&b->enc, c->enc_src_mask), src_mask);
    if (run(b, &b->enc, &b->time.encoder_run_ms))
        return -1;
    /* Constant for the whole sentence: set here, never per step. */
    for (i = 0; i < 2 * c->dims.layers; i++)
        rkt_tensor_copy(input(&b->dec, c->cross[i]), output(&b->enc, c->enc_cross[i]));
    rkt_tensor_store(input(&b->dec, c->src_mask), src_mask);
    /* Zero states, zero caches; the self mask shows step 0 only its own position. */
    for (i = 0; i < c->n_carried; i++)
        rkt_tensor_fill(input(&b->dec, c->carried_in[i]), 0.0f);
    if (c->dims.kind == RKT_TRANSFORMER) {
        rkt_tensor_fill(input(&b->dec, c->self_mask), 0.0f);
        rkt_tensor_set(input(&b->dec, c->self_mask), c->dims.cache_len - 1, 1.0f);
    }
    return 0;
}

/* The previous step's outputs into this step's inputs, in place. */
static void carry(rknn_backend *b, uint32_t step)
{
    const rkt_contract *c = &b->c;
    uint32_t i;
    for (i = 0; i < c->n_carried; i++) {
        if (c->dims.kind == RKT_TRANSFORMER)
            rkt_cache_push(input(&b->dec, c->carried_in[i]), output(&b->dec, c->carried_out[i]));
        else
            rkt_tensor_copy(input(&b->dec, c->carried_in[i]), output(&b->dec, c->carried_out[i]));
    }
    if (c->dims.kind == RKT_TRANSFORMER) /* one more real position: the cache's last `step` and the step's own */
        rkt_tensor_set(input(&b->dec, c->self_mask), c->dims.cache_len - 1 - step, 1.0f);
}

static void measure_run(rknn_backend *b)
{
    rknn_perf_run perf;
    double start = rkt_now_ms();
    memset(&perf, 0, sizeof perf);
    if (b->api.query(b->dec.ctx, RKNN_QUERY_PERF_RUN, &perf, sizeof perf) == RKNN_SUCC && perf.run_duration >= 0)
        b->time.decoder_perf_us += (double)perf.run_duration;
    else
        b->time.decoder_perf_us = -1.0; /* not available from this runtime: reported as such */
    b->time.probe_ms += rkt_now_ms() - start;
}

static int rknn_step(void *ctx, uint32_t step, const float *tok_embeds, uint32_t *token)
{
    rknn_backend *b = ctx;
    const rkt_contract *c = &b->c;
    if (c->dims.kind == RKT_TRANSFORMER && step >= c->dims.cache_len)
        return rkt_fail(b->dec.path, "step %u, but the self mask covers Tc = %u positions", step, c->dims.cache_len);
    if (step > 0)
        carry(b, step);
    rkt_tensor_store(input(&b->dec, c->tok_embeds), tok_embeds);
    if (run(b, &b->dec, &b->time.decoder_run_ms))
        return -1;
    if (b->measure && b->time.decoder_perf_us >= 0)
        measure_run(b);
    if (rkt_tensor_argmax(output(&b->dec, c->logits), c->dims.vocab, token))
        return rkt_fail(b->dec.path, "step %u: a logit is NaN", step);
    return 0;
}

static void rknn_runtime_time(void *ctx, rkt_runtime_time *t)
{
    *t = ((rknn_backend *)ctx)->time;
}

const rkt_backend rkt_rknn_backend = {"rknn",    rknn_load,         rknn_query_dims, rknn_start_sentence,
                                      rknn_step, rknn_runtime_time, rknn_release};
