#include "pretok.h"

static int is_newline(uint32_t c)
{
    return c == '\r' || c == '\n';
}

/* Case-insensitive ASCII letter test as Oniguruma folds it: U+017F (long s) folds to 's'. */
static int folds_to(uint32_t c, char letter)
{
    if (letter == 's' && c == 0x17F)
        return 1;
    return c == (uint32_t)letter || c == (uint32_t)letter - 32;
}

static size_t run_of(const rkt_unicode *u, const uint32_t *cp, size_t n, size_t pos, int cls)
{
    size_t end = pos;
    while (end < n && rkt_char_class(u, cp[end]) == cls)
        end++;
    return end;
}

size_t rkt_pretok_next(const rkt_unicode *u, const uint32_t *cp, size_t n, size_t pos)
{
    uint32_t c = cp[pos];
    int cls = rkt_char_class(u, c);
    int next_cls = pos + 1 < n ? rkt_char_class(u, cp[pos + 1]) : -1;
    size_t end, last_newline, i;

    /* (?i:'s|'t|'re|'ve|'m|'ll|'d) */
    if (c == '\'' && pos + 1 < n) {
        uint32_t a = cp[pos + 1], b = pos + 2 < n ? cp[pos + 2] : 0;
        if (folds_to(a, 's') || folds_to(a, 't') || folds_to(a, 'm') || folds_to(a, 'd'))
            return 2;
        if ((folds_to(a, 'r') && folds_to(b, 'e')) || (folds_to(a, 'v') && folds_to(b, 'e')) ||
            (folds_to(a, 'l') && folds_to(b, 'l')))
            return 3;
    }
    /* [^\r\n\p{L}\p{N}]?\p{L}+ : the optional lead character is tried first, as the engine is greedy. */
    if (cls == RKT_LETTER)
        return run_of(u, cp, n, pos, RKT_LETTER) - pos;
    if (!is_newline(c) && cls != RKT_NUMBER && next_cls == RKT_LETTER)
        return run_of(u, cp, n, pos + 1, RKT_LETTER) - pos;
    /* \p{N} */
    if (cls == RKT_NUMBER)
        return 1;
    /* ' ?[^\s\p{L}\p{N}]+[\r\n]*' */
    end = pos;
    if (c == ' ' && next_cls == RKT_OTHER)
        end = pos + 1;
    if (rkt_char_class(u, cp[end]) == RKT_OTHER) {
        end = run_of(u, cp, n, end, RKT_OTHER);
        while (end < n && is_newline(cp[end]))
            end++;
        return end - pos;
    }
    /* Only whitespace is left here: letters, numbers and "other" all matched above. */
    end = run_of(u, cp, n, pos, RKT_SPACE);
    /* \s*[\r\n]+ : greedy \s* backs off to the last newline of the run. */
    last_newline = end;
    for (i = pos; i < end; i++)
        if (is_newline(cp[i]))
            last_newline = i;
    if (last_newline < end)
        return last_newline + 1 - pos;
    /* \s+(?!\S) : the whole run at the end of the text, else all of it but the last space before a non-space. */
    if (end == n)
        return end - pos;
    if (end - pos >= 2)
        return end - 1 - pos;
    /* \s+ */
    return end - pos;
}
