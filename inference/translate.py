"""Translate sentences with a student or teacher folder.

    python -m inference.translate --model runs/quickstart/distill/final --direction zh-en "打开文件"
    python -m inference.translate --model DIR --direction en-zh --input sentences.txt   # one a line

A line over the model's source limit is refused with its token count; --split_long translates it sentence by
sentence instead (joined without spaces in Chinese, with one in English).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import vocabulary
from inference.translator import InputTooLongError, Translator


def read_sentences(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file (--input: one sentence a line)."""
    with Path(path).open(encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="*", help="sentences to translate (or use --input)")
    parser.add_argument("--model", required=True, help="student folder (RUN/final) or teacher folder")
    parser.add_argument("--direction", default="zh-en", choices=("zh-en", "en-zh"), help="translation direction")
    parser.add_argument("--input", help="UTF-8 file with one sentence a line")
    parser.add_argument("--num_beams", type=int, default=1, help="beam width (1 = greedy)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--split_long", action="store_true",
                        help="split a text over the model's source limit by sentence (and by token count when one "
                             "sentence is still too long) instead of refusing it")
    args = parser.parse_args(argv)
    texts = list(args.text) + (read_sentences(args.input) if args.input else [])
    if not texts:
        parser.error("give sentences as arguments or --input FILE")
    try:
        translator = Translator(args.model, args.device, split_long=args.split_long)
        for line in translator.translate(texts, args.direction, args.num_beams):
            print(line)
    except (InputTooLongError, vocabulary.VocabMismatchError, FileNotFoundError) as exc:
        print(f"translate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
