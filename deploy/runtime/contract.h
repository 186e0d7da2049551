/* docs/CONTRACTS.md's graphs as the runner binds them: every tensor found by name, its shape checked, the static
   sizes read off a few of them. Shared by the rknn backend (shapes from rknn_query) and the replay backend (shapes
   from the recording). */
#ifndef RKT_CONTRACT_H
#define RKT_CONTRACT_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"

#define RKT_MAX_LAYERS 16
#define RKT_MAX_RANK 4
#define RKT_MAX_IO (3 + 4 * RKT_MAX_LAYERS) /* the transformer step's inputs at RKT_MAX_LAYERS */

typedef struct {
    const char *name;
    uint32_t rank;
    uint32_t dims[RKT_MAX_RANK]; /* NCHW order */
} rkt_shape;

/* One model's inputs and outputs, in the model's own order. */
typedef struct {
    const char *path;
    uint32_t n_in, n_out;
    const rkt_shape *in, *out;
} rkt_model_shapes;

/* Where each contract tensor sits among its model's inputs or outputs. Per layer l: cross[2l], cross[2l+1] are
   cross_k_l, cross_v_l; carried_in / carried_out[2l], [2l+1] are self_k_l, self_v_l / step_k_l, step_v_l
   (transformer), carried_in / carried_out[l] are state_l / new_state_l (recurrent). */
typedef struct {
    rkt_dims dims;
    uint32_t n_carried; /* 2L or L */
    uint32_t enc_src_embeds, enc_src_mask, enc_cross[2 * RKT_MAX_LAYERS];
    uint32_t tok_embeds, src_mask, cross[2 * RKT_MAX_LAYERS], self_mask, carried_in[2 * RKT_MAX_LAYERS];
    uint32_t logits, carried_out[2 * RKT_MAX_LAYERS];
} rkt_contract;

/* "[a, b, c]" into buf. */
void rkt_shape_str(char *buf, size_t size, const uint32_t *dims, uint32_t rank);

/* Finds and checks every tensor; prints what does not fit (model, tensor, shape) and returns -1. */
int rkt_contract_bind(const rkt_model_shapes *encoder, const rkt_model_shapes *decoder, rkt_contract *c);

#endif
