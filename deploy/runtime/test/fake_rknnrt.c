/* A fake librknnrt for tests: serves a replay recording (backend_replay.c) through the RKNN C API, so
   backend_rknn.c's calls, attribute checks and NHWC handling run on any host. Never linked into a board build.

   A fake model file is: "RKFAKE1\0", u32 role (0 encoder, 1 decoder), u32 options, then the recording's path.
   Options: 1 = report 4-D tensors as NHWC (and return 4-D outputs in NHWC); 2 = report float16 tensors;
            4 = rknn_run of the decoder fails with RKNN_ERR_TIMEOUT at its third call;
            8 = report logits one wider than the recording (an attribute the backend must reject).
   Inputs are listed in reverse order, so the backend must bind tensors by name, not by position.

   FAKE_RKNN_CORRUPT makes the fake report bad values, so tests can check that the backend rejects them (with an
   error naming the tensor and attribute) instead of sizing a buffer or indexing with them. A comma-separated list
   of MODEL.TENSOR.FIELD=VALUE, MODEL being enc or dec:
     MODEL.io.n_input / MODEL.io.n_output                 what rknn_query(IN_OUT_NUM) reports
     MODEL.TENSOR.F, F one of index n_dims dims0..dims15 n_elems size fmt type qnt_type zp fl scale name
                                                          that tensor's rknn_query(INPUT_ATTR / OUTPUT_ATTR)
     MODEL.TENSOR.out_size / MODEL.TENSOR.out_buf (0: NULL) what rknn_outputs_get returns for that output
   VALUE is an integer (C syntax: 0x.., negative), a float for scale (nan, inf), a string for name. Only what is
   reported changes; the fake keeps running on its true attributes. A malformed list exits with status 97. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../backend.h"
#include "../rknn_api_min.h"
#include "../util.h"

enum { OPT_NHWC = 1, OPT_FP16 = 2, OPT_FAIL_RUN = 4, OPT_WIDE_LOGITS = 8 };

typedef struct {
    int decoder;
    uint32_t options, n_in, n_out, runs;
    rkt_dims dims;
    rknn_tensor_attr in[6], out[3];
    float *in_buf[6], *out_buf[3], *nchw_out[3];
    int in_set, outputs_held;
} fake;

/* ------------------------------------------------------------------ FAKE_RKNN_CORRUPT */

enum { MAX_CORRUPTIONS = 32 };

typedef struct {
    int decoder;
    char tensor[RKNN_MAX_NAME_LEN], field[16], value[64];
} corruption;

static corruption corruptions[MAX_CORRUPTIONS];
static int n_corruptions = -1; /* -1: FAKE_RKNN_CORRUPT not read yet */

/* The 4-byte integer fields (enums included) a corruption can set, by name. */
static const struct {
    const char *name;
    size_t offset;
} int_fields[] = {
    {"index", offsetof(rknn_tensor_attr, index)},       {"n_dims", offsetof(rknn_tensor_attr, n_dims)},
    {"n_elems", offsetof(rknn_tensor_attr, n_elems)},   {"size", offsetof(rknn_tensor_attr, size)},
    {"fmt", offsetof(rknn_tensor_attr, fmt)},           {"type", offsetof(rknn_tensor_attr, type)},
    {"qnt_type", offsetof(rknn_tensor_attr, qnt_type)}, {"zp", offsetof(rknn_tensor_attr, zp)},
};
typedef char enums_are_4_bytes[sizeof(rknn_tensor_format) == 4 && sizeof(rknn_tensor_type) == 4 &&
                               sizeof(rknn_tensor_qnt_type) == 4 ? 1 : -1];

/* Sets one attribute field from its text; -1 for an unknown field. */
static int set_attr_field(rknn_tensor_attr *a, const char *field, const char *value)
{
    uint32_t v = (uint32_t)strtoll(value, NULL, 0); /* two's complement for negative values */
    size_t i;
    for (i = 0; i < sizeof int_fields / sizeof *int_fields; i++)
        if (strcmp(field, int_fields[i].name) == 0) {
            memcpy((char *)a + int_fields[i].offset, &v, sizeof v);
            return 0;
        }
    if (strncmp(field, "dims", 4) == 0 && field[4] >= '0' && field[4] <= '9' && atoi(field + 4) < RKNN_MAX_DIMS)
        a->dims[atoi(field + 4)] = v;
    else if (strcmp(field, "fl") == 0)
        a->fl = (int8_t)strtol(value, NULL, 0);
    else if (strcmp(field, "scale") == 0)
        a->scale = strtof(value, NULL);
    else if (strcmp(field, "name") == 0)
        strncpy(a->name, value, RKNN_MAX_NAME_LEN - 1);
    else
        return -1;
    return 0;
}

static int known_field(const corruption *c)
{
    rknn_tensor_attr scratch;
    if (strcmp(c->tensor, "io") == 0)
        return strcmp(c->field, "n_input") == 0 || strcmp(c->field, "n_output") == 0;
    return strcmp(c->field, "out_size") == 0 || strcmp(c->field, "out_buf") == 0 ||
           set_attr_field(&scratch, c->field, c->value) == 0;
}

static void read_corruptions(void)
{
    const char *spec = getenv("FAKE_RKNN_CORRUPT");
    if (n_corruptions >= 0)
        return;
    n_corruptions = 0;
    while (spec && *spec) {
        const char *end = strchr(spec, ',');
        size_t len = end ? (size_t)(end - spec) : strlen(spec);
        char item[400], model[8];
        corruption *c = &corruptions[n_corruptions];
        if (n_corruptions == MAX_CORRUPTIONS || len >= sizeof item)
            goto bad;
        memcpy(item, spec, len);
        item[len] = '\0';
        if (sscanf(item, "%7[^.].%255[^.].%15[^=]=%63s", model, c->tensor, c->field, c->value) != 4 ||
            (strcmp(model, "enc") && strcmp(model, "dec")) || !known_field(c))
            goto bad;
        c->decoder = strcmp(model, "dec") == 0;
        n_corruptions++;
        spec += len + (end != NULL);
        continue;
    bad:
        fprintf(stderr, "fake_rknnrt: FAKE_RKNN_CORRUPT: cannot use '%.*s' (MODEL.TENSOR.FIELD=VALUE)\n", (int)len,
                spec);
        exit(97);
    }
}

/* The value of a corruption of this model's tensor and field, or NULL. */
static const char *corrupted(int decoder, const char *tensor, const char *field)
{
    int i;
    read_corruptions();
    for (i = n_corruptions - 1; i >= 0; i--) /* the last one given wins */
        if (corruptions[i].decoder == decoder && strcmp(corruptions[i].tensor, tensor) == 0 &&
            strcmp(corruptions[i].field, field) == 0)
            return corruptions[i].value;
    return NULL;
}

/* Applies every corruption of the tensor that is truly named `name` to the attribute reported for it. */
static void corrupt_attr(int decoder, const char *name, rknn_tensor_attr *a)
{
    int i;
    read_corruptions();
    for (i = 0; i < n_corruptions; i++)
        if (corruptions[i].decoder == decoder && strcmp(corruptions[i].tensor, name) == 0)
            set_attr_field(a, corruptions[i].field, corruptions[i].value);
}

/* ------------------------------------------------------------------ the fake runtime */

/* Encoder and decoder contexts share one recording: the decoder's checks need the encoder's step. */
static void *recording;
static int recording_refs;
static uint8_t *recording_model; /* the model file naming the recording: the replay keeps its path for messages */

static void set_attr(rknn_tensor_attr *a, uint32_t index, const char *name, const uint32_t *dims, uint32_t n,
                     uint32_t options)
{
    uint32_t i;
    memset(a, 0, sizeof *a);
    a->index = index;
    strncpy(a->name, name, RKNN_MAX_NAME_LEN - 1);
    a->n_dims = n;
    a->n_elems = 1;
    for (i = 0; i < n; i++)
        a->n_elems *= dims[i];
    a->fmt = n == 4 ? ((options & OPT_NHWC) ? RKNN_TENSOR_NHWC : RKNN_TENSOR_NCHW) : RKNN_TENSOR_UNDEFINED;
    if (n == 4 && (options & OPT_NHWC)) {
        a->dims[0] = dims[0];
        a->dims[1] = dims[2];
        a->dims[2] = dims[3];
        a->dims[3] = dims[1];
    } else {
        memcpy(a->dims, dims, n * sizeof *dims);
    }
    a->type = (options & OPT_FP16) ? RKNN_TENSOR_FLOAT16 : RKNN_TENSOR_FLOAT32;
    a->size = a->n_elems * ((options & OPT_FP16) ? 2 : 4);
}

static int describe(fake *f)
{
    const rkt_dims *d = &f->dims;
    uint32_t hd = d->heads ? d->dim / d->heads : 0, i;
    const uint32_t s_embeds[] = {1, d->src_len, d->dim}, s_mask[] = {1, d->src_len}, s_tok[] = {1, 1, d->dim},
                   s_logits[] = {1, d->vocab + ((f->options & OPT_WIDE_LOGITS) ? 1 : 0)},
                   s_state[] = {d->layers, 1, d->dim}, s_cache[] = {d->layers, d->heads, d->cache_len, hd},
                   s_cmask[] = {1, d->cache_len};
    int tr = d->kind == RKT_TRANSFORMER;
    if (!f->decoder) {
        f->n_in = 2;
        f->n_out = 1;
        set_attr(&f->in[1], 1, "src_embeds", s_embeds, 3, f->options);
        set_attr(&f->in[0], 0, "src_mask_bias", s_mask, 2, f->options);
        set_attr(&f->out[0], 0, "enc_out", s_embeds, 3, f->options);
    } else {
        f->n_in = tr ? 6 : 4;
        f->n_out = tr ? 3 : 2;
        set_attr(&f->in[f->n_in - 1], f->n_in - 1, "tok_embeds", s_tok, 3, f->options);
        set_attr(&f->in[f->n_in - 2], f->n_in - 2, "enc_out", s_embeds, 3, f->options);
        set_attr(&f->in[f->n_in - 3], f->n_in - 3, "src_mask_bias", s_mask, 2, f->options);
        set_attr(&f->out[0], 0, "logits", s_logits, 2, f->options);
        if (tr) {
            set_attr(&f->in[2], 2, "cache_k", s_cache, 4, f->options);
            set_attr(&f->in[1], 1, "cache_v", s_cache, 4, f->options);
            set_attr(&f->in[0], 0, "cache_mask_bias", s_cmask, 2, f->options);
            set_attr(&f->out[1], 1, "new_cache_k", s_cache, 4, f->options);
            set_attr(&f->out[2], 2, "new_cache_v", s_cache, 4, f->options);
        } else {
            set_attr(&f->in[0], 0, "state", s_state, 3, f->options);
            set_attr(&f->out[1], 1, "new_state", s_state, 3, f->options);
        }
    }
    for (i = 0; i < f->n_in; i++)
        if (!(f->in_buf[i] = calloc(f->in[i].n_elems, sizeof(float))))
            return -1;
    for (i = 0; i < f->n_out; i++)
        if (!(f->out_buf[i] = calloc(f->out[i].n_elems, sizeof(float))) ||
            !(f->nchw_out[i] = calloc(f->out[i].n_elems, sizeof(float))))
            return -1;
    return 0;
}

static void destroy(fake *f)
{
    uint32_t i;
    for (i = 0; i < 6; i++)
        free(f->in_buf[i]);
    for (i = 0; i < 3; i++) {
        free(f->out_buf[i]);
        free(f->nchw_out[i]);
    }
    if (recording && --recording_refs == 0) {
        rkt_replay_backend.release(recording);
        recording = NULL;
        free(recording_model);
        recording_model = NULL;
    }
    free(f);
}

int rknn_init(rknn_context *context, void *model, uint32_t size, uint32_t flag, rknn_init_extend *extend)
{
    uint8_t *data;
    size_t n;
    fake *f;
    FILE *probe;
    (void)flag;
    /* Only the return code reports a missing model (rkt_read_file would print its own line). */
    if (size != 0 || extend != NULL || !(probe = fopen((const char *)model, "rb")))
        return RKNN_ERR_PARAM_INVALID;
    fclose(probe);
    if (rkt_read_file((const char *)model, &data, &n))
        return RKNN_ERR_PARAM_INVALID;
    if (n < 17 || memcmp(data, "RKFAKE1\0", 8) != 0 || data[n - 1] != 0 || !(f = calloc(1, sizeof *f))) {
        free(data);
        return RKNN_ERR_MODEL_INVALID;
    }
    f->decoder = rkt_le32(data + 8) == 1;
    f->options = rkt_le32(data + 12);
    if (!recording && (recording = rkt_replay_backend.load((const char *)data + 16, "-")) != NULL) {
        recording_model = data; /* freed with the recording, not before: it holds the path the replay reports */
        data = NULL;
    }
    free(data);
    if (!recording) {
        free(f);
        return RKNN_ERR_MODEL_INVALID;
    }
    recording_refs++;
    rkt_replay_backend.query(recording, &f->dims);
    if (describe(f)) {
        destroy(f);
        return RKNN_ERR_MALLOC_FAIL;
    }
    *context = (rknn_context)(uintptr_t)f;
    return RKNN_SUCC;
}

int rknn_destroy(rknn_context context)
{
    destroy((fake *)(uintptr_t)context);
    return RKNN_SUCC;
}

int rknn_query(rknn_context context, rknn_query_cmd cmd, void *info, uint32_t size)
{
    fake *f = (fake *)(uintptr_t)context;
    if (cmd == RKNN_QUERY_IN_OUT_NUM && size == sizeof(rknn_input_output_num)) {
        rknn_input_output_num *io = info;
        const char *n_in = corrupted(f->decoder, "io", "n_input"), *n_out = corrupted(f->decoder, "io", "n_output");
        io->n_input = n_in ? (uint32_t)strtoll(n_in, NULL, 0) : f->n_in;
        io->n_output = n_out ? (uint32_t)strtoll(n_out, NULL, 0) : f->n_out;
        return RKNN_SUCC;
    }
    if ((cmd == RKNN_QUERY_INPUT_ATTR || cmd == RKNN_QUERY_OUTPUT_ATTR) && size == sizeof(rknn_tensor_attr)) {
        rknn_tensor_attr *a = info;
        int input = cmd == RKNN_QUERY_INPUT_ATTR;
        const rknn_tensor_attr *truth;
        if (a->index >= (input ? f->n_in : f->n_out))
            return RKNN_ERR_PARAM_INVALID;
        truth = input ? &f->in[a->index] : &f->out[a->index];
        *a = *truth;
        corrupt_attr(f->decoder, truth->name, a);
        return RKNN_SUCC;
    }
    return RKNN_ERR_PARAM_INVALID;
}

int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[])
{
    fake *f = (fake *)(uintptr_t)context;
    uint32_t i;
    if (n_inputs != f->n_in)
        return RKNN_ERR_PARAM_INVALID;
    f->in_set = 0;
    for (i = 0; i < n_inputs; i++) {
        const rknn_input *in = &inputs[i];
        const rknn_tensor_attr *a;
        if (in->index >= f->n_in || (f->in_set & (1 << in->index)))
            return RKNN_ERR_INPUT_INVALID;
        a = &f->in[in->index];
        /* The backend hands float32 in ONNX order and lets the runtime convert. */
        if (in->type != RKNN_TENSOR_FLOAT32 || in->pass_through || in->size != a->n_elems * 4 ||
            (a->n_dims == 4 && in->fmt != RKNN_TENSOR_NCHW))
            return RKNN_ERR_INPUT_INVALID;
        memcpy(f->in_buf[in->index], in->buf, in->size);
        f->in_set |= 1 << in->index;
    }
    return RKNN_SUCC;
}

static float *input(fake *f, const char *name)
{
    uint32_t i;
    for (i = 0; i < f->n_in; i++)
        if (strcmp(f->in[i].name, name) == 0)
            return f->in_buf[i];
    return NULL;
}

/* NCHW [N, C, H, W] -> NHWC, the layout the fake claims for 4-D outputs. */
static void to_nhwc(const float *src, float *dst, const uint32_t *nhwc_dims)
{
    size_t n, c, h, w, N = nhwc_dims[0], H = nhwc_dims[1], W = nhwc_dims[2], C = nhwc_dims[3];
    for (n = 0; n < N; n++)
        for (c = 0; c < C; c++)
            for (h = 0; h < H; h++)
                for (w = 0; w < W; w++)
                    dst[((n * H + h) * W + w) * C + c] = src[((n * C + c) * H + h) * W + w];
}

int rknn_run(rknn_context context, rknn_run_extend *extend)
{
    fake *f = (fake *)(uintptr_t)context;
    uint32_t i;
    int rc;
    if (extend != NULL || f->outputs_held || f->in_set != (1 << f->n_in) - 1)
        return RKNN_ERR_PARAM_INVALID; /* previous outputs not released, or inputs missing */
    if (f->decoder && (f->options & OPT_FAIL_RUN) && f->runs == 2)
        return RKNN_ERR_TIMEOUT;
    f->runs++;
    if (!f->decoder) {
        rc = rkt_replay_backend.run_encoder(recording, input(f, "src_embeds"), input(f, "src_mask_bias"),
                                            f->nchw_out[0]);
    } else {
        rkt_step_io io;
        memset(&io, 0, sizeof io);
        io.tok_embeds = input(f, "tok_embeds");
        io.enc_out = input(f, "enc_out");
        io.src_mask_bias = input(f, "src_mask_bias");
        io.state = input(f, "state");
        io.cache_k = input(f, "cache_k");
        io.cache_v = input(f, "cache_v");
        io.cache_mask_bias = input(f, "cache_mask_bias");
        io.logits = f->nchw_out[0];
        io.new_state = io.new_cache_k = f->nchw_out[1];
        io.new_cache_v = f->nchw_out[2];
        rc = rkt_replay_backend.run_decoder(recording, &io);
    }
    if (rc)
        return RKNN_ERR_FAIL;
    for (i = 0; i < f->n_out; i++) {
        if (f->out[i].fmt == RKNN_TENSOR_NHWC)
            to_nhwc(f->nchw_out[i], f->out_buf[i], f->out[i].dims);
        else
            memcpy(f->out_buf[i], f->nchw_out[i], f->out[i].n_elems * sizeof(float));
    }
    return RKNN_SUCC;
}

int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[], rknn_output_extend *extend)
{
    fake *f = (fake *)(uintptr_t)context;
    uint32_t i;
    if (n_outputs != f->n_out || extend != NULL || f->runs == 0)
        return RKNN_ERR_PARAM_INVALID;
    for (i = 0; i < n_outputs; i++) {
        const char *size, *buf;
        const rknn_tensor_attr *a;
        if (outputs[i].index >= f->n_out || !outputs[i].want_float || outputs[i].is_prealloc)
            return RKNN_ERR_OUTPUT_INVALID;
        a = &f->out[outputs[i].index];
        size = corrupted(f->decoder, a->name, "out_size");
        buf = corrupted(f->decoder, a->name, "out_buf");
        outputs[i].buf = buf && strtoll(buf, NULL, 0) == 0 ? NULL : f->out_buf[outputs[i].index];
        outputs[i].size = size ? (uint32_t)strtoll(size, NULL, 0) : a->n_elems * 4;
    }
    f->outputs_held = 1;
    return RKNN_SUCC;
}

int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[])
{
    fake *f = (fake *)(uintptr_t)context;
    (void)outputs;
    if (n_outputs != f->n_out || !f->outputs_held)
        return RKNN_ERR_PARAM_INVALID;
    f->outputs_held = 0;
    return RKNN_SUCC;
}
