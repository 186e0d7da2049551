#include "recording.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

static const char *const list_names[] = {"encoder inputs", "encoder outputs", "decoder inputs", "decoder outputs"};

typedef struct {
    const uint8_t *p;
    size_t size, pos;
} cursor;

static int read_u32(cursor *c, uint32_t *v)
{
    if (c->size - c->pos < 4)
        return -1;
    *v = rkt_le32(c->p + c->pos);
    c->pos += 4;
    return 0;
}

/* One tensor list; *floats accumulates the elements of the call it belongs to (offsets follow it). */
static int read_list(rkt_recording *r, cursor *c, int list, uint64_t *floats)
{
    uint32_t n, i, len, d;
    if (read_u32(c, &n) || n == 0 || n > RKT_MAX_IO)
        return rkt_fail(r->path, "%s: the count is missing or not 1 to %d", list_names[list], RKT_MAX_IO);
    r->n[list] = n;
    if (!(r->list[list] = rkt_calloc(n, sizeof *r->list[list], r->path)) ||
        !(r->shapes[list] = rkt_calloc(n, sizeof *r->shapes[list], r->path)))
        return -1;
    for (i = 0; i < n; i++) {
        rkt_rec_tensor *t = &r->list[list][i];
        if (read_u32(c, &len) || len == 0 || len >= sizeof t->name || c->size - c->pos < len ||
            memchr(c->p + c->pos, 0, len))
            return rkt_fail(r->path, "%s: tensor %u has no name of 1 to %zu bytes", list_names[list], i,
                            sizeof t->name - 1);
        memcpy(t->name, c->p + c->pos, len);
        c->pos += len;
        if (read_u32(c, &t->shape.rank) || t->shape.rank == 0 || t->shape.rank > RKT_MAX_RANK)
            return rkt_fail(r->path, "%s: '%s' has no rank of 1 to %d", list_names[list], t->name, RKT_MAX_RANK);
        t->count = 1;
        for (d = 0; d < t->shape.rank; d++) {
            if (read_u32(c, &t->shape.dims[d]) || t->shape.dims[d] == 0)
                return rkt_fail(r->path, "%s: '%s' dimension %u is missing or 0", list_names[list], t->name, d);
            t->count = rkt_sat_mul(t->count, t->shape.dims[d]);
        }
        t->shape.name = t->name;
        r->shapes[list][i] = t->shape;
        t->offset = *floats;
        *floats = rkt_sat_add(*floats, t->count);
    }
    return 0;
}

static int parse(rkt_recording *r, const uint8_t *data, size_t size)
{
    cursor c = {data, size, 8};
    uint64_t total, i, n_floats;
    int list;
    if (size < 12 || memcmp(data, "RKRPL2\0\0", 8) != 0)
        return rkt_fail(r->path, "not a replay recording (%s)", size < 12 ? "too short" : "bad magic");
    if (read_u32(&c, &r->n_steps) || r->n_steps == 0)
        return rkt_fail(r->path, "the recording has no decoder steps");
    for (list = 0; list < 4; list++)
        if (read_list(r, &c, list, list < RKT_DEC_IN ? &r->encoder_floats : &r->step_floats))
            return -1;
    total = rkt_sat_add(r->encoder_floats, rkt_sat_mul(r->n_steps, r->step_floats));
    if ((size - c.pos) % 4 || total != (size - c.pos) / 4)
        return rkt_fail(r->path, "%zu bytes of data do not match the tensor lists' %llu%s floats", size - c.pos,
                        (unsigned long long)total, total == UINT64_MAX ? " or more" : "");
    n_floats = (size - c.pos) / 4;
    if (!(r->data = rkt_calloc((size_t)n_floats, sizeof *r->data, r->path)))
        return -1;
    for (i = 0; i < n_floats; i++)
        r->data[i] = rkt_lef32(data + c.pos + 4 * i);
    return 0;
}

int rkt_recording_load(const char *path, rkt_recording *r)
{
    uint8_t *data;
    size_t size;
    int rc;
    memset(r, 0, sizeof *r);
    r->path = path;
    if (rkt_read_file(path, &data, &size))
        return -1;
    rc = parse(r, data, size);
    free(data);
    if (rc)
        rkt_recording_free(r);
    return rc;
}

void rkt_recording_free(rkt_recording *r)
{
    int list;
    for (list = 0; list < 4; list++) {
        free(r->list[list]);
        free(r->shapes[list]);
    }
    free(r->data);
    memset(r, 0, sizeof *r);
}

rkt_model_shapes rkt_recording_model(const rkt_recording *r, int graph)
{
    int in = graph ? RKT_DEC_IN : RKT_ENC_IN;
    rkt_model_shapes m;
    m.path = r->path;
    m.n_in = r->n[in];
    m.n_out = r->n[in + 1];
    m.in = r->shapes[in];
    m.out = r->shapes[in + 1];
    return m;
}

const float *rkt_recording_tensor(const rkt_recording *r, int list, uint32_t index, uint32_t step)
{
    const float *call = list < RKT_DEC_IN ? r->data : r->data + r->encoder_floats + (size_t)step * r->step_floats;
    return call + r->list[list][index].offset; /* outputs' offsets follow their call's inputs */
}
