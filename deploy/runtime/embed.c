#include "embed.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

enum { HEADER = 24 };

int rkt_embed_load(const char *path, rkt_embed *e)
{
    uint8_t *data;
    size_t size, i, count;
    uint64_t rows, expected;
    memset(e, 0, sizeof *e);
    if (rkt_read_file(path, &data, &size))
        return -1;
    if (size < HEADER || memcmp(data, "RKEMB1\0\0", 8) != 0) {
        free(data);
        return rkt_fail(path, "not an embed.bin (%s)", size < HEADER ? "shorter than its header" : "bad magic");
    }
    e->vocab = rkt_le32(data + 8);
    e->dim = rkt_le32(data + 12);
    e->n_directions = rkt_le32(data + 16);
    e->max_positions = rkt_le32(data + 20);
    /* rows < 3 * 2^32 and dim < 2^32, so rows * dim * 4 can pass 2^64: saturate rather than wrap, or a crafted
       header could match a small file and make the tables far larger than the data read. */
    rows = (uint64_t)e->vocab + e->n_directions + e->max_positions;
    expected = rkt_sat_add(rkt_sat_mul(rkt_sat_mul(rows, e->dim), 4), HEADER);
    if (!e->vocab || !e->dim || !e->n_directions || !e->max_positions || expected != (uint64_t)size) {
        free(data);
        return rkt_fail(path, "%zu bytes, but a [%u, %u] token, [%u, %u] direction and [%u, %u] position table "
                        "take %llu%s", size, e->vocab, e->dim, e->n_directions, e->dim, e->max_positions, e->dim,
                        (unsigned long long)expected, expected == UINT64_MAX ? " or more (64-bit overflow)" : "");
    }
    count = (size - HEADER) / 4; /* == rows * dim, now known to fit in size_t */
    if (!(e->token = rkt_calloc(count, sizeof *e->token, path))) {
        free(data);
        return -1;
    }
    for (i = 0; i < count; i++) {
        e->token[i] = rkt_lef32(data + HEADER + 4 * i);
        if (!isfinite(e->token[i])) {
            free(data);
            rkt_embed_free(e);
            return rkt_fail(path, "value %zu is not finite", i);
        }
    }
    free(data);
    e->direction = e->token + (size_t)e->vocab * e->dim;
    e->position = e->direction + (size_t)e->n_directions * e->dim;
    return 0;
}

void rkt_embed_free(rkt_embed *e)
{
    free(e->token);
    memset(e, 0, sizeof *e);
}

void rkt_embed_row(const rkt_embed *e, uint32_t id, uint32_t dir, uint32_t pos, float *out)
{
    const float *t = e->token + (size_t)id * e->dim, *d = e->direction + (size_t)dir * e->dim,
                *p = e->position + (size_t)pos * e->dim;
    uint32_t i;
    /* Same order of additions as the Python side, so replays compare bit for bit. */
    for (i = 0; i < e->dim; i++)
        out[i] = t[i] + d[i] + p[i];
}
