/* The tokenizer's in-memory form, shared by the loader (tokenizer_load.c, which validates everything in it) and
   the encoder/decoder (tokenizer.c, which relies on that). Not part of the public interface (tokenizer.h). */
#ifndef RKT_TOKENIZER_IMPL_H
#define RKT_TOKENIZER_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "tokenizer.h"
#include "unicode.h"

#define NOT_KEPT 0xFFFFFFFFu /* TEACHER_STUDENT entry of a teacher token the student does not keep */

enum { FLAG_NFC = 1, FLAG_IGNORE_MERGES = 2 };

typedef struct {
    uint32_t left, right, rank, merged;
} merge;

typedef struct {
    uint32_t teacher;
    uint32_t *text; /* its code points, matched against the input before normalization */
    size_t len;
} added_token;

struct rkt_tokenizer {
    uint32_t flags, n_teacher, n_student, pad, bos, eos;
    uint32_t byte_token[256];
    merge *merges;
    size_t n_merges;
    uint32_t *student_teacher, *teacher_student, *token_offsets;
    uint8_t *token_bytes;
    uint8_t *student_special; /* 1 for special tokens, which decode skips */
    uint32_t *vocab_index;
    size_t n_index;
    added_token *added;
    size_t n_added;
    rkt_range *classes, *ccc;
    rkt_decomp *decomp;
    uint32_t *pool;
    rkt_compose *compose;
    rkt_unicode uni;
};

#endif
