/* embed.bin (docs/CONTRACTS.md): the token, direction and position tables the runner sums on the CPU. */
#ifndef RKT_EMBED_H
#define RKT_EMBED_H

#include <stdint.h>

typedef struct {
    uint32_t vocab, dim, n_directions, max_positions;
    float *token;     /* [vocab, dim], rows already scaled by sqrt(dim) */
    float *direction; /* [n_directions, dim] */
    float *position;  /* [max_positions, dim] */
} rkt_embed;

/* Loads and validates the file: magic, exact size for the header's shape, finite values. */
int rkt_embed_load(const char *path, rkt_embed *e);
void rkt_embed_free(rkt_embed *e);

/* out[dim] = token[id] + direction[dir] + position[pos]; the caller has checked the three indices. */
void rkt_embed_row(const rkt_embed *e, uint32_t id, uint32_t dir, uint32_t pos, float *out);

#endif
