#include "tensor.h"

#include <math.h>
#include <string.h>

size_t rkt_dtype_size(rkt_dtype t)
{
    return t == RKT_F32 ? 4 : t == RKT_F16 || t == RKT_I16 ? 2 : 1;
}

void rkt_tensor_layout(rkt_tensor *t, const uint32_t *shape, uint32_t rank, uint32_t w_stride)
{
    uint32_t i;
    for (i = 0; i < 4; i++)
        t->shape[i] = i < 4 - rank ? 1 : shape[i - (4 - rank)];
    t->w_stride = t->nhwc && w_stride > t->shape[3] ? w_stride : t->shape[3];
    t->bytes = (size_t)t->shape[0] * t->shape[1] * t->shape[2] * t->w_stride * rkt_dtype_size(t->dtype);
}

uint64_t rkt_tensor_count(const rkt_tensor *t)
{
    return (uint64_t)t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3];
}

uint16_t rkt_float_to_half(float f)
{
    uint32_t x, abs, sign, h, rest;
    memcpy(&x, &f, sizeof x);
    sign = (x >> 16) & 0x8000u;
    abs = x & 0x7FFFFFFFu;
    if (abs >= 0x7F800000u) /* inf, NaN (kept quiet) */
        return (uint16_t)(sign | (abs > 0x7F800000u ? 0x7E00u : 0x7C00u));
    if (abs >= 0x477FF000u) /* 65520 and up round to inf */
        return (uint16_t)(sign | 0x7C00u);
    if (abs < 0x38800000u) { /* below 2^-14: a subnormal half; a * 2^24 is exact, rintf rounds to even */
        float a;
        memcpy(&a, &abs, sizeof a);
        return (uint16_t)(sign | (uint32_t)rintf(a * 16777216.0f));
    }
    h = (((abs >> 23) - 112) << 10) | ((abs >> 13) & 0x3FFu);
    rest = abs & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++; /* a carry into the exponent is the right rounding too */
    return (uint16_t)(sign | h);
}

float rkt_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, x;
    float f;
    if (e == 0) {
        f = (float)m * 5.9604644775390625e-8f; /* 2^-24 */
        return sign ? -f : f;
    }
    x = sign | (e == 31 ? 0x7F800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    memcpy(&f, &x, sizeof f);
    return f;
}

/* value -> code: rint(v / scale) + zp saturated to the type's range, in float as numpy does it
   (np.rint(v / scale) + zp on float32), so both sides quantize alike. */
static int32_t quantize(float v, float scale, int32_t zp, float lo, float hi)
{
    float q = rintf(v / scale) + (float)zp;
    if (!(q >= lo)) /* NaN too */
        q = lo;
    if (q > hi)
        q = hi;
    return (int32_t)q;
}

static float get(const rkt_tensor *t, size_t i)
{
    switch (t->dtype) {
    case RKT_F32: return ((const float *)t->data)[i];
    case RKT_F16: return rkt_half_to_float(((const uint16_t *)t->data)[i]);
    case RKT_I8: return (float)(((const int8_t *)t->data)[i] - t->zp) * t->scale;
    case RKT_U8: return (float)(((const uint8_t *)t->data)[i] - t->zp) * t->scale;
    default: return (float)(((const int16_t *)t->data)[i] - t->zp) * t->scale;
    }
}

static void put(const rkt_tensor *t, size_t i, float v)
{
    switch (t->dtype) {
    case RKT_F32: ((float *)t->data)[i] = v; break;
    case RKT_F16: ((uint16_t *)t->data)[i] = rkt_float_to_half(v); break;
    case RKT_I8: ((int8_t *)t->data)[i] = (int8_t)quantize(v, t->scale, t->zp, -128.0f, 127.0f); break;
    case RKT_U8: ((uint8_t *)t->data)[i] = (uint8_t)quantize(v, t->scale, t->zp, 0.0f, 255.0f); break;
    default: ((int16_t *)t->data)[i] = (int16_t)quantize(v, t->scale, t->zp, -32768.0f, 32767.0f); break;
    }
}

/* Element offset of NCHW index (n, c, h, w). */
static size_t offset(const rkt_tensor *t, uint32_t n, uint32_t c, uint32_t h, uint32_t w)
{
    const uint32_t *s = t->shape;
    if (t->nhwc)
        return (((size_t)n * s[2] + h) * t->w_stride + w) * s[1] + c;
    return (((size_t)n * s[1] + c) * s[2] + h) * s[3] + w;
}

static size_t offset_of_index(const rkt_tensor *t, uint64_t i)
{
    const uint32_t *s = t->shape;
    uint32_t w = (uint32_t)(i % s[3]), h = (uint32_t)(i / s[3] % s[2]), c = (uint32_t)(i / s[3] / s[2] % s[1]);
    return t->nhwc ? offset(t, (uint32_t)(i / s[3] / s[2] / s[1]), c, h, w) : (size_t)i;
}

void rkt_tensor_store(const rkt_tensor *t, const float *nchw)
{
    uint64_t i, n = rkt_tensor_count(t);
    for (i = 0; i < n; i++)
        put(t, offset_of_index(t, i), nchw[i]);
}

void rkt_tensor_load(const rkt_tensor *t, float *nchw)
{
    uint64_t i, n = rkt_tensor_count(t);
    for (i = 0; i < n; i++)
        nchw[i] = get(t, offset_of_index(t, i));
}

void rkt_tensor_fill(const rkt_tensor *t, float v)
{
    uint64_t i, n = rkt_tensor_count(t);
    for (i = 0; i < n; i++)
        put(t, offset_of_index(t, i), v);
}

void rkt_tensor_set(const rkt_tensor *t, uint64_t index, float v)
{
    put(t, offset_of_index(t, index), v);
}

static int same_encoding(const rkt_tensor *a, const rkt_tensor *b)
{
    return a->dtype == b->dtype && (a->dtype == RKT_F32 || a->dtype == RKT_F16 ||
                                    (a->scale == b->scale && a->zp == b->zp));
}

void rkt_tensor_copy(const rkt_tensor *dst, const rkt_tensor *src)
{
    uint64_t i, n = rkt_tensor_count(src);
    if (same_encoding(dst, src) && dst->nhwc == src->nhwc && dst->w_stride == src->w_stride) {
        memcpy(dst->data, src->data, dst->bytes);
        return;
    }
    for (i = 0; i < n; i++)
        put(dst, offset_of_index(dst, i), get(src, offset_of_index(src, i)));
}

void rkt_cache_push(const rkt_tensor *cache, const rkt_tensor *step)
{
    uint32_t heads = cache->shape[1], last = cache->shape[2] - 1, hd = cache->shape[3], c, w;
    size_t esize = rkt_dtype_size(cache->dtype), row;
    char *base = cache->data;
    if (cache->nhwc) {
        /* [1, P, Ws, H]: positions are outermost, so one position's block moves down by one. */
        row = (size_t)cache->w_stride * heads;
        memmove(base, base + row * esize, (size_t)last * row * esize);
        if (same_encoding(cache, step) && step->nhwc && step->w_stride == cache->w_stride) {
            memcpy(base + (size_t)last * row * esize, step->data, row * esize);
            return;
        }
    } else {
        /* [1, H, P, hd]: shifting the whole buffer by one row moves each head's rows down by one; the last row of
           each head then holds the next head's first (or stale data) until the step's row overwrites it. */
        memmove(base, base + (size_t)hd * esize, ((size_t)heads * (last + 1) - 1) * hd * esize);
        if (same_encoding(cache, step) && !step->nhwc) {
            for (c = 0; c < heads; c++)
                memcpy(base + ((size_t)c * (last + 1) + last) * hd * esize, (char *)step->data + (size_t)c * hd * esize,
                       hd * esize);
            return;
        }
    }
    for (c = 0; c < heads; c++)
        for (w = 0; w < hd; w++)
            put(cache, offset(cache, 0, c, last, w), get(step, offset(step, 0, c, 0, w)));
}

/* fp16 bits in an order that follows their value: sign-magnitude to two's complement (-0 and +0 tie). */
static int32_t half_rank(uint16_t h)
{
    return (h & 0x8000u) ? -(int32_t)(h & 0x7FFFu) : (int32_t)h;
}

int rkt_tensor_argmax(const rkt_tensor *t, uint32_t n, uint32_t *best)
{
    uint32_t i;
    *best = 0;
    switch (t->dtype) {
    case RKT_F32: {
        const float *v = t->data;
        for (i = 0; i < n; i++) {
            if (isnan(v[i]))
                return -1;
            if (v[i] > v[*best])
                *best = i;
        }
        return 0;
    }
    case RKT_F16: {
        const uint16_t *v = t->data;
        int32_t top = half_rank(v[0]);
        for (i = 0; i < n; i++) {
            if ((v[i] & 0x7FFFu) > 0x7C00u)
                return -1;
            if (half_rank(v[i]) > top) {
                top = half_rank(v[i]);
                *best = i;
            }
        }
        return 0;
    }
    /* Integer codes: the scale is positive, so the largest code is the largest value. */
    case RKT_I8: {
        const int8_t *v = t->data;
        for (i = 1; i < n; i++)
            if (v[i] > v[*best])
                *best = i;
        return 0;
    }
    case RKT_U8: {
        const uint8_t *v = t->data;
        for (i = 1; i < n; i++)
            if (v[i] > v[*best])
                *best = i;
        return 0;
    }
    default: {
        const int16_t *v = t->data;
        for (i = 1; i < n; i++)
            if (v[i] > v[*best])
                *best = i;
        return 0;
    }
    }
}
