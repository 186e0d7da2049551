/* tokenizer.bin loader (layout: deploy/tokenizer_bin.py and README.md).

   The file is untrusted: every count, offset and id is checked here, once, so that the encoder and decoder
   (tokenizer.c) can index the decoded arrays without further checks. */
#include <stdlib.h>
#include <string.h>

#include "tokenizer_impl.h"

#define MAX_CODE_POINT 0x10FFFFu
#define MAX_DECOMP 16u /* longest canonical decomposition accepted (Unicode's is 4) */

enum {
    SEC_BYTE_TOKENS, SEC_MERGES, SEC_STUDENT_TEACHER, SEC_TEACHER_STUDENT, SEC_TOKEN_OFFSETS, SEC_TOKEN_BYTES,
    SEC_VOCAB_INDEX, SEC_ADDED, SEC_CLASSES, SEC_CCC, SEC_DECOMP, SEC_POOL, SEC_COMPOSE, N_SECTIONS
};
enum { PATTERN_QWEN2 = 1, VERSION = 1, HEADER_SIZE = 56 + 8 * N_SECTIONS };

static const char *const section_names[N_SECTIONS] = {
    "BYTE_TOKENS", "MERGES", "STUDENT_TEACHER", "TEACHER_STUDENT", "TOKEN_OFFSETS", "TOKEN_BYTES",
    "VOCAB_INDEX", "ADDED", "CATEGORIES", "CCC", "DECOMP", "DECOMP_POOL", "COMPOSE"};

typedef struct {
    const uint8_t *p;
    size_t size;
} span;

/* ------------------------------------------------------------------ loading */

/* A Unicode scalar value: at most U+10FFFF and not a surrogate. */
static int is_scalar(uint32_t cp)
{
    return cp <= MAX_CODE_POINT && (cp < 0xD800 || cp > 0xDFFF);
}

/* Row i of a table of 12-byte rows (three u32 fields). */
static void row3(span s, size_t i, uint32_t *a, uint32_t *b, uint32_t *c)
{
    *a = rkt_le32(s.p + 12 * i);
    *b = rkt_le32(s.p + 12 * i + 4);
    *c = rkt_le32(s.p + 12 * i + 8);
}

static uint32_t *u32_array(span s, const char *what)
{
    size_t i, n = s.size / 4;
    uint32_t *v = rkt_calloc(n, sizeof *v, what);
    if (v)
        for (i = 0; i < n; i++)
            v[i] = rkt_le32(s.p + 4 * i);
    return v;
}

static int expect_size(const char *path, int sec, size_t got, uint64_t count, uint64_t elem)
{
    if ((uint64_t)got != count * elem)
        return rkt_fail(path, "section %s is %zu bytes, expected %llu (%llu x %llu)", section_names[sec], got,
                        (unsigned long long)(count * elem), (unsigned long long)count, (unsigned long long)elem);
    return 0;
}

static int expect_multiple(const char *path, int sec, size_t got, size_t elem)
{
    if (got % elem)
        return rkt_fail(path, "section %s is %zu bytes, not a multiple of %zu", section_names[sec], got, elem);
    return 0;
}

/* Ranges must be sorted, disjoint, within Unicode and carry a value in [1, max_value]. */
static rkt_range *load_ranges(span s, const char *path, int sec, uint32_t max_value, size_t *count)
{
    size_t i, n = s.size / 12;
    rkt_range *r;
    if (expect_multiple(path, sec, s.size, 12) || !(r = rkt_calloc(n, sizeof *r, path)))
        return NULL;
    for (i = 0; i < n; i++) {
        row3(s, i, &r[i].first, &r[i].last, &r[i].value);
        if (r[i].first > r[i].last || r[i].last > MAX_CODE_POINT || r[i].value == 0 || r[i].value > max_value ||
            (i > 0 && r[i].first <= r[i - 1].last)) {
            rkt_fail(path, "section %s: range %zu (%u..%u = %u) is out of order, outside Unicode or has a bad value",
                     section_names[sec], i, r[i].first, r[i].last, r[i].value);
            free(r);
            return NULL;
        }
    }
    *count = n;
    return r;
}

static int bytes_less(const rkt_tokenizer *t, uint32_t a, uint32_t b)
{
    uint32_t la = t->token_offsets[a + 1] - t->token_offsets[a], lb = t->token_offsets[b + 1] - t->token_offsets[b];
    int c = memcmp(t->token_bytes + t->token_offsets[a], t->token_bytes + t->token_offsets[b], la < lb ? la : lb);
    return c < 0 || (c == 0 && la < lb);
}

static int load_ids(rkt_tokenizer *t, const span *sec, const char *path)
{
    uint32_t i;
    for (i = 0; i < 256; i++) {
        t->byte_token[i] = rkt_le32(sec[SEC_BYTE_TOKENS].p + 4 * i);
        if (t->byte_token[i] >= t->n_teacher)
            return rkt_fail(path, "byte %u: token id %u is not below %u teacher ids", i, t->byte_token[i],
                            t->n_teacher);
    }
    if (!(t->student_teacher = u32_array(sec[SEC_STUDENT_TEACHER], path)) ||
        !(t->teacher_student = u32_array(sec[SEC_TEACHER_STUDENT], path)))
        return -1;
    for (i = 0; i < t->n_student; i++)
        if (t->student_teacher[i] >= t->n_teacher || t->teacher_student[t->student_teacher[i]] != i)
            return rkt_fail(path, "student id %u: teacher id %u is out of range or does not map back", i,
                            t->student_teacher[i]);
    for (i = 0; i < t->n_teacher; i++)
        if (t->teacher_student[i] != NOT_KEPT &&
            (t->teacher_student[i] >= t->n_student || t->student_teacher[t->teacher_student[i]] != i))
            return rkt_fail(path, "teacher id %u: student id %u is out of range or does not map back", i,
                            t->teacher_student[i]);
    /* Unkept tokens are spelled with byte tokens, so the student must keep all 256. */
    for (i = 0; i < 256; i++)
        if (t->teacher_student[t->byte_token[i]] == NOT_KEPT)
            return rkt_fail(path, "the student does not keep the token of byte %u", i);
    if (t->pad >= t->n_student || t->bos >= t->n_student || t->eos >= t->n_student || t->pad == t->bos ||
        t->pad == t->eos || t->bos == t->eos)
        return rkt_fail(path, "pad/bos/eos ids %u/%u/%u are not distinct ids below %u student ids", t->pad, t->bos,
                        t->eos, t->n_student);
    return 0;
}

static int load_token_bytes(rkt_tokenizer *t, const span *sec, const char *path)
{
    uint32_t i;
    if (!(t->token_offsets = u32_array(sec[SEC_TOKEN_OFFSETS], path)))
        return -1;
    if (t->token_offsets[0] != 0 || t->token_offsets[t->n_teacher] != sec[SEC_TOKEN_BYTES].size)
        return rkt_fail(path, "token offsets do not span TOKEN_BYTES (%zu bytes)", sec[SEC_TOKEN_BYTES].size);
    for (i = 0; i < t->n_teacher; i++)
        if (t->token_offsets[i + 1] < t->token_offsets[i])
            return rkt_fail(path, "token offsets decrease at teacher id %u", i);
    if (!(t->token_bytes = rkt_calloc(sec[SEC_TOKEN_BYTES].size, 1, path)))
        return -1;
    memcpy(t->token_bytes, sec[SEC_TOKEN_BYTES].p, sec[SEC_TOKEN_BYTES].size);

    t->n_index = sec[SEC_VOCAB_INDEX].size / 4;
    if (!t->n_index != !(t->flags & FLAG_IGNORE_MERGES))
        return rkt_fail(path, "VOCAB_INDEX has %zu entries; it is written exactly when the header sets ignore_merges "
                        "(flags 0x%x)", t->n_index, t->flags);
    if (!(t->vocab_index = u32_array(sec[SEC_VOCAB_INDEX], path)))
        return -1;
    for (i = 0; i < t->n_index; i++)
        if (t->vocab_index[i] >= t->n_teacher || (i > 0 && !bytes_less(t, t->vocab_index[i - 1], t->vocab_index[i])))
            return rkt_fail(path, "VOCAB_INDEX entry %u (id %u) is out of range or out of order", i,
                            t->vocab_index[i]);
    return 0;
}

static int load_merges(rkt_tokenizer *t, span s, const char *path)
{
    size_t i;
    if (!(t->merges = rkt_calloc(t->n_merges, sizeof *t->merges, path)))
        return -1;
    for (i = 0; i < t->n_merges; i++) {
        merge *m = &t->merges[i];
        m->left = rkt_le32(s.p + 16 * i);
        m->right = rkt_le32(s.p + 16 * i + 4);
        m->rank = rkt_le32(s.p + 16 * i + 8);
        m->merged = rkt_le32(s.p + 16 * i + 12);
        if (m->left >= t->n_teacher || m->right >= t->n_teacher || m->merged >= t->n_teacher)
            return rkt_fail(path, "merge %zu names a token id not below %u", i, t->n_teacher);
        if (i > 0 && (m->left < m[-1].left || (m->left == m[-1].left && m->right <= m[-1].right)))
            return rkt_fail(path, "merge %zu is out of order (the table is binary-searched)", i);
    }
    return 0;
}

static int load_added(rkt_tokenizer *t, span s, const char *path)
{
    size_t i;
    if (!(t->added = rkt_calloc(t->n_added, sizeof *t->added, path)) ||
        !(t->student_special = rkt_calloc(t->n_student, 1, path)))
        return -1;
    for (i = 0; i < t->n_added; i++) {
        added_token *a = &t->added[i];
        uint32_t flags = rkt_le32(s.p + 8 * i + 4);
        rkt_u32vec text = {0};
        a->teacher = rkt_le32(s.p + 8 * i);
        if (a->teacher >= t->n_teacher || flags > 1)
            return rkt_fail(path, "added token %zu: id %u or flags %u out of range", i, a->teacher, flags);
        if (rkt_utf8_decode(t->token_bytes + t->token_offsets[a->teacher],
                            t->token_offsets[a->teacher + 1] - t->token_offsets[a->teacher], &text, path)) {
            rkt_u32vec_free(&text);
            return -1;
        }
        a->text = text.v;
        a->len = text.n;
        if (!a->len)
            return rkt_fail(path, "added token %zu (id %u) has no text", i, a->teacher);
        if (flags && t->teacher_student[a->teacher] != NOT_KEPT)
            t->student_special[t->teacher_student[a->teacher]] = 1;
    }
    /* pad, bos and eos are <|endoftext|>, <|im_start|> and <|im_end|>: special tokens, which decoding skips. */
    if (!t->student_special[t->pad] || !t->student_special[t->bos] || !t->student_special[t->eos])
        return rkt_fail(path, "pad/bos/eos ids %u/%u/%u are not all special added tokens", t->pad, t->bos, t->eos);
    return 0;
}

static int load_unicode(rkt_tokenizer *t, const span *sec, const char *path)
{
    rkt_unicode *u = &t->uni;
    size_t i, n_pool = sec[SEC_POOL].size / 4;
    uint32_t c;
    if (!(t->classes = load_ranges(sec[SEC_CLASSES], path, SEC_CLASSES, RKT_SPACE, &u->n_classes)))
        return -1;
    u->classes = t->classes;
    for (c = 0; c < 128; c++) {
        size_t k;
        u->ascii_class[c] = RKT_OTHER;
        for (k = 0; k < u->n_classes && t->classes[k].first <= c; k++)
            if (c <= t->classes[k].last)
                u->ascii_class[c] = (uint8_t)t->classes[k].value;
    }
    u->max_expansion = 3; /* a Hangul syllable */
    if (!(t->flags & FLAG_NFC)) {
        if (sec[SEC_CCC].size || sec[SEC_DECOMP].size || sec[SEC_POOL].size || sec[SEC_COMPOSE].size)
            return rkt_fail(path, "NFC tables present but the header does not enable NFC");
        return 0;
    }
    if (!(t->ccc = load_ranges(sec[SEC_CCC], path, SEC_CCC, 255, &u->n_ccc)) ||
        expect_multiple(path, SEC_DECOMP, sec[SEC_DECOMP].size, 12) ||
        expect_multiple(path, SEC_COMPOSE, sec[SEC_COMPOSE].size, 12) ||
        !(t->pool = u32_array(sec[SEC_POOL], path)))
        return -1;
    u->ccc = t->ccc;
    u->pool = t->pool;
    for (i = 0; i < n_pool; i++)
        if (!is_scalar(t->pool[i]))
            return rkt_fail(path, "DECOMP_POOL entry %zu is not a Unicode scalar value", i);
    u->n_decomp = sec[SEC_DECOMP].size / 12;
    if (!(t->decomp = rkt_calloc(u->n_decomp, sizeof *t->decomp, path)))
        return -1;
    u->decomp = t->decomp;
    for (i = 0; i < u->n_decomp; i++) {
        rkt_decomp *d = &t->decomp[i];
        row3(sec[SEC_DECOMP], i, &d->cp, &d->offset, &d->length);
        if (!is_scalar(d->cp) || (i > 0 && d->cp <= d[-1].cp) || d->length == 0 || d->length > MAX_DECOMP ||
            d->offset > n_pool || d->length > n_pool - d->offset)
            return rkt_fail(path, "decomposition %zu (U+%04X) is out of order, not a scalar value or outside "
                            "DECOMP_POOL", i, d->cp);
        if (d->length > u->max_expansion)
            u->max_expansion = d->length;
    }
    u->n_compose = sec[SEC_COMPOSE].size / 12;
    if (!(t->compose = rkt_calloc(u->n_compose, sizeof *t->compose, path)))
        return -1;
    u->compose = t->compose;
    for (i = 0; i < u->n_compose; i++) {
        rkt_compose *k = &t->compose[i];
        row3(sec[SEC_COMPOSE], i, &k->first, &k->second, &k->composite);
        if (!is_scalar(k->first) || !is_scalar(k->second) || !is_scalar(k->composite) || k->composite == 0 ||
            (i > 0 && (k->first < k[-1].first || (k->first == k[-1].first && k->second <= k[-1].second))))
            return rkt_fail(path, "composition %zu is out of order or not Unicode scalar values", i);
    }
    return 0;
}

static int parse(rkt_tokenizer *t, const uint8_t *data, size_t size, const char *path)
{
    span sec[N_SECTIONS];
    uint32_t version, crc, pattern, n_sections;
    size_t next;
    int k;
    if (size < HEADER_SIZE)
        return rkt_fail(path, "truncated: %zu bytes, the header alone is %d", size, HEADER_SIZE);
    if (memcmp(data, "RKTOK1\0\0", 8) != 0)
        return rkt_fail(path, "not a tokenizer.bin (bad magic); write one with python -m deploy.tokenizer_bin");
    version = rkt_le32(data + 8);
    if (version != VERSION)
        return rkt_fail(path, "format version %u, this runner reads version %d", version, VERSION);
    crc = rkt_le32(data + 12);
    if (crc != rkt_crc32(data + 16, size - 16))
        return rkt_fail(path, "checksum mismatch: the file is corrupted or truncated");
    t->flags = rkt_le32(data + 16);
    pattern = rkt_le32(data + 20);
    t->n_teacher = rkt_le32(data + 24);
    t->n_student = rkt_le32(data + 28);
    t->n_merges = rkt_le32(data + 32);
    t->n_added = rkt_le32(data + 36);
    t->pad = rkt_le32(data + 40);
    t->bos = rkt_le32(data + 44);
    t->eos = rkt_le32(data + 48);
    n_sections = rkt_le32(data + 52);
    if (t->flags & ~(uint32_t)(FLAG_NFC | FLAG_IGNORE_MERGES))
        return rkt_fail(path, "unknown flags 0x%x", t->flags);
    if (pattern != PATTERN_QWEN2)
        return rkt_fail(path, "pre-tokenizer pattern %u is not Qwen2's (1)", pattern);
    if (n_sections != N_SECTIONS)
        return rkt_fail(path, "%u sections, version %d has %d", n_sections, VERSION, N_SECTIONS);
    if (t->n_teacher == 0 || t->n_student == 0 || t->n_teacher == UINT32_MAX)
        return rkt_fail(path, "bad id counts: %u teacher, %u student", t->n_teacher, t->n_student);
    /* The sections follow the header back to back, in order, and end the file: no gaps, overlaps or trailing
       bytes, so a damaged offset or size is caught here rather than read as some other section's data. */
    for (k = 0, next = HEADER_SIZE; k < N_SECTIONS; k++) {
        uint32_t off = rkt_le32(data + 56 + 8 * k), len = rkt_le32(data + 60 + 8 * k);
        if (off != next || len > size - off)
            return rkt_fail(path, "section %s (offset %u, %u bytes) is not where the previous section ends (%zu) "
                            "or lies outside the %zu-byte file", section_names[k], off, len, next, size);
        sec[k].p = data + off;
        sec[k].size = len;
        next = (size_t)off + len;
    }
    if (next != size)
        return rkt_fail(path, "%zu bytes after the last section", size - next);
    if (expect_size(path, SEC_BYTE_TOKENS, sec[SEC_BYTE_TOKENS].size, 256, 4) ||
        expect_size(path, SEC_MERGES, sec[SEC_MERGES].size, t->n_merges, 16) ||
        expect_size(path, SEC_STUDENT_TEACHER, sec[SEC_STUDENT_TEACHER].size, t->n_student, 4) ||
        expect_size(path, SEC_TEACHER_STUDENT, sec[SEC_TEACHER_STUDENT].size, t->n_teacher, 4) ||
        expect_size(path, SEC_TOKEN_OFFSETS, sec[SEC_TOKEN_OFFSETS].size, (uint64_t)t->n_teacher + 1, 4) ||
        expect_multiple(path, SEC_VOCAB_INDEX, sec[SEC_VOCAB_INDEX].size, 4) ||
        expect_size(path, SEC_ADDED, sec[SEC_ADDED].size, t->n_added, 8) ||
        expect_multiple(path, SEC_POOL, sec[SEC_POOL].size, 4))
        return -1;
    if (load_ids(t, sec, path) || load_token_bytes(t, sec, path) || load_merges(t, sec[SEC_MERGES], path) ||
        load_added(t, sec[SEC_ADDED], path) || load_unicode(t, sec, path))
        return -1;
    return 0;
}

rkt_tokenizer *rkt_tokenizer_load(const char *path)
{
    uint8_t *data;
    size_t size;
    rkt_tokenizer *t;
    if (rkt_read_file(path, &data, &size))
        return NULL;
    t = rkt_calloc(1, sizeof *t, path);
    if (!t || parse(t, data, size, path)) {
        free(data);
        rkt_tokenizer_free(t);
        return NULL;
    }
    free(data);
    return t;
}

void rkt_tokenizer_free(rkt_tokenizer *t)
{
    size_t i;
    if (!t)
        return;
    for (i = 0; t->added && i < t->n_added; i++)
        free(t->added[i].text);
    free(t->added);
    free(t->merges);
    free(t->student_teacher);
    free(t->teacher_student);
    free(t->token_offsets);
    free(t->token_bytes);
    free(t->student_special);
    free(t->vocab_index);
    free(t->classes);
    free(t->ccc);
    free(t->decomp);
    free(t->pool);
    free(t->compose);
    free(t);
}

