#define _POSIX_C_SOURCE 200809L /* strnlen, clock_gettime */
/* A fake librknnrt.so for tests: the RKNN C API served from a replay recording (../recording.h), built as a shared
   library and loaded by the runner through dlopen exactly as the board's is. Never part of a board build.

   It checks every call's arguments against the model's tensor attributes (contexts and buffers it handed out,
   rknn_set_io_mem's attribute against the one it reported, every tensor bound before rknn_run), and at each rknn_run
   reads every input from its zero-copy buffer in the reported type and layout, compares it with the recording
   (relative 1e-6) and writes the recorded outputs back in the outputs' types and layouts. A runner that feeds a wrong
   token, mask, cache shift or quantization fails with the step and tensor named. Buffers start filled with garbage,
   so what the runner forgets to set shows up the same way.

   A fake model file: "RKFAKE2\0", u32 role (0 encoder, 1 decoder), u32 options, the recording's path
   (NUL-terminated), u32 n_specs, then per spec: the tensor's name (NUL-terminated), u32 type, u32 qnt_type,
   f32 scale, i32 zp, i32 fl (rknn_tensor_attr's meaning); tensors without a spec are float32.
   Options: 1 = 4-D tensors in NHWC (else NCHW); 2 = NHWC rows padded (w_stride = W + 3); 4 = the decoder's third
   rknn_run fails with RKNN_ERR_TIMEOUT; 8 = logits reported one wider than the recording; 16 = RKNN_QUERY_PERF_RUN
   unsupported. Inputs are reported in reverse order, so the runner must bind tensors by name.

   FAKE_RKNN_CORRUPT makes the fake report bad values, so tests can check that the runner rejects them with an error
   naming the tensor and attribute. A comma-separated list of MODEL.TENSOR.FIELD=VALUE, MODEL being enc or dec:
     MODEL.io.n_input / MODEL.io.n_output      what rknn_query(IN_OUT_NUM) reports
     MODEL.TENSOR.F, F one of index n_dims dims0..dims15 n_elems size fmt type qnt_type zp fl scale w_stride
       size_with_stride name                   that tensor's rknn_query(INPUT_ATTR / OUTPUT_ATTR)
     MODEL.TENSOR.set_io_mem=CODE              rknn_set_io_mem of that tensor returns CODE
     MODEL.mem.null=1 / MODEL.mem.short=1      rknn_create_mem returns NULL / a buffer one byte short
     MODEL.sdk.fail=1                          rknn_query(SDK_VERSION) fails
   VALUE is an integer (C syntax: 0x.., negative), a float for scale (nan, inf), a string for name. Only what is
   reported changes; the fake keeps running on its true attributes. A malformed list exits with status 97.

   FAKE_RKNN_STATS=PATH appends one JSON line per destroyed context: its call counts and, per decoder input, in how
   many runs after a sentence's first step its buffer changed (0 for what the runner must set once per sentence). */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../recording.h"
#include "../rknn_api_min.h"
#include "../tensor.h"
#include "../util.h"

enum { OPT_NHWC = 1, OPT_PADDED = 2, OPT_FAIL_RUN = 4, OPT_WIDE_LOGITS = 8, OPT_NO_PERF = 16 };
enum { MAX_CONTEXTS = 8, MAX_SPECS = 128 };

typedef struct fake fake;

typedef struct {
    rknn_tensor_mem mem;
    fake *owner;
} fake_mem;

typedef struct {
    char name[64];
    rknn_tensor_type type;
    rknn_tensor_qnt_type qnt_type;
    float scale;
    int32_t zp;
    int8_t fl;
} spec;

struct fake {
    int decoder;
    uint32_t options, n_in, n_out; /* tensors: inputs 0..n_in-1, then outputs */
    rknn_tensor_attr *attr;        /* as reported, before corruption */
    uint32_t *rec;                 /* tensor -> index in the recording's list */
    fake_mem **bound;
    rkt_tensor *view;
    unsigned char **previous; /* decoder inputs as the last run saw them */
    uint64_t *changed;
    float *scratch;
    uint32_t live_mems, runs, set_io_mem, create_mem, destroy_mem;
    int64_t last_run_us;
};

static fake *contexts[MAX_CONTEXTS];

/* ------------------------------------------------------------------ FAKE_RKNN_CORRUPT */

enum { MAX_CORRUPTIONS = 32 };

typedef struct {
    int decoder;
    char tensor[RKNN_MAX_NAME_LEN], field[24], value[64];
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
    {"w_stride", offsetof(rknn_tensor_attr, w_stride)},
    {"size_with_stride", offsetof(rknn_tensor_attr, size_with_stride)},
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
    if (strcmp(c->tensor, "mem") == 0)
        return strcmp(c->field, "null") == 0 || strcmp(c->field, "short") == 0;
    if (strcmp(c->tensor, "sdk") == 0)
        return strcmp(c->field, "fail") == 0;
    return strcmp(c->field, "set_io_mem") == 0 || set_attr_field(&scratch, c->field, c->value) == 0;
}

static void read_corruptions(void)
{
    const char *spec_text = getenv("FAKE_RKNN_CORRUPT");
    if (n_corruptions >= 0)
        return;
    n_corruptions = 0;
    while (spec_text && *spec_text) {
        const char *end = strchr(spec_text, ',');
        size_t len = end ? (size_t)(end - spec_text) : strlen(spec_text);
        char item[400], model[8];
        corruption *c = &corruptions[n_corruptions];
        if (n_corruptions == MAX_CORRUPTIONS || len >= sizeof item)
            goto bad;
        memcpy(item, spec_text, len);
        item[len] = '\0';
        if (sscanf(item, "%7[^.].%255[^.].%23[^=]=%63s", model, c->tensor, c->field, c->value) != 4 ||
            (strcmp(model, "enc") && strcmp(model, "dec")) || !known_field(c))
            goto bad;
        c->decoder = strcmp(model, "dec") == 0;
        n_corruptions++;
        spec_text += len + (end != NULL);
        continue;
    bad:
        fprintf(stderr, "fake_rknnrt: FAKE_RKNN_CORRUPT: cannot use '%.*s' (MODEL.TENSOR.FIELD=VALUE)\n", (int)len,
                spec_text);
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

/* The attribute of tensor i as rknn_query reports it: the truth with every corruption of its name applied. */
static rknn_tensor_attr reported(const fake *f, uint32_t i)
{
    rknn_tensor_attr a = f->attr[i];
    int k;
    read_corruptions();
    for (k = 0; k < n_corruptions; k++)
        if (corruptions[k].decoder == f->decoder && strcmp(corruptions[k].tensor, f->attr[i].name) == 0 &&
            strcmp(corruptions[k].field, "set_io_mem") != 0)
            set_attr_field(&a, corruptions[k].field, corruptions[k].value);
    return a;
}

/* ------------------------------------------------------------------ the recording, shared by both contexts */

static rkt_recording recording;
static int recording_refs;
static char recording_path[1024];
static uint32_t decoder_step; /* the next decoder call of the recording; an encoder run starts a sentence */

static const char *graph_name(const fake *f)
{
    return f->decoder ? "decoder" : "encoder";
}

static uint32_t element_size(rknn_tensor_type type)
{
    return type == RKNN_TENSOR_FLOAT32 ? 4 : type == RKNN_TENSOR_FLOAT16 || type == RKNN_TENSOR_INT16 ? 2 : 1;
}

static rkt_dtype dtype_of(rknn_tensor_type type)
{
    switch (type) {
    case RKNN_TENSOR_FLOAT16: return RKT_F16;
    case RKNN_TENSOR_INT8: return RKT_I8;
    case RKNN_TENSOR_UINT8: return RKT_U8;
    case RKNN_TENSOR_INT16: return RKT_I16;
    default: return RKT_F32;
    }
}

/* The true attribute of one tensor: the recording's name and shape, the spec's type, the options' layout. */
static void describe(fake *f, uint32_t i, uint32_t index, const rkt_rec_tensor *t, const spec *specs,
                     uint32_t n_specs)
{
    rknn_tensor_attr *a = &f->attr[i];
    const uint32_t *d = t->shape.dims;
    uint32_t k;
    memset(a, 0, sizeof *a);
    a->index = index;
    strncpy(a->name, t->name, RKNN_MAX_NAME_LEN - 1);
    a->n_dims = t->shape.rank;
    memcpy(a->dims, d, t->shape.rank * sizeof *d);
    a->n_elems = (uint32_t)t->count;
    a->type = RKNN_TENSOR_FLOAT32;
    for (k = 0; k < n_specs; k++)
        if (strcmp(specs[k].name, t->name) == 0) {
            a->type = specs[k].type;
            a->qnt_type = specs[k].qnt_type;
            a->scale = specs[k].scale;
            a->zp = specs[k].zp;
            a->fl = specs[k].fl;
        }
    a->size = a->size_with_stride = a->n_elems * element_size(a->type);
    a->fmt = a->n_dims == 4 ? RKNN_TENSOR_NCHW : RKNN_TENSOR_UNDEFINED;
    if (a->n_dims == 4 && (f->options & OPT_NHWC)) { /* [N, C, H, W] -> [N, H, W, C] */
        a->fmt = RKNN_TENSOR_NHWC;
        a->dims[1] = d[2];
        a->dims[2] = d[3];
        a->dims[3] = d[1];
        a->w_stride = d[3] + ((f->options & OPT_PADDED) ? 3 : 0);
        a->size_with_stride = d[0] * d[2] * a->w_stride * d[1] * element_size(a->type);
    }
    if (f->decoder && i >= f->n_in && strcmp(a->name, "logits") == 0 && (f->options & OPT_WIDE_LOGITS)) {
        a->dims[1]++;
        a->n_elems++;
        a->size = a->size_with_stride = a->n_elems * element_size(a->type);
    }
}

static int read_specs(const uint8_t *data, size_t n, size_t at, spec *specs, uint32_t *n_specs)
{
    uint32_t k;
    if (n - at < 4 || (*n_specs = rkt_le32(data + at)) > MAX_SPECS)
        return -1;
    at += 4;
    for (k = 0; k < *n_specs; k++) {
        const char *name = (const char *)data + at;
        size_t len = strnlen(name, n - at);
        if (len == n - at || len >= sizeof specs[k].name || n - at - len - 1 < 20)
            return -1;
        memcpy(specs[k].name, name, len + 1);
        at += len + 1;
        specs[k].type = (rknn_tensor_type)rkt_le32(data + at);
        specs[k].qnt_type = (rknn_tensor_qnt_type)rkt_le32(data + at + 4);
        specs[k].scale = rkt_lef32(data + at + 8);
        specs[k].zp = (int32_t)rkt_le32(data + at + 12);
        specs[k].fl = (int8_t)rkt_le32(data + at + 16);
        at += 20;
    }
    return at == n ? 0 : -1;
}

static void destroy(fake *f)
{
    uint32_t i;
    for (i = 0; i < MAX_CONTEXTS; i++)
        if (contexts[i] == f)
            contexts[i] = NULL;
    for (i = 0; f->previous && i < f->n_in; i++)
        free(f->previous[i]);
    free(f->attr);
    free(f->rec);
    free(f->bound);
    free(f->view);
    free(f->previous);
    free(f->changed);
    free(f->scratch);
    free(f);
    if (--recording_refs == 0)
        rkt_recording_free(&recording);
}

/* The context's tensors from the recording: inputs reversed, then outputs. */
static int build(fake *f)
{
    int in_list = f->decoder ? RKT_DEC_IN : RKT_ENC_IN;
    uint32_t i, total, largest = 0;
    f->n_in = recording.n[in_list];
    f->n_out = recording.n[in_list + 1];
    total = f->n_in + f->n_out;
    if (!(f->attr = calloc(total, sizeof *f->attr)) || !(f->rec = calloc(total, sizeof *f->rec)) ||
        !(f->bound = calloc(total, sizeof *f->bound)) || !(f->view = calloc(total, sizeof *f->view)) ||
        !(f->previous = calloc(f->n_in, sizeof *f->previous)) || !(f->changed = calloc(f->n_in, sizeof *f->changed)))
        return -1;
    for (i = 0; i < total; i++) {
        f->rec[i] = i < f->n_in ? f->n_in - 1 - i : i - f->n_in;
        if (recording.list[in_list + (i >= f->n_in)][f->rec[i]].count > largest)
            largest = (uint32_t)recording.list[in_list + (i >= f->n_in)][f->rec[i]].count;
    }
    return (f->scratch = calloc(largest + 1, sizeof *f->scratch)) ? 0 : -1;
}

/* ------------------------------------------------------------------ the API */

static fake *context(rknn_context ctx)
{
    int i;
    for (i = 0; i < MAX_CONTEXTS; i++)
        if (contexts[i] && (rknn_context)(uintptr_t)contexts[i] == ctx)
            return contexts[i];
    return NULL;
}

int rknn_init(rknn_context *context_out, void *model, uint32_t size, uint32_t flag, rknn_init_extend *extend)
{
    spec specs[MAX_SPECS];
    uint32_t n_specs, i, role, options;
    uint8_t *data;
    size_t n, path_len;
    fake *f;
    FILE *probe;
    /* The runner passes a path (size 0), no flags, no extension. */
    if (!context_out || size != 0 || flag != 0 || extend != NULL || !(probe = fopen((const char *)model, "rb")))
        return RKNN_ERR_PARAM_INVALID;
    fclose(probe);
    if (rkt_read_file((const char *)model, &data, &n))
        return RKNN_ERR_PARAM_INVALID;
    path_len = n > 16 ? strnlen((const char *)data + 16, n - 16) : 0;
    if (n < 17 || memcmp(data, "RKFAKE2\0", 8) != 0 || path_len == n - 16 || path_len >= sizeof recording_path ||
        read_specs(data, n, 16 + path_len + 1, specs, &n_specs)) {
        free(data);
        return RKNN_ERR_MODEL_INVALID;
    }
    role = rkt_le32(data + 8);
    options = rkt_le32(data + 12);
    if (recording_refs == 0) {
        if (rkt_recording_load((const char *)data + 16, &recording)) {
            free(data);
            return RKNN_ERR_MODEL_INVALID;
        }
        snprintf(recording_path, sizeof recording_path, "%s", (const char *)data + 16);
        recording.path = recording_path; /* the loader keeps the pointer it was given */
    } else if (strcmp(recording_path, (const char *)data + 16) != 0) {
        fprintf(stderr, "fake_rknnrt: %s names another recording than the model loaded first\n", (const char *)model);
        free(data);
        return RKNN_ERR_MODEL_INVALID;
    }
    free(data);
    recording_refs++;
    if (!(f = calloc(1, sizeof *f))) {
        if (--recording_refs == 0)
            rkt_recording_free(&recording);
        return RKNN_ERR_MALLOC_FAIL;
    }
    f->decoder = role == 1;
    f->options = options;
    if (build(f)) {
        destroy(f);
        return RKNN_ERR_MALLOC_FAIL;
    }
    for (i = 0; i < f->n_in + f->n_out; i++)
        describe(f, i, i < f->n_in ? i : i - f->n_in,
                 &recording.list[(f->decoder ? RKT_DEC_IN : RKT_ENC_IN) + (i >= f->n_in)][f->rec[i]], specs, n_specs);
    for (i = 0; i < MAX_CONTEXTS && contexts[i]; i++)
        ;
    if (i == MAX_CONTEXTS) {
        destroy(f);
        return RKNN_ERR_MALLOC_FAIL;
    }
    contexts[i] = f;
    *context_out = (rknn_context)(uintptr_t)f;
    return RKNN_SUCC;
}

static void write_stats(const fake *f)
{
    const char *path = getenv("FAKE_RKNN_STATS");
    FILE *out;
    uint32_t i;
    if (!path || !*path || !(out = fopen(path, "a")))
        return;
    fprintf(out, "{\"model\": \"%s\", \"runs\": %u, \"create_mem\": %u, \"destroy_mem\": %u, \"set_io_mem\": %u, "
                 "\"tensors\": %u, \"changed\": {", graph_name(f), f->runs, f->create_mem, f->destroy_mem,
            f->set_io_mem, f->n_in + f->n_out);
    for (i = 0; i < f->n_in; i++)
        fprintf(out, "%s\"%s\": %llu", i ? ", " : "", f->attr[i].name, (unsigned long long)f->changed[i]);
    fprintf(out, "}}\n");
    fclose(out);
}

int rknn_destroy(rknn_context ctx)
{
    fake *f = context(ctx);
    if (!f)
        return RKNN_ERR_CTX_INVALID;
    if (f->live_mems) /* buffers belong to their context: the runner destroys them first */
        return RKNN_ERR_PARAM_INVALID;
    write_stats(f);
    destroy(f);
    return RKNN_SUCC;
}

int rknn_query(rknn_context ctx, rknn_query_cmd cmd, void *info, uint32_t size)
{
    fake *f = context(ctx);
    if (!f || !info)
        return RKNN_ERR_CTX_INVALID;
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
        if (a->index >= (input ? f->n_in : f->n_out))
            return RKNN_ERR_PARAM_INVALID;
        *a = reported(f, input ? a->index : f->n_in + a->index);
        return RKNN_SUCC;
    }
    if (cmd == RKNN_QUERY_SDK_VERSION && size == sizeof(rknn_sdk_version)) {
        rknn_sdk_version *v = info;
        if (corrupted(f->decoder, "sdk", "fail"))
            return RKNN_ERR_FAIL;
        snprintf(v->api_version, sizeof v->api_version, "2.5.0 (fake_rknnrt)");
        snprintf(v->drv_version, sizeof v->drv_version, "0.0.0 (fake)");
        return RKNN_SUCC;
    }
    if (cmd == RKNN_QUERY_PERF_RUN && size == sizeof(rknn_perf_run)) {
        if ((f->options & OPT_NO_PERF) || f->runs == 0)
            return RKNN_ERR_PARAM_INVALID;
        ((rknn_perf_run *)info)->run_duration = f->last_run_us;
        return RKNN_SUCC;
    }
    return RKNN_ERR_PARAM_INVALID;
}

rknn_tensor_mem *rknn_create_mem(rknn_context ctx, uint32_t size)
{
    fake *f = context(ctx);
    fake_mem *m;
    if (!f || size == 0 || size > (1u << 30) || corrupted(f->decoder, "mem", "null") || !(m = calloc(1, sizeof *m)))
        return NULL;
    if (!(m->mem.virt_addr = malloc(size))) {
        free(m);
        return NULL;
    }
    memset(m->mem.virt_addr, 0xA5, size); /* garbage: whatever the runner does not set fails the input checks */
    m->mem.size = corrupted(f->decoder, "mem", "short") ? size - 1 : size;
    m->mem.priv_data = m;
    m->owner = f;
    f->live_mems++;
    f->create_mem++;
    return &m->mem;
}

/* A buffer this context handed out and has not taken back. */
static fake_mem *owned(const fake *f, rknn_tensor_mem *mem)
{
    return mem && mem->priv_data == (void *)mem && ((fake_mem *)mem)->owner == f ? (fake_mem *)mem : NULL;
}

int rknn_destroy_mem(rknn_context ctx, rknn_tensor_mem *mem)
{
    fake *f = context(ctx);
    fake_mem *m = f ? owned(f, mem) : NULL;
    uint32_t i;
    if (!m)
        return RKNN_ERR_PARAM_INVALID;
    for (i = 0; i < f->n_in + f->n_out; i++)
        if (f->bound[i] == m)
            f->bound[i] = NULL;
    m->mem.priv_data = NULL;
    free(m->mem.virt_addr);
    free(m);
    f->live_mems--;
    f->destroy_mem++;
    return RKNN_SUCC;
}

static int same_attr(const rknn_tensor_attr *a, const rknn_tensor_attr *b)
{
    return a->index == b->index && a->n_dims == b->n_dims && memcmp(a->dims, b->dims, sizeof a->dims) == 0 &&
           a->n_elems == b->n_elems && a->fmt == b->fmt && a->type == b->type && a->qnt_type == b->qnt_type &&
           a->zp == b->zp && a->fl == b->fl && (a->scale == b->scale || (isnan(a->scale) && isnan(b->scale))) &&
           a->w_stride == b->w_stride;
}

int rknn_set_io_mem(rknn_context ctx, rknn_tensor_mem *mem, rknn_tensor_attr *attr)
{
    fake *f = context(ctx);
    fake_mem *m = f ? owned(f, mem) : NULL;
    rknn_tensor_attr want;
    const rkt_rec_tensor *t;
    const char *code;
    uint32_t i;
    if (!f)
        return RKNN_ERR_CTX_INVALID;
    if (!m || !attr)
        return RKNN_ERR_PARAM_INVALID;
    for (i = 0; i < f->n_in + f->n_out && strcmp(f->attr[i].name, attr->name) != 0; i++)
        ;
    if (i == f->n_in + f->n_out)
        return RKNN_ERR_PARAM_INVALID;
    if ((code = corrupted(f->decoder, f->attr[i].name, "set_io_mem")) != NULL)
        return (int)strtol(code, NULL, 0);
    want = reported(f, i);
    /* The model's own type and layout, converted by nobody: what the runner's zero-copy buffers hold. */
    if (!same_attr(attr, &want) || attr->pass_through != 0 ||
        mem->size < (want.size > want.size_with_stride ? want.size : want.size_with_stride))
        return i < f->n_in ? RKNN_ERR_INPUT_INVALID : RKNN_ERR_OUTPUT_INVALID;
    t = &recording.list[(f->decoder ? RKT_DEC_IN : RKT_ENC_IN) + (i >= f->n_in)][f->rec[i]];
    memset(&f->view[i], 0, sizeof f->view[i]);
    f->view[i].data = mem->virt_addr;
    f->view[i].dtype = dtype_of(want.type);
    f->view[i].scale = want.qnt_type == RKNN_TENSOR_QNT_DFP ? ldexpf(1.0f, -want.fl) : want.scale;
    f->view[i].zp = want.qnt_type == RKNN_TENSOR_QNT_DFP ? 0 : want.zp;
    f->view[i].nhwc = want.fmt == RKNN_TENSOR_NHWC && want.n_dims == 4;
    rkt_tensor_layout(&f->view[i], t->shape.dims, t->shape.rank, want.w_stride);
    f->bound[i] = m;
    f->set_io_mem++;
    return RKNN_SUCC;
}

/* Input i against the recording; a changed buffer after a sentence's first step is counted. */
static int check_input(fake *f, uint32_t i, uint32_t step)
{
    const float *want = rkt_recording_tensor(&recording, f->decoder ? RKT_DEC_IN : RKT_ENC_IN, f->rec[i], step);
    uint64_t k, n = rkt_tensor_count(&f->view[i]);
    rkt_tensor_load(&f->view[i], f->scratch);
    for (k = 0; k < n; k++)
        if (!(fabsf(f->scratch[k] - want[k]) <= 1e-6f * fmaxf(1.0f, fabsf(want[k])))) {
            fprintf(stderr, "fake_rknnrt: %s step %u: input '%s'[%llu] is %g, the recording has %g\n", graph_name(f),
                    step, f->attr[i].name, (unsigned long long)k, (double)f->scratch[k], (double)want[k]);
            return -1;
        }
    if (f->decoder) {
        if (step > 0 && memcmp(f->previous[i], f->view[i].data, f->view[i].bytes) != 0)
            f->changed[i]++;
        if (!f->previous[i] && !(f->previous[i] = malloc(f->view[i].bytes)))
            return -1;
        memcpy(f->previous[i], f->view[i].data, f->view[i].bytes);
    }
    return 0;
}

int rknn_run(rknn_context ctx, rknn_run_extend *extend)
{
    fake *f = context(ctx);
    uint32_t i, step = f && f->decoder ? decoder_step : 0;
    struct timespec t0, t1;
    if (!f)
        return RKNN_ERR_CTX_INVALID;
    if (extend != NULL)
        return RKNN_ERR_PARAM_INVALID;
    for (i = 0; i < f->n_in + f->n_out; i++)
        if (!f->bound[i])
            return i < f->n_in ? RKNN_ERR_INPUT_INVALID : RKNN_ERR_OUTPUT_INVALID;
    if (f->decoder && ((f->options & OPT_FAIL_RUN) && f->runs == 2))
        return RKNN_ERR_TIMEOUT;
    if (f->decoder && step >= recording.n_steps) {
        fprintf(stderr, "fake_rknnrt: decoder step %u, the recording has %u\n", step, recording.n_steps);
        return RKNN_ERR_FAIL;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (i = 0; i < f->n_in; i++)
        if (check_input(f, i, step))
            return RKNN_ERR_FAIL;
    for (i = f->n_in; i < f->n_in + f->n_out; i++)
        rkt_tensor_store(&f->view[i], rkt_recording_tensor(&recording, f->decoder ? RKT_DEC_OUT : RKT_ENC_OUT,
                                                           f->rec[i], step));
    decoder_step = f->decoder ? step + 1 : 0;
    f->runs++;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    f->last_run_us = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000 + (t1.tv_nsec - t0.tv_nsec) / 1000;
    return RKNN_SUCC;
}
