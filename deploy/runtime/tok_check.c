/* Test driver for the C tokenizer (tests/test_runtime.py).

     tok_check TOKENIZER_BIN < texts       texts separated by NUL bytes; prints per text one line:
                                           student ids (space-separated), a tab, decode(ids) in hex
     tok_check --decode TOKENIZER_BIN < ids  one line of space-separated student ids per case; prints
                                           decode(ids) in hex, one line each

   Hex output keeps newlines and invalid UTF-8 in the texts from breaking the line protocol. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"

static void print_hex(const rkt_bytes *b)
{
    size_t i;
    for (i = 0; i < b->n; i++)
        printf("%02x", b->p[i]);
}

/* Decodes ids and prints the case's line: with_ids puts the ids and a tab before decode(ids) in hex. Takes rc, the
   status of what produced ids (nothing is printed if it failed), and frees ids. */
static int finish_case(const rkt_tokenizer *tok, rkt_u32vec *ids, int rc, int with_ids)
{
    rkt_bytes text = {0};
    size_t i;
    if (rc == 0)
        rc = rkt_tokenizer_decode(tok, ids->v, ids->n, &text);
    if (rc == 0) {
        for (i = 0; with_ids && i < ids->n; i++)
            printf(i ? " %u" : "%u", ids->v[i]);
        if (with_ids)
            putchar('\t');
        print_hex(&text);
        putchar('\n');
    }
    rkt_u32vec_free(ids);
    rkt_bytes_free(&text);
    return rc;
}

static int encode_all(const rkt_tokenizer *tok, const uint8_t *in, size_t n)
{
    size_t start = 0;
    while (start < n) {
        const uint8_t *end = memchr(in + start, 0, n - start);
        size_t len = end ? (size_t)(end - (in + start)) : n - start;
        rkt_u32vec ids = {0};
        int rc = rkt_tokenizer_encode(tok, in + start, len, &ids);
        if (finish_case(tok, &ids, rc, 1))
            return -1;
        start += len + 1;
    }
    return 0;
}

static int decode_all(const rkt_tokenizer *tok, const uint8_t *in, size_t n)
{
    size_t pos = 0;
    while (pos < n) {
        rkt_u32vec ids = {0};
        int rc = 0;
        while (pos < n && in[pos] != '\n' && rc == 0) {
            unsigned long long value = 0;
            if (in[pos] == ' ') {
                pos++;
                continue;
            }
            if (in[pos] < '0' || in[pos] > '9') {
                rc = rkt_fail("tok_check", "ids must be decimal numbers, got byte 0x%02x", in[pos]);
                break;
            }
            while (pos < n && in[pos] >= '0' && in[pos] <= '9' && value <= 0xFFFFFFFFull)
                value = value * 10 + (unsigned long long)(in[pos++] - '0');
            rc = value > 0xFFFFFFFFull ? rkt_fail("tok_check", "id too large") : rkt_u32vec_push(&ids, (uint32_t)value);
        }
        pos++;
        if (finish_case(tok, &ids, rc, 0))
            return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    int decode = argc == 3 && strcmp(argv[1], "--decode") == 0, rc;
    rkt_tokenizer *tok;
    uint8_t *in;
    size_t n;
    if (argc != 2 + decode) {
        fprintf(stderr, "usage: tok_check [--decode] TOKENIZER_BIN < input\n");
        return 2;
    }
    if (!(tok = rkt_tokenizer_load(argv[1 + decode])))
        return 1;
    if (rkt_read_file("/dev/stdin", &in, &n)) {
        rkt_tokenizer_free(tok);
        return 1;
    }
    rc = decode ? decode_all(tok, in, n) : encode_all(tok, in, n);
    free(in);
    rkt_tokenizer_free(tok);
    return rc ? 1 : 0;
}
