/* rk_translate: translate one text with the distilled student on the RV1126B NPU (or a replayed recording).

     rk_translate [--direction zh-en|en-zh] [--backend rknn|replay] [--max_tokens N]
                  ENCODER DECODER TOKENIZER_BIN EMBED_BIN TEXT

   Prints the translation on stdout; source/output ids and per-stage timings on stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "embed.h"
#include "tokenizer.h"
#include "translate.h"
#include "unicode.h"

static const rkt_backend *const backends[] = {
#ifdef RKT_HAVE_RKNN
    &rkt_rknn_backend,
#endif
    &rkt_replay_backend,
};

typedef struct {
    const char *paths[5]; /* encoder, decoder, tokenizer, embed, text */
    const rkt_backend *backend;
    uint32_t direction, max_tokens;
} args;

static void usage(FILE *to)
{
    size_t i;
    fprintf(to, "usage: rk_translate [--direction zh-en|en-zh] [--backend NAME] [--max_tokens N]\n"
                "                    ENCODER DECODER TOKENIZER_BIN EMBED_BIN TEXT\n"
                "  --direction   zh-en (default) or en-zh\n"
                "  --backend     one of:");
    for (i = 0; i < sizeof backends / sizeof *backends; i++)
        fprintf(to, " %s%s", backends[i]->name, i ? "" : " (default)");
    fprintf(to, "; replay reads a recording from ENCODER and takes - as DECODER\n"
                "  --max_tokens  most output tokens (default: the transformer decoder's cache length Tc, or for a\n"
                "                recurrent decoder embed.bin's positions - 1; pass the student's max_target_len)\n");
}

static int parse_args(int argc, char **argv, args *a)
{
    int i, n = 0, options = 1;
    memset(a, 0, sizeof *a);
    a->backend = backends[0];
    for (i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (options && strcmp(arg, "--") == 0) {
            options = 0;
        } else if (options && (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0)) {
            usage(stdout);
            exit(0);
        } else if (options && arg[0] == '-' && arg[1] == '-') {
            const char *value = i + 1 < argc ? argv[++i] : NULL;
            size_t k;
            char *end;
            if (!value)
                return rkt_fail(arg, "needs a value");
            if (strcmp(arg, "--direction") == 0) {
                if (strcmp(value, "zh-en") && strcmp(value, "en-zh"))
                    return rkt_fail(arg, "'%s' is neither zh-en nor en-zh", value);
                a->direction = strcmp(value, "en-zh") == 0;
            } else if (strcmp(arg, "--backend") == 0) {
                a->backend = NULL;
                for (k = 0; k < sizeof backends / sizeof *backends; k++)
                    if (strcmp(value, backends[k]->name) == 0)
                        a->backend = backends[k];
                if (!a->backend)
                    return rkt_fail(arg, "no backend '%s' in this build (rknn needs -DRKNN_SDK=...)", value);
            } else if (strcmp(arg, "--max_tokens") == 0) {
                unsigned long v = strtoul(value, &end, 10);
                if (*end || !*value || v == 0 || v > 0xFFFFFFFFul || value[0] == '-')
                    return rkt_fail(arg, "'%s' is not a positive integer", value);
                a->max_tokens = (uint32_t)v;
            } else {
                return rkt_fail(arg, "unknown option");
            }
        } else if (n < 5) {
            a->paths[n++] = arg;
        } else {
            return rkt_fail(arg, "unexpected extra argument");
        }
    }
    if (n != 5)
        return rkt_fail("arguments", "expected ENCODER DECODER TOKENIZER_BIN EMBED_BIN TEXT, got %d", n);
    return 0;
}

/* Trims leading and trailing whitespace, as the Python translator's text.strip() does before tokenizing. */
static void strip(const rkt_tokenizer *tok, const char **text, size_t *len)
{
    rkt_u32vec cp = {0};
    size_t first = 0, last, i, start = 0, end = 0;
    if (rkt_utf8_decode((const uint8_t *)*text, *len, &cp, "input")) {
        rkt_u32vec_free(&cp); /* leave it: encode reports the invalid UTF-8 */
        return;
    }
    while (first < cp.n && rkt_tokenizer_char_class(tok, cp.v[first]) == RKT_SPACE)
        first++;
    last = cp.n;
    while (last > first && rkt_tokenizer_char_class(tok, cp.v[last - 1]) == RKT_SPACE)
        last--;
    for (i = 0; i < last; i++) {
        size_t bytes = cp.v[i] < 0x80 ? 1 : cp.v[i] < 0x800 ? 2 : cp.v[i] < 0x10000 ? 3 : 4;
        if (i < first)
            start += bytes;
        end += bytes;
    }
    *text += start;
    *len = end - start;
    rkt_u32vec_free(&cp);
}

static void print_ids(const char *label, const rkt_u32vec *ids)
{
    size_t i;
    fprintf(stderr, "%s (%zu):", label, ids->n);
    for (i = 0; i < ids->n; i++)
        fprintf(stderr, " %u", ids->v[i]);
    fputc('\n', stderr);
}

static int run(const args *a, const rkt_tokenizer *tok, const rkt_embed *emb, const rkt_dims *dims, void *ctx,
               double load_ms)
{
    rkt_decode_params p;
    rkt_u32vec src = {0}, out = {0};
    rkt_bytes text = {0};
    rkt_timing timing;
    const char *input = a->paths[4];
    size_t len = strlen(input);
    double t0, t1, t2;
    int rc;
    p.direction = a->direction;
    p.pad = rkt_tokenizer_pad(tok);
    p.bos = rkt_tokenizer_bos(tok);
    p.eos = rkt_tokenizer_eos(tok);
    p.max_tokens = a->max_tokens ? a->max_tokens
                   : dims->kind == RKT_TRANSFORMER ? dims->cache_len
                                                  : emb->max_positions - 1;
    if (rkt_tokenizer_vocab_size(tok) != dims->vocab)
        return rkt_fail(a->paths[2], "%u student ids, the decoder's logits have V = %u",
                        rkt_tokenizer_vocab_size(tok), dims->vocab);
    if (rkt_check_setup(dims, emb, &p))
        return -1;
    t0 = rkt_now_ms();
    strip(tok, &input, &len);
    rc = rkt_tokenizer_encode(tok, (const uint8_t *)input, len, &src);
    t1 = rkt_now_ms();
    if (rc == 0)
        rc = rkt_translate_ids(a->backend, ctx, dims, emb, &p, src.v, src.n, &out, &timing);
    t2 = rkt_now_ms();
    if (rc == 0)
        rc = rkt_tokenizer_decode(tok, out.v, out.n, &text);
    if (rc == 0) {
        double end = rkt_now_ms();
        printf("%s\n", (const char *)text.p);
        print_ids("source ids", &src);
        print_ids("output ids", &out);
        fprintf(stderr,
                "timing: load %.2f ms, tokenize %.3f ms, encoder %.3f ms, decoder %u steps mean %.3f ms, "
                "detokenize %.3f ms, total %.3f ms (backend %s, %s decoder)\n",
                load_ms, t1 - t0, timing.encoder_ms, timing.steps,
                timing.steps ? timing.decoder_ms / timing.steps : 0.0, end - t2, end - t0, a->backend->name,
                dims->kind == RKT_TRANSFORMER ? "transformer" : "recurrent");
    }
    rkt_u32vec_free(&src);
    rkt_u32vec_free(&out);
    rkt_bytes_free(&text);
    return rc;
}

int main(int argc, char **argv)
{
    args a;
    rkt_tokenizer *tok = NULL;
    rkt_embed emb;
    rkt_dims dims;
    void *ctx = NULL;
    double start = rkt_now_ms();
    int rc = 1;
    if (parse_args(argc, argv, &a)) {
        usage(stderr);
        return 2;
    }
    memset(&emb, 0, sizeof emb);
    if ((tok = rkt_tokenizer_load(a.paths[2])) && rkt_embed_load(a.paths[3], &emb) == 0 &&
        (ctx = a.backend->load(a.paths[0], a.paths[1])) && a.backend->query(ctx, &dims) == 0)
        rc = run(&a, tok, &emb, &dims, ctx, rkt_now_ms() - start) ? 1 : 0;
    if (ctx)
        a.backend->release(ctx);
    rkt_embed_free(&emb);
    rkt_tokenizer_free(tok);
    return rc;
}
