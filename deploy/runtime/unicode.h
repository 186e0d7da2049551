/* UTF-8 and the Unicode tables tokenizer.bin carries: character classes for the pre-tokenizer, NFC. */
#ifndef RKT_UNICODE_H
#define RKT_UNICODE_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

enum { RKT_OTHER = 0, RKT_LETTER = 1, RKT_NUMBER = 2, RKT_SPACE = 3 };

typedef struct {
    uint32_t first, last, value;
} rkt_range;

typedef struct {
    uint32_t cp, offset, length; /* length code points at pool[offset] */
} rkt_decomp;

typedef struct {
    uint32_t first, second, composite;
} rkt_compose;

/* Tables decoded and validated by tokenizer.c; sorted so lookups are binary searches. */
typedef struct {
    const rkt_range *classes;
    size_t n_classes;
    uint8_t ascii_class[128]; /* the same classes for ASCII, looked up once at load */
    const rkt_range *ccc;
    size_t n_ccc;
    const rkt_decomp *decomp;
    size_t n_decomp;
    const uint32_t *pool;
    const rkt_compose *compose;
    size_t n_compose;
    uint32_t max_expansion; /* most code points one code point decomposes into (Hangul: 3) */
} rkt_unicode;

int rkt_char_class(const rkt_unicode *u, uint32_t cp);

/* Strict UTF-8 (no overlongs, surrogates or values past U+10FFFF) to code points; what names the text. */
int rkt_utf8_decode(const uint8_t *s, size_t n, rkt_u32vec *out, const char *what);
/* Appends the UTF-8 of cp (a valid scalar value) to buf. */
int rkt_utf8_append(rkt_bytes *buf, uint32_t cp);
/* Replaces each maximal invalid subsequence by U+FFFD, as Rust's from_utf8_lossy (the tokenizers decoder) does. */
int rkt_utf8_lossy(const uint8_t *s, size_t n, rkt_bytes *out);

/* NFC of in[0..n) into out, which must hold n * max_expansion code points; returns the output length. */
size_t rkt_nfc(const rkt_unicode *u, const uint32_t *in, size_t n, uint32_t *out);

#endif
