"""Score a model on a test split: BLEU and chrF (sacrebleu), speed and size, as one JSON object.

    python -m inference.evaluate --model runs/quickstart/distill/final --test data/catalogs/test.jsonl \
        --direction zh-en --json
    python -m inference.evaluate --model dist/rv1126b --backend onnx      # a deploy output folder (DIST)

A source over the model's limit is left out and counted (skipped_too_long); with --split_long it is translated
sentence by sentence instead and counted in split_too_long. Nothing is truncated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import corpus
import vocabulary
from deploy import contract
from inference import backends
from inference.metrics import score
from inference.translator import Translator


def spread(count: int, n: int) -> list[int]:
    """n indices spread evenly over range(count), first and last included (all of them when count <= n): a fixed
    sample across a test file, not its first lines, which come from one catalog."""
    if count <= n or n <= 1:
        return list(range(min(count, n)))
    return [round(i * (count - 1) / (n - 1)) for i in range(n)]


def evaluate(translator: Translator, pairs: list[corpus.Pair], direction: str, num_beams: int = 1,
             examples: int = 5) -> dict:
    """Scores of translator on pairs in one direction, with `examples` translations spread over the pairs, and
    per source (catalog or file: `by_source`, largest first) when the pairs come from more than one."""
    src_lang, tgt_lang = direction.split("-")
    fits = [translator.fits(p.side(src_lang)) for p in pairs]
    too_long = fits.count(False)
    usable = pairs if translator.split_long else [p for p, ok in zip(pairs, fits) if ok]
    start = time.perf_counter()
    hyps = translator.translate([p.side(src_lang) for p in usable], direction, num_beams)
    elapsed = time.perf_counter() - start
    result = score(hyps, [p.side(tgt_lang) for p in usable], tgt_lang)
    by_source: dict[str, tuple[list[str], list[str]]] = {}
    for pair, hyp in zip(usable, hyps):
        hyps_refs = by_source.setdefault(pair.source, ([], []))
        hyps_refs[0].append(hyp)
        hyps_refs[1].append(pair.side(tgt_lang))
    if len(by_source) > 1:  # a split of several catalogs: which of them the score comes from
        result["by_source"] = {source: score(*by_source[source], tgt_lang)
                               for source in sorted(by_source, key=lambda s: -len(by_source[s][0]))}
    result.update(direction=direction, skipped_too_long=len(pairs) - len(usable),
                  split_too_long=too_long if translator.split_long else 0,
                  ms_per_sentence=round(1000 * elapsed / max(1, len(usable)), 2), params=translator.parameters,
                  examples=[{"source": usable[i].side(src_lang), "hypothesis": hyps[i],
                             "reference": usable[i].side(tgt_lang)} for i in spread(len(usable), examples)])
    return result


def backend_arg(text: str) -> str:
    try:
        return backends.check_backend(text)
    except backends.BackendError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="student folder (RUN/final) or teacher folder")
    parser.add_argument("--test", default="data/catalogs/test.jsonl", help="test pairs (.jsonl or .tsv)")
    parser.add_argument("--direction", default="zh-en", choices=("zh-en", "en-zh"), help="translation direction")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N pairs (0 = all)")
    parser.add_argument("--num_beams", type=int, default=1, help="beam width (1 = greedy)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--backend", default="torch", type=backend_arg,
                        help="torch (default; --model is a student or teacher folder), or onnx, onnx-int8, "
                             "rknn-sim[:PRECISION] (--model is a deploy output folder; rknn-sim defaults to the "
                             "precision deploy chose and needs .venv-rknn)")
    parser.add_argument("--split_long", action="store_true",
                        help="translate sources over the model's length limit sentence by sentence "
                             "(default: leave them out and count them in skipped_too_long)")
    parser.add_argument("--examples", type=int, default=5,
                        help="translations kept in the JSON, spread evenly over the test pairs (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary line")
    args = parser.parse_args(argv)
    try:
        pairs = corpus.read_pairs(args.test, on_bad_line="skip")
        pairs = pairs[:args.limit] if args.limit else pairs
        translator = Translator(args.model, args.device, backend=args.backend, split_long=args.split_long)
        result = evaluate(translator, pairs, args.direction, args.num_beams, args.examples)
        result["test"] = str(args.test)  # names the split in a model card (inference.model_card --eval)
    except (corpus.CorpusError, vocabulary.VocabMismatchError, FileNotFoundError, contract.ContractError,
            backends.BackendError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"{args.model} [{args.backend}] {args.direction}: BLEU {result['bleu']:.2f} chrF {result['chrf']:.2f} "
              f"n={result['n']} {result['ms_per_sentence']} ms/sentence {result['params']:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
