/* The byte-level BPE encoder and the decoder, over a tokenizer validated by tokenizer_load.c. */
#include <stdlib.h>
#include <string.h>

#include "pretok.h"
#include "tokenizer_impl.h"

uint32_t rkt_tokenizer_vocab_size(const rkt_tokenizer *t) { return t->n_student; }
uint32_t rkt_tokenizer_pad(const rkt_tokenizer *t) { return t->pad; }
uint32_t rkt_tokenizer_bos(const rkt_tokenizer *t) { return t->bos; }
uint32_t rkt_tokenizer_eos(const rkt_tokenizer *t) { return t->eos; }
int rkt_tokenizer_char_class(const rkt_tokenizer *t, uint32_t cp) { return rkt_char_class(&t->uni, cp); }

/* ------------------------------------------------------------------ encoding */

typedef struct {
    uint32_t id, start, len; /* teacher id covering word bytes [start, start + len) */
} symbol;

/* Per-call scratch, grown to the longest word seen. */
typedef struct {
    symbol *sym;
    uint64_t *rank; /* rank of the pair (sym[i], sym[i + 1]); UINT64_MAX when they do not merge */
    uint32_t *merged;
    size_t cap;
    rkt_bytes word;
} scratch;

static int scratch_reserve(scratch *s, size_t n)
{
    if (n <= s->cap)
        return 0;
    free(s->sym);
    free(s->rank);
    free(s->merged);
    s->sym = rkt_calloc(n, sizeof *s->sym, "tokenizer");
    s->rank = rkt_calloc(n, sizeof *s->rank, "tokenizer");
    s->merged = rkt_calloc(n, sizeof *s->merged, "tokenizer");
    s->cap = s->sym && s->rank && s->merged ? n : 0;
    return s->cap ? 0 : -1;
}

static void scratch_free(scratch *s)
{
    free(s->sym);
    free(s->rank);
    free(s->merged);
    rkt_bytes_free(&s->word);
}

static void pair_rank(const rkt_tokenizer *t, scratch *s, size_t i)
{
    uint32_t a = s->sym[i].id, b = s->sym[i + 1].id;
    size_t lo = 0, hi = t->n_merges;
    s->rank[i] = UINT64_MAX;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const merge *m = &t->merges[mid];
        if (a < m->left || (a == m->left && b < m->right)) {
            hi = mid;
        } else if (a > m->left || b > m->right) {
            lo = mid + 1;
        } else {
            s->rank[i] = m->rank;
            s->merged[i] = m->merged;
            return;
        }
    }
}

/* Teacher id whose bytes are exactly w[0..n), for ignore_merges; NOT_KEPT when there is none. */
static uint32_t vocab_lookup(const rkt_tokenizer *t, const uint8_t *w, size_t n)
{
    size_t lo = 0, hi = t->n_index;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uint32_t id = t->vocab_index[mid], len = t->token_offsets[id + 1] - t->token_offsets[id];
        int c = memcmp(w, t->token_bytes + t->token_offsets[id], n < len ? n : len);
        if (c == 0 && n == len)
            return id;
        if (c < 0 || (c == 0 && n < len))
            hi = mid;
        else
            lo = mid + 1;
    }
    return NOT_KEPT;
}

/* Student ids of one teacher token covering bytes w[0..n): itself if kept, else its single-byte tokens. */
static int emit(const rkt_tokenizer *t, uint32_t teacher, const uint8_t *w, size_t n, rkt_u32vec *out)
{
    size_t i;
    if (t->teacher_student[teacher] != NOT_KEPT)
        return rkt_u32vec_push(out, t->teacher_student[teacher]);
    for (i = 0; i < n; i++)
        if (rkt_u32vec_push(out, t->teacher_student[t->byte_token[w[i]]]))
            return -1;
    return 0;
}

/* Byte-level BPE of one pre-tokenized word: repeatedly merge the adjacent pair of lowest rank, leftmost first,
   which is the order of the tokenizers library's priority queue. */
static int bpe_word(const rkt_tokenizer *t, scratch *s, rkt_u32vec *out)
{
    const uint8_t *w = s->word.p;
    size_t n = s->word.n, i, count = n;
    if (t->flags & FLAG_IGNORE_MERGES) {
        uint32_t whole = vocab_lookup(t, w, n);
        if (whole != NOT_KEPT)
            return emit(t, whole, w, n, out);
    }
    if (scratch_reserve(s, n))
        return -1;
    for (i = 0; i < n; i++) {
        s->sym[i].id = t->byte_token[w[i]];
        s->sym[i].start = (uint32_t)i;
        s->sym[i].len = 1;
    }
    for (i = 0; i + 1 < count; i++)
        pair_rank(t, s, i);
    for (;;) {
        size_t best = count;
        uint64_t best_rank = UINT64_MAX;
        for (i = 0; i + 1 < count; i++)
            if (s->rank[i] < best_rank) {
                best_rank = s->rank[i];
                best = i;
            }
        if (best == count)
            break;
        s->sym[best].id = s->merged[best];
        s->sym[best].len += s->sym[best + 1].len;
        count--;
        memmove(s->sym + best + 1, s->sym + best + 2, (count - best - 1) * sizeof *s->sym);
        memmove(s->rank + best + 1, s->rank + best + 2, (count - best - 1) * sizeof *s->rank);
        memmove(s->merged + best + 1, s->merged + best + 2, (count - best - 1) * sizeof *s->merged);
        if (best > 0)
            pair_rank(t, s, best - 1);
        if (best + 1 < count)
            pair_rank(t, s, best);
    }
    for (i = 0; i < count; i++)
        if (emit(t, s->sym[i].id, w + s->sym[i].start, s->sym[i].len, out))
            return -1;
    return 0;
}

/* Text between added tokens: NFC, split into words, BPE each word. */
static int encode_piece(const rkt_tokenizer *t, const uint32_t *cp, size_t n, scratch *s, rkt_u32vec *out)
{
    uint32_t *norm = NULL;
    const uint32_t *text = cp;
    size_t pos = 0, i;
    int rc = 0;
    if (t->flags & FLAG_NFC) {
        if (!(norm = rkt_calloc(n, (size_t)t->uni.max_expansion * sizeof *norm, "input")))
            return -1;
        n = rkt_nfc(&t->uni, cp, n, norm);
        text = norm;
    }
    while (pos < n && rc == 0) {
        size_t len = rkt_pretok_next(&t->uni, text, n, pos);
        s->word.n = 0;
        for (i = pos; i < pos + len && rc == 0; i++)
            rc = rkt_utf8_append(&s->word, text[i]);
        if (rc == 0)
            rc = bpe_word(t, s, out);
        pos += len;
    }
    free(norm);
    return rc;
}

/* The longest added token starting at cp[pos], as the tokenizers library's leftmost-longest matcher picks it. */
static const added_token *added_at(const rkt_tokenizer *t, const uint32_t *cp, size_t n, size_t pos)
{
    const added_token *best = NULL;
    size_t i;
    for (i = 0; i < t->n_added; i++) {
        const added_token *a = &t->added[i];
        if (a->len <= n - pos && (!best || a->len > best->len) && memcmp(cp + pos, a->text, a->len * 4) == 0)
            best = a;
    }
    return best;
}

int rkt_tokenizer_encode(const rkt_tokenizer *t, const uint8_t *text, size_t len, rkt_u32vec *out)
{
    rkt_u32vec cp = {0};
    scratch s = {0};
    size_t start = 0, pos = 0;
    int rc = rkt_utf8_decode(text, len, &cp, "input");
    /* Added tokens are matched on the raw text first; only the text between them is normalized and split. */
    while (rc == 0 && pos <= cp.n) {
        const added_token *a = pos < cp.n ? added_at(t, cp.v, cp.n, pos) : NULL;
        if (!a && pos < cp.n) {
            pos++;
            continue;
        }
        if (pos > start)
            rc = encode_piece(t, cp.v + start, pos - start, &s, out);
        if (!a)
            break;
        if (rc == 0)
            rc = emit(t, a->teacher, t->token_bytes + t->token_offsets[a->teacher],
                      t->token_offsets[a->teacher + 1] - t->token_offsets[a->teacher], out);
        pos += a->len;
        start = pos;
    }
    rkt_u32vec_free(&cp);
    scratch_free(&s);
    return rc;
}

/* ------------------------------------------------------------------ decoding */

int rkt_tokenizer_decode(const rkt_tokenizer *t, const uint32_t *ids, size_t n, rkt_bytes *out)
{
    rkt_bytes raw = {0};
    size_t i;
    int rc = 0;
    for (i = 0; i < n && rc == 0; i++) {
        uint32_t teacher;
        if (ids[i] >= t->n_student) {
            rc = rkt_fail("decode", "student id %u is not below the vocabulary size %u", ids[i], t->n_student);
            break;
        }
        if (t->student_special[ids[i]])
            continue;
        teacher = t->student_teacher[ids[i]];
        rc = rkt_bytes_append(&raw, t->token_bytes + t->token_offsets[teacher],
                              t->token_offsets[teacher + 1] - t->token_offsets[teacher]);
    }
    if (rc == 0)
        rc = rkt_utf8_lossy(raw.p, raw.n, out);
    rkt_bytes_free(&raw);
    return rc;
}
