"""Build the zh<->en corpus from the machine's gettext catalogs, split by catalog.

    python -m scripts.build_corpus --gettext /usr/share/locale --out data/catalogs [--labels data/labels]

Writes OUT/train.jsonl, OUT/valid.jsonl, OUT/test.jsonl ({"zh", "en", "catalog"} a line) and OUT/stats.json.
With --labels, also the short-label subset of each split (at most --label_words English words: menu items and
buttons), which a small model trained from scratch on a CPU can learn in minutes.
Catalog strings that training would reject as bad lines (untranslated, empty, too long, wrong language,
duplicates) are dropped here and counted per reason, so the splits validate cleanly at the same --max_chars.
"""

from __future__ import annotations

import argparse
import logging
import sys

from corpus import MAX_CHARS, CorpusError, build_catalog_corpus, write_label_subset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gettext", default="/usr/share/locale", help="locale folder holding LANG/LC_MESSAGES/*.mo")
    parser.add_argument("--language", default="zh_CN", help="catalog language folder to read")
    parser.add_argument("--out", default="data/catalogs", help="output folder for the splits and stats.json")
    parser.add_argument("--valid_fraction", type=float, default=0.05, help="share of pairs (whole catalogs) for valid")
    parser.add_argument("--test_fraction", type=float, default=0.05, help="share of pairs (whole catalogs) for test")
    parser.add_argument("--max_chars", type=int, default=MAX_CHARS,
                        help="drop pairs with a side longer than this; train with --data.max_chars at least this")
    parser.add_argument("--seed", type=int, default=0, help="seed for assigning catalogs to splits")
    parser.add_argument("--labels", default=None, help="also write the short-label subset of every split here")
    parser.add_argument("--label_words", type=int, default=3, help="most English words of a short label (default 3)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        stats = build_catalog_corpus(args.gettext, args.out, args.language, args.valid_fraction,
                                     args.test_fraction, args.seed, args.max_chars)
    except CorpusError as exc:
        print(f"build_corpus: {exc}", file=sys.stderr)
        return 2
    print(f"{stats.raw_pairs} raw pairs, {stats.kept_pairs} kept -> {args.out} "
          + ", ".join(f"{s}: {n} pairs / {len(stats.catalogs[s])} catalogs" for s, n in stats.pairs.items()))
    print("dropped: " + " ".join(f"{reason}={n}" for reason, n in stats.dropped.most_common()))
    if args.labels:
        counts = write_label_subset(args.out, args.labels, args.label_words)
        print(f"labels (at most {args.label_words} English words) -> {args.labels} "
              + ", ".join(f"{s}: {n} pairs" for s, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
