/* The student's tokenizer, loaded from tokenizer.bin (format: deploy/tokenizer_bin.py, README.md).
   encode() gives exactly the Hugging Face tokenizer's ids mapped to student ids; decode() inverts it. */
#ifndef RKT_TOKENIZER_H
#define RKT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

typedef struct rkt_tokenizer rkt_tokenizer;

/* Loads and validates every count, offset and id in the file; NULL (after printing why) on failure. */
rkt_tokenizer *rkt_tokenizer_load(const char *path);
void rkt_tokenizer_free(rkt_tokenizer *tok);

uint32_t rkt_tokenizer_vocab_size(const rkt_tokenizer *tok);
uint32_t rkt_tokenizer_pad(const rkt_tokenizer *tok);
uint32_t rkt_tokenizer_bos(const rkt_tokenizer *tok);
uint32_t rkt_tokenizer_eos(const rkt_tokenizer *tok);
/* The code point class of cp (enum in unicode.h), for callers that trim whitespace as the pre-tokenizer sees it. */
int rkt_tokenizer_char_class(const rkt_tokenizer *tok, uint32_t cp);

/* UTF-8 text -> student ids appended to out (no special tokens added). */
int rkt_tokenizer_encode(const rkt_tokenizer *tok, const uint8_t *text, size_t len, rkt_u32vec *out);
/* Student ids -> UTF-8 appended to out, skipping special tokens; invalid UTF-8 becomes U+FFFD, as in
   tokenizer.decode(ids, skip_special_tokens=True). */
int rkt_tokenizer_decode(const rkt_tokenizer *tok, const uint32_t *ids, size_t n, rkt_bytes *out);

#endif
