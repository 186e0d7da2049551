/* A tensor in a model's own type and layout (what rknn_query reports), viewed from float32 NCHW values.

   The runner keeps every input and output in the runtime's zero-copy buffers in the model's type (float32, float16,
   int8/uint8/int16 with affine or DFP quantization) and layout, so per step it converts only what changes (one
   embedding row, one mask entry, the step's keys and values) and shifts caches with memmove where they lie. */
#ifndef RKT_TENSOR_H
#define RKT_TENSOR_H

#include <stddef.h>
#include <stdint.h>

typedef enum { RKT_F32, RKT_F16, RKT_I8, RKT_U8, RKT_I16 } rkt_dtype;

typedef struct {
    void *data;
    rkt_dtype dtype;
    float scale;      /* integer types: value = (q - zp) * scale (DFP: scale 2^-fl, zp 0) */
    int32_t zp;
    uint32_t shape[4]; /* NCHW order, rank < 4 padded with leading 1s */
    int nhwc;          /* 4-D tensors only: laid out [N, H, W, C] */
    uint32_t w_stride; /* NHWC: elements from one W row to the next (>= W: the runtime may pad it) */
    size_t bytes;      /* what the layout spans */
} rkt_tensor;

/* Bytes of one element. */
size_t rkt_dtype_size(rkt_dtype t);

/* Fills shape, w_stride and bytes from a shape of rank 1-4 (NCHW order); data, dtype, scale, zp and nhwc are the
   caller's. w_stride 0 means W. */
void rkt_tensor_layout(rkt_tensor *t, const uint32_t *shape, uint32_t rank, uint32_t w_stride);

uint64_t rkt_tensor_count(const rkt_tensor *t);

/* IEEE half precision, round to nearest even, as numpy's float16. */
uint16_t rkt_float_to_half(float f);
float rkt_half_to_float(uint16_t h);

/* Whole tensors from / to float32 in NCHW order. */
void rkt_tensor_store(const rkt_tensor *t, const float *nchw);
void rkt_tensor_load(const rkt_tensor *t, float *nchw);
/* Every element set to v. */
void rkt_tensor_fill(const rkt_tensor *t, float v);
/* One element, by its NCHW index. */
void rkt_tensor_set(const rkt_tensor *t, uint64_t index, float v);

/* dst = src for tensors of one shape: a memcpy when their types, quantization and layouts agree, else element by
   element through float. */
void rkt_tensor_copy(const rkt_tensor *dst, const rkt_tensor *src);

/* A self-attention cache [1, H, P, hd] drops its oldest position and takes the step's key or value [1, H, 1, hd] as
   its last: one memmove in the cache's own layout, then H * hd elements written. */
void rkt_cache_push(const rkt_tensor *cache, const rkt_tensor *step);

/* Index of the first largest of the first n elements (as torch.argmax), compared in the tensor's own type;
   -1 when one is NaN. */
int rkt_tensor_argmax(const rkt_tensor *t, uint32_t n, uint32_t *best);

#endif
