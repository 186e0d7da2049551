/* Shared helpers: one error format, checked allocation, whole-file reads, little-endian decoding. */
#ifndef RKT_UTIL_H
#define RKT_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Prints "rk_translate: <what>: <why>" to stderr and returns -1, so error paths read `return rkt_fail(...)`. */
int rkt_fail(const char *what, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* calloc(n, size) that reports overflow and exhaustion through rkt_fail; NULL on failure. */
void *rkt_calloc(size_t n, size_t size, const char *what);

/* Reads a whole file (at most RKT_MAX_FILE bytes) into a malloc'd buffer. */
#define RKT_MAX_FILE ((size_t)1 << 30)
int rkt_read_file(const char *path, uint8_t **data, size_t *size);

uint32_t rkt_le32(const uint8_t *p);

/* Saturating arithmetic for sizes read from files: a saturated size never equals a real file's, so it fails the
   size check that follows instead of wrapping to a small one. */
uint64_t rkt_sat_mul(uint64_t a, uint64_t b);
uint64_t rkt_sat_add(uint64_t a, uint64_t b);
float rkt_lef32(const uint8_t *p);

/* zlib/IEEE CRC-32, as Python's zlib.crc32. */
uint32_t rkt_crc32(const uint8_t *p, size_t n);

/* Monotonic clock in milliseconds. */
double rkt_now_ms(void);

/* A growable array of uint32 (token ids, code points). */
typedef struct {
    uint32_t *v;
    size_t n, cap;
} rkt_u32vec;

int rkt_u32vec_push(rkt_u32vec *vec, uint32_t value);
void rkt_u32vec_free(rkt_u32vec *vec);

/* A growable byte buffer (decoded text). */
typedef struct {
    uint8_t *p;
    size_t n, cap;
} rkt_bytes;

int rkt_bytes_append(rkt_bytes *buf, const uint8_t *p, size_t n);
void rkt_bytes_free(rkt_bytes *buf);

#endif
