/* rk_translate: translate one text with the distilled student on the RV1126B NPU (or a replayed recording).

     rk_translate [--direction zh-en|en-zh] [--backend rknn|replay] [--max_tokens N] [--bench N]
                  ENCODER DECODER TOKENIZER_BIN EMBED_BIN TEXT

   Prints the translation on stdout; source/output ids and per-stage timings on stderr; with --bench N, the text is
   translated N more times and the mean per-token time is printed split into rknn_run and the runner's own work. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "embed.h"
#include "tokenizer.h"
#include "translate.h"
#include "unicode.h"

static const rkt_backend *const backends[] = {&rkt_rknn_backend, &rkt_replay_backend};

typedef struct {
    const char *paths[5]; /* encoder, decoder, tokenizer, embed, text */
    const rkt_backend *backend;
    uint32_t direction, max_tokens, bench;
} args;

static void usage(FILE *to)
{
    size_t i;
    fprintf(to, "usage: rk_translate [--direction zh-en|en-zh] [--backend NAME] [--max_tokens N] [--bench N]\n"
                "                    ENCODER DECODER TOKENIZER_BIN EMBED_BIN TEXT\n"
                "  --direction   zh-en (default) or en-zh\n"
                "  --backend     one of:");
    for (i = 0; i < sizeof backends / sizeof *backends; i++)
        fprintf(to, " %s%s", backends[i]->name, i ? "" : " (default)");
    fprintf(to, "; replay reads a recording from ENCODER and takes - as DECODER\n"
                "  --max_tokens  most output tokens (default: the transformer decoder's cache length Tc, or for a\n"
                "                recurrent decoder embed.bin's positions - 1; pass the student's max_target_len)\n"
                "  --bench       translate the text N more times and print the mean time per token: rknn_run\n"
                "                (wall clock, and RKNN_QUERY_PERF_RUN) and the runner's own work apart\n"
                "  librknnrt.so: from $RKNN_LIB (its folder) when set, else the library path, then /oem/usr/lib\n");
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
                    return rkt_fail(arg, "no backend '%s'; choose rknn or replay", value);
            } else if (strcmp(arg, "--max_tokens") == 0 || strcmp(arg, "--bench") == 0) {
                unsigned long v = strtoul(value, &end, 10);
                if (*end || !*value || v == 0 || v > 0xFFFFFFFFul || value[0] == '-')
                    return rkt_fail(arg, "'%s' is not a positive integer", value);
                *(strcmp(arg, "--bench") == 0 ? &a->bench : &a->max_tokens) = (uint32_t)v;
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

/* --bench: the text translated a.bench more times; mean per-token times, rknn_run and the runner's own work apart.
   One key=value line, so scripts (bench/runner_host.py) read it as people do. */
static int bench(const args *a, const rkt_dims *dims, const rkt_embed *emb, const rkt_decode_params *p, void *ctx,
                 const rkt_u32vec *src)
{
    rkt_runtime_time before, after;
    rkt_timing t, sum;
    rkt_u32vec out = {0};
    uint32_t run;
    double steps, perf;
    char perf_s[32];
    memset(&sum, 0, sizeof sum);
    a->backend->runtime_time(ctx, &before);
    for (run = 0; run < a->bench; run++) {
        out.n = 0;
        if (rkt_translate_ids(a->backend, ctx, dims, emb, p, src->v, src->n, &out, &t)) {
            rkt_u32vec_free(&out);
            return -1;
        }
        sum.encoder_ms += t.encoder_ms;
        sum.decoder_ms += t.decoder_ms;
        sum.steps += t.steps;
    }
    rkt_u32vec_free(&out);
    a->backend->runtime_time(ctx, &after);
    steps = sum.steps ? sum.steps : 1;
    perf = after.decoder_perf_us >= 0 ? (after.decoder_perf_us - before.decoder_perf_us) / 1e3 / steps : -1;
    if (perf >= 0)
        snprintf(perf_s, sizeof perf_s, "%.4f", perf);
    else
        snprintf(perf_s, sizeof perf_s, "n/a");
    fprintf(stderr,
            "bench: runs=%u tokens=%u per_token_ms=%.4f run_ms=%.4f perf_run_ms=%s host_ms=%.4f encoder_ms=%.4f "
            "encoder_run_ms=%.4f backend=%s\n",
            a->bench, sum.steps / a->bench, sum.decoder_ms / steps,
            (after.decoder_run_ms - before.decoder_run_ms) / steps, perf_s,
            (sum.decoder_ms - (after.decoder_run_ms - before.decoder_run_ms) - (after.probe_ms - before.probe_ms)) /
                steps,
            sum.encoder_ms / a->bench, (after.encoder_run_ms - before.encoder_run_ms) / a->bench, a->backend->name);
    return 0;
}

static int run(const args *a, const rkt_tokenizer *tok, const rkt_embed *emb, const rkt_dims *dims, void *ctx,
               double load_ms)
{
    rkt_decode_params p;
    rkt_u32vec src = {0}, out = {0};
    rkt_bytes text = {0};
    rkt_timing timing;
    rkt_runtime_time runtime;
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
        double end = rkt_now_ms(), steps = timing.steps ? timing.steps : 1;
        a->backend->runtime_time(ctx, &runtime);
        printf("%s\n", (const char *)text.p);
        fflush(stdout);
        print_ids("source ids", &src);
        print_ids("output ids", &out);
        fprintf(stderr,
                "timing: load %.2f ms, tokenize %.3f ms, encoder %.3f ms, decoder %u steps mean %.3f ms "
                "(rknn_run %.3f ms, host %.3f ms), detokenize %.3f ms, total %.3f ms (backend %s, %s decoder)\n",
                load_ms, t1 - t0, timing.encoder_ms, timing.steps, timing.decoder_ms / steps,
                runtime.decoder_run_ms / steps, (timing.decoder_ms - runtime.decoder_run_ms) / steps, end - t2,
                end - t0, a->backend->name, dims->kind == RKT_TRANSFORMER ? "transformer" : "recurrent");
        if (a->bench)
            rc = bench(a, dims, emb, &p, ctx, &src);
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
        (ctx = a.backend->load(a.paths[0], a.paths[1], a.bench > 0)) && a.backend->query(ctx, &dims) == 0)
        rc = run(&a, tok, &emb, &dims, ctx, rkt_now_ms() - start) ? 1 : 0;
    if (ctx)
        a.backend->release(ctx);
    rkt_embed_free(&emb);
    rkt_tokenizer_free(tok);
    return rc;
}
