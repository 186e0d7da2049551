#define _POSIX_C_SOURCE 200809L
#include "util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int rkt_fail(const char *what, const char *fmt, ...)
{
    va_list args;
    fprintf(stderr, "rk_translate: %s: ", what);
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fputc('\n', stderr);
    return -1;
}

void *rkt_calloc(size_t n, size_t size, const char *what)
{
    void *p;
    if (size != 0 && n > SIZE_MAX / size) {
        rkt_fail(what, "%zu x %zu bytes overflows the address space", n, size);
        return NULL;
    }
    /* calloc(0) may return NULL; ask for one byte so NULL always means failure. */
    p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        rkt_fail(what, "out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

int rkt_read_file(const char *path, uint8_t **data, size_t *size)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0;
    *data = NULL;
    *size = 0;
    if (!f)
        return rkt_fail(path, "cannot open: %s", strerror(errno));
    /* Read in chunks rather than trusting fseek/ftell: works for pipes and never over-allocates. */
    for (;;) {
        size_t got;
        if (n == cap) {
            uint8_t *grown;
            if (cap >= RKT_MAX_FILE) {
                free(buf);
                fclose(f);
                return rkt_fail(path, "larger than %zu bytes", RKT_MAX_FILE);
            }
            cap = cap ? cap * 2 : 65536;
            grown = realloc(buf, cap);
            if (!grown) {
                free(buf);
                fclose(f);
                return rkt_fail(path, "out of memory reading %zu bytes", cap);
            }
            buf = grown;
        }
        got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    if (ferror(f)) {
        free(buf);
        fclose(f);
        return rkt_fail(path, "read error");
    }
    fclose(f);
    *data = buf;
    *size = n;
    return 0;
}

uint32_t rkt_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

uint64_t rkt_sat_mul(uint64_t a, uint64_t b)
{
    return a && b > UINT64_MAX / a ? UINT64_MAX : a * b;
}

uint64_t rkt_sat_add(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

float rkt_lef32(const uint8_t *p)
{
    uint32_t bits = rkt_le32(p);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

uint32_t rkt_crc32(const uint8_t *p, size_t n)
{
    /* Table-driven: tokenizer.bin can be 8 MB (Qwen's full vocabulary) and the A53 is slow bit by bit. */
    static uint32_t table[256];
    uint32_t crc = 0xFFFFFFFFu;
    size_t i;
    if (!table[1]) {
        uint32_t b;
        for (b = 0; b < 256; b++) {
            uint32_t c = b;
            int bit;
            for (bit = 0; bit < 8; bit++)
                c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
            table[b] = c;
        }
    }
    for (i = 0; i < n; i++)
        crc = (crc >> 8) ^ table[(crc ^ p[i]) & 0xFFu];
    return ~crc;
}

double rkt_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int rkt_u32vec_push(rkt_u32vec *vec, uint32_t value)
{
    if (vec->n == vec->cap) {
        size_t cap = vec->cap ? vec->cap * 2 : 64;
        uint32_t *grown;
        if (cap > SIZE_MAX / sizeof *grown)
            return rkt_fail("memory", "array of %zu entries overflows", cap);
        grown = realloc(vec->v, cap * sizeof *grown);
        if (!grown)
            return rkt_fail("memory", "out of memory growing an array to %zu entries", cap);
        vec->v = grown;
        vec->cap = cap;
    }
    vec->v[vec->n++] = value;
    return 0;
}

void rkt_u32vec_free(rkt_u32vec *vec)
{
    free(vec->v);
    vec->v = NULL;
    vec->n = vec->cap = 0;
}

int rkt_bytes_append(rkt_bytes *buf, const uint8_t *p, size_t n)
{
    if (n > SIZE_MAX - buf->n - 1)
        return rkt_fail("memory", "text buffer overflows");
    if (buf->n + n + 1 > buf->cap) {
        size_t cap = buf->cap ? buf->cap : 256;
        uint8_t *grown;
        while (cap < buf->n + n + 1)
            cap = cap > SIZE_MAX / 2 ? buf->n + n + 1 : cap * 2;
        grown = realloc(buf->p, cap);
        if (!grown)
            return rkt_fail("memory", "out of memory growing text to %zu bytes", cap);
        buf->p = grown;
        buf->cap = cap;
    }
    if (n)
        memcpy(buf->p + buf->n, p, n);
    buf->n += n;
    buf->p[buf->n] = 0; /* always NUL-terminated so it prints as a C string */
    return 0;
}

void rkt_bytes_free(rkt_bytes *buf)
{
    free(buf->p);
    buf->p = NULL;
    buf->n = buf->cap = 0;
}
