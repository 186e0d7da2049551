/* Replay recordings (RKRPL2): one sentence's graph calls, every input and output by name, as the Python greedy
   loop made them (deploy/replay.py writes them). The replay backend and the test runtime test/fake_rknnrt.c read
   them; the file is treated as untrusted.

   Little-endian:
     magic "RKRPL2\0\0"; u32 n_steps
     four tensor lists, in this order: encoder inputs, encoder outputs, decoder inputs, decoder outputs; each is
       u32 count (1 to RKT_MAX_IO), then per tensor: u32 name length (1-63), the name, u32 rank (1-4), u32 dims[rank]
     float32 data: the encoder call (its inputs, then its outputs, each in list order), then n_steps decoder calls
       (each: its inputs, then its outputs) */
#ifndef RKT_RECORDING_H
#define RKT_RECORDING_H

#include <stdint.h>

#include "contract.h"

enum { RKT_ENC_IN, RKT_ENC_OUT, RKT_DEC_IN, RKT_DEC_OUT };

typedef struct {
    char name[64];
    rkt_shape shape;  /* shape.name points at name */
    uint64_t count;   /* elements */
    uint64_t offset;  /* floats from the start of its call's record */
} rkt_rec_tensor;

typedef struct {
    const char *path;
    uint32_t n_steps;
    uint32_t n[4];
    rkt_rec_tensor *list[4];
    rkt_shape *shapes[4]; /* the lists' shapes, for rkt_contract_bind */
    uint64_t encoder_floats, step_floats;
    float *data;
} rkt_recording;

int rkt_recording_load(const char *path, rkt_recording *r);
void rkt_recording_free(rkt_recording *r);

/* A list's shapes as the contract binds them (graph 0 encoder, 1 decoder). */
rkt_model_shapes rkt_recording_model(const rkt_recording *r, int graph);

/* The data of tensor `index` of a list in the encoder call (step ignored) or decoder call `step` (< n_steps). */
const float *rkt_recording_tensor(const rkt_recording *r, int list, uint32_t index, uint32_t step);

#endif
