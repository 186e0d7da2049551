#include "unicode.h"

#include <string.h>

/* Hangul syllables compose and decompose arithmetically (Unicode 3.12), so tokenizer.bin omits them. */
enum {
    S_BASE = 0xAC00, L_BASE = 0x1100, V_BASE = 0x1161, T_BASE = 0x11A7,
    L_COUNT = 19, V_COUNT = 21, T_COUNT = 28, N_COUNT = V_COUNT * T_COUNT, S_COUNT = L_COUNT * N_COUNT
};

static uint32_t range_value(const rkt_range *r, size_t n, uint32_t cp)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < r[mid].first)
            hi = mid;
        else if (cp > r[mid].last)
            lo = mid + 1;
        else
            return r[mid].value;
    }
    return 0;
}

int rkt_char_class(const rkt_unicode *u, uint32_t cp)
{
    if (cp < 128)
        return u->ascii_class[cp];
    return (int)range_value(u->classes, u->n_classes, cp);
}

/* Length of the well-formed sequence at s[0..n) (Unicode Table 3-7); 0 if none, with *valid_prefix set to the
   length of its maximal valid prefix (at least 1), which is what one U+FFFD replaces. */
static size_t utf8_sequence(const uint8_t *s, size_t n, uint32_t *cp, size_t *valid_prefix)
{
    uint8_t b = s[0], lo = 0x80, hi = 0xBF;
    size_t need, i;
    uint32_t value;
    *valid_prefix = 1;
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    if (b >= 0xC2 && b <= 0xDF) {
        need = 1;
        value = b & 0x1Fu;
    } else if (b >= 0xE0 && b <= 0xEF) {
        need = 2;
        value = b & 0x0Fu;
        if (b == 0xE0)
            lo = 0xA0; /* no overlongs */
        else if (b == 0xED)
            hi = 0x9F; /* no surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 3;
        value = b & 0x07u;
        if (b == 0xF0)
            lo = 0x90;
        else if (b == 0xF4)
            hi = 0x8F; /* nothing past U+10FFFF */
    } else {
        return 0;
    }
    for (i = 1; i <= need; i++) {
        if (i >= n || s[i] < lo || s[i] > hi)
            return 0;
        value = value << 6 | (s[i] & 0x3Fu);
        lo = 0x80;
        hi = 0xBF;
        *valid_prefix = i + 1;
    }
    *cp = value;
    return need + 1;
}

int rkt_utf8_decode(const uint8_t *s, size_t n, rkt_u32vec *out, const char *what)
{
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        size_t prefix, len = utf8_sequence(s + i, n - i, &cp, &prefix);
        if (!len)
            return rkt_fail(what, "invalid UTF-8 at byte %zu", i);
        if (rkt_u32vec_push(out, cp))
            return -1;
        i += len;
    }
    return 0;
}

int rkt_utf8_append(rkt_bytes *buf, uint32_t cp)
{
    uint8_t b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (uint8_t)cp;
        n = 1;
    } else if (cp < 0x800) {
        b[0] = (uint8_t)(0xC0 | cp >> 6);
        b[1] = (uint8_t)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        b[0] = (uint8_t)(0xE0 | cp >> 12);
        b[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
        b[2] = (uint8_t)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        b[0] = (uint8_t)(0xF0 | cp >> 18);
        b[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3F));
        b[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
        b[3] = (uint8_t)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return rkt_bytes_append(buf, b, n);
}

int rkt_utf8_lossy(const uint8_t *s, size_t n, rkt_bytes *out)
{
    static const uint8_t replacement[3] = {0xEF, 0xBF, 0xBD};
    size_t i = 0;
    if (rkt_bytes_append(out, s, 0)) /* an empty result is still a valid C string */
        return -1;
    while (i < n) {
        uint32_t cp;
        size_t prefix, len = utf8_sequence(s + i, n - i, &cp, &prefix);
        if (len ? rkt_bytes_append(out, s + i, len) : rkt_bytes_append(out, replacement, sizeof replacement))
            return -1;
        i += len ? len : prefix;
    }
    return 0;
}

static const rkt_decomp *find_decomp(const rkt_unicode *u, uint32_t cp)
{
    size_t lo = 0, hi = u->n_decomp;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < u->decomp[mid].cp)
            hi = mid;
        else if (cp > u->decomp[mid].cp)
            lo = mid + 1;
        else
            return &u->decomp[mid];
    }
    return NULL;
}

static uint32_t compose_pair(const rkt_unicode *u, uint32_t a, uint32_t b)
{
    size_t lo = 0, hi = u->n_compose;
    if (a - L_BASE < L_COUNT && b - V_BASE < V_COUNT)
        return S_BASE + ((a - L_BASE) * V_COUNT + (b - V_BASE)) * T_COUNT;
    if (a - S_BASE < S_COUNT && (a - S_BASE) % T_COUNT == 0 && b - T_BASE - 1 < T_COUNT - 1)
        return a + (b - T_BASE);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const rkt_compose *c = &u->compose[mid];
        if (a < c->first || (a == c->first && b < c->second))
            hi = mid;
        else if (a > c->first || b > c->second)
            lo = mid + 1;
        else
            return c->composite;
    }
    return 0;
}

size_t rkt_nfc(const rkt_unicode *u, const uint32_t *in, size_t n, uint32_t *out)
{
    size_t len = 0, i, starter, kept;
    int have_starter;
    uint32_t last_ccc;
    /* Below U+0300 nothing has a non-zero combining class, so such text is already NFC. */
    for (i = 0; i < n && in[i] < 0x300; i++)
        ;
    if (i == n) {
        memcpy(out, in, n * sizeof *in);
        return n;
    }
    /* 1. Full canonical decomposition. */
    for (i = 0; i < n; i++) {
        uint32_t cp = in[i];
        const rkt_decomp *d;
        if (cp - S_BASE < S_COUNT) {
            uint32_t s = cp - S_BASE;
            out[len++] = L_BASE + s / N_COUNT;
            out[len++] = V_BASE + s % N_COUNT / T_COUNT;
            if (s % T_COUNT)
                out[len++] = T_BASE + s % T_COUNT;
        } else if ((d = find_decomp(u, cp)) != NULL) {
            memcpy(out + len, u->pool + d->offset, d->length * sizeof *out);
            len += d->length;
        } else {
            out[len++] = cp;
        }
    }
    /* 2. Canonical ordering: a stable insertion sort of each run of non-starters by combining class. */
    for (i = 1; i < len; i++) {
        uint32_t cp = out[i], cc = range_value(u->ccc, u->n_ccc, cp);
        size_t j = i;
        if (!cc)
            continue;
        while (j > 0) {
            uint32_t prev = range_value(u->ccc, u->n_ccc, out[j - 1]);
            if (!prev || prev <= cc)
                break;
            out[j] = out[j - 1];
            j--;
        }
        out[j] = cp;
    }
    /* 3. Canonical composition (UAX #15): a character joins the last starter unless a character between them
       has class 0 or a class >= its own; last_ccc == 0 means the starter is its direct neighbour. */
    starter = 0;
    last_ccc = range_value(u->ccc, u->n_ccc, out[0]);
    have_starter = last_ccc == 0;
    kept = 1;
    for (i = 1; i < len; i++) {
        uint32_t cp = out[i], cc = range_value(u->ccc, u->n_ccc, cp), composite;
        if (have_starter && (last_ccc == 0 || last_ccc < cc) && (composite = compose_pair(u, out[starter], cp))) {
            out[starter] = composite;
            continue;
        }
        if (cc == 0) {
            starter = kept;
            have_starter = 1;
        }
        last_ccc = cc;
        out[kept++] = cp;
    }
    return kept;
}
