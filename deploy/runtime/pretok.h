/* Qwen2's pre-tokenizer, the tokenizers library's Split(pattern, Isolated) with the pattern
     (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
   implemented by hand: the leftmost alternative that matches wins, as in the Oniguruma engine behind it. */
#ifndef RKT_PRETOK_H
#define RKT_PRETOK_H

#include <stddef.h>
#include <stdint.h>

#include "unicode.h"

/* Length in code points of the piece starting at cp[pos] (pos < n); always at least 1. */
size_t rkt_pretok_next(const rkt_unicode *u, const uint32_t *cp, size_t n, size_t pos);

#endif
