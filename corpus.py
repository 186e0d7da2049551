"""Parallel zh/en corpora: pairs, reading and validating JSONL/TSV files and `datasets` splits under one bad-line
policy, and the corpus built from the machine's gettext catalogs (plus its short-label subset).

Every reader applies the same pair rules (problem_with), so a corpus that loads here trains without surprises;
a bad line is named with its file, line and reason.
"""

from __future__ import annotations

import codecs
import gettext
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MAX_CHARS = DataConfig.max_chars  # default longest side of a pair; config.py owns the value


class CorpusError(ValueError):
    """A corpus source cannot be read or holds malformed lines (message names file, line and reason)."""


@dataclass(frozen=True)
class Pair:
    zh: str
    en: str
    source: str = ""  # catalog or file the pair came from; used to split without leaks

    def side(self, lang: str) -> str:
        return self.zh if lang == "zh" else self.en


# --------------------------------------------------------------------------- reading and validation

# Why a line is unusable, as a short key: bad lines are counted per key (logs, CheckResult.counts, stats.json).
REASONS = ("not_utf8", "invalid_json", "invalid_tsv", "not_object", "missing_field", "not_string", "empty_field",
           "too_long", "source_equals_target", "not_chinese", "not_english", "duplicate")
SHOWN_PROBLEMS = 20  # an error lists this many bad lines and counts the rest

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_LATIN = re.compile(r"[A-Za-z]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # only a JSON escape such as "\ud800" can put one in a str
# English text may quote a few ideographs ("the character 中 means middle"); more than one per this many Latin
# letters means the field is Chinese or mixed, usually swapped columns.
LATIN_LETTERS_PER_IDEOGRAPH = 10


@dataclass(frozen=True)
class Problem:
    reason: str  # one of REASONS
    detail: str  # what is wrong; how to fix


@dataclass(frozen=True)
class BadLine:
    where: str  # "path:line", or "dataset[split]:row"
    problem: Problem

    def __str__(self) -> str:
        return f"{self.where}: {self.problem.detail}"


@dataclass
class CheckResult:
    """One corpus file (or dataset split) after validation: its usable pairs and every bad line."""
    origin: str
    pairs: list[Pair] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)

    @property
    def lines(self) -> int:
        """Non-blank lines (or rows) read: each is a pair or a bad line."""
        return len(self.pairs) + len(self.bad)

    @property
    def counts(self) -> Counter:
        return Counter(b.problem.reason for b in self.bad)

    def summary(self) -> str:
        if not self.bad:
            return f"{self.origin}: {len(self.pairs)} pairs, no bad lines"
        return f"{self.origin}: kept {len(self.pairs)} of {self.lines} lines, skipped {_count_text(self.counts)}"


def _count_text(counts: Counter) -> str:
    return " ".join(f"{reason}={n}" for reason, n in counts.most_common())


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def problem_with(zh: object, en: object, max_chars: int) -> Problem | None:
    """Why a pair is unusable, or None when it is fine."""
    for lang, text in (("zh", zh), ("en", en)):
        if not isinstance(text, str):
            return Problem("not_string", f"field {lang!r} is {_json_type(text)}, not a string; quote the text")
        if not text.strip():
            return Problem("empty_field", f"field {lang!r} is empty; translate it or remove the line")
        if len(text) > max_chars:
            return Problem("too_long", f"field {lang!r} has {len(text)} characters, more than "
                           f"data.max_chars={max_chars}; split the sentence or raise --data.max_chars")
        if _SURROGATE.search(text):
            return Problem("not_utf8", f"field {lang!r} holds a lone surrogate escape, which UTF-8 cannot "
                           "encode; fix the \\uXXXX escape")
    # Checked before the language rules: an untranslated line would otherwise be reported as "no Chinese".
    if zh.strip() == en.strip():
        return Problem("source_equals_target", "zh and en are the same text (untranslated); translate it "
                       "or remove the line")
    if not _CJK.search(zh):
        return Problem("not_chinese", "field 'zh' has no Chinese ideograph; check that zh and en are not swapped")
    if _CJK.search(en) or not _LATIN.search(en):  # counting every line's letters would slow big corpora down
        latin, ideographs = len(_LATIN.findall(en)), len(_CJK.findall(en))
        if not latin or ideographs * LATIN_LETTERS_PER_IDEOGRAPH > latin:
            return Problem("not_english", f"field 'en' has {latin} Latin letter(s) and {ideographs} Chinese "
                           f"ideograph(s), English needs a letter and at most 1 ideograph per "
                           f"{LATIN_LETTERS_PER_IDEOGRAPH} letters; check that zh and en are not swapped")
    return None


def _pair_from_record(record: object) -> tuple[object, object, object] | Problem:
    """(zh, en, catalog) of a JSON line or dataset row, or why it has none."""
    if not isinstance(record, dict):
        return Problem("not_object", f"{_json_type(record)}, not an object; write "
                       '{"zh": "...", "en": "..."} a line')
    fields = record
    if "translation" in record:  # the Hugging Face WMT schema
        fields = record["translation"]
        if not isinstance(fields, dict):
            return Problem("not_object", f"field 'translation' is {_json_type(fields)}, not an object; write "
                           '{"translation": {"zh": "...", "en": "..."}}')
    for lang in ("zh", "en"):
        if lang not in fields:
            return Problem("missing_field", f"field {lang!r} is missing; give both \"zh\" and \"en\"")
    catalog = record.get("catalog", "")
    if not isinstance(catalog, str):
        return Problem("not_string", f"field 'catalog' is {_json_type(catalog)}, not a string; quote it or drop it")
    return fields["zh"], fields["en"], catalog


def _parse_line(raw: bytes, suffix: str) -> tuple[object, object, object] | Problem:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")  # so a JSON error's column is on this line, not past its end
    except UnicodeDecodeError as exc:
        return Problem("not_utf8", f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                       "re-encode the file as UTF-8")
    if suffix == ".tsv":
        cols = text.split("\t")
        if len(cols) != 2:
            return Problem("invalid_tsv", f"{len(cols)} tab-separated column(s), expected 2 (zh, en); "
                           "remove stray tabs or join the line")
        return cols[0], cols[1], ""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError or too many digits; nesting deeper than the stack
        what = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        return Problem("invalid_json", f"invalid JSON ({what}); write one JSON object a line")
    return _pair_from_record(record)


def _validate(origin: str, entries: Iterable[tuple[int, tuple[object, object, object] | Problem]],
              max_chars: int, unit: str, default_source: str) -> CheckResult:
    """Check numbered (zh, en, source) entries: pair rules, then exact duplicates (stripped, as the model sees
    them) within this one origin."""
    result = CheckResult(origin)
    first_seen: dict[tuple[str, str], int] = {}
    for number, parsed in entries:
        problem = parsed if isinstance(parsed, Problem) else problem_with(parsed[0], parsed[1], max_chars)
        if problem is None:
            zh, en, source = parsed
            key = (zh.strip(), en.strip())
            if key not in first_seen:
                first_seen[key] = number
                result.pairs.append(Pair(zh, en, source or default_source))
                continue
            problem = Problem("duplicate", f"exact duplicate of {unit} {first_seen[key]}; remove one of them")
        result.bad.append(BadLine(f"{origin}:{number}", problem))
    return result


def _file_entries(handle: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(handle, start=1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows start UTF-8 files with one
        if raw.strip():
            yield number, raw


def check_file(path: str | Path, max_chars: int = MAX_CHARS) -> CheckResult:
    """Validate every line of a .jsonl ({"zh","en"} or {"translation": {...}}) or .tsv (zh<TAB>en) file.

    Bytes are decoded line by line, so a non-UTF-8 line is reported like any other bad line.
    """
    path = Path(path)
    suffix = ".tsv" if path.suffix == ".tsv" else ".jsonl"
    try:
        with path.open("rb") as handle:
            entries = ((number, _parse_line(raw, suffix)) for number, raw in _file_entries(handle))
            return _validate(str(path), entries, max_chars, "line", path.stem)
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc}); give a readable .jsonl or .tsv file") from None


def enforce(results: Sequence[CheckResult], on_bad_line: str) -> None:
    """Apply the bad-line policy to checked sources: 'error' raises one CorpusError listing the bad lines of all
    of them; 'skip' keeps only the good pairs and logs one warning per source that lost lines, with its counts
    per reason (clean sources log at debug level, so CLIs that use the loaders keep their output quiet)."""
    if on_bad_line not in ("error", "skip"):
        raise CorpusError(f"on_bad_line={on_bad_line!r}; use 'error' or 'skip'")
    bad = [line for result in results for line in result.bad]
    if bad and on_bad_line == "error":
        shown = "\n  ".join(str(line) for line in bad[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(bad) - SHOWN_PROBLEMS} more" if len(bad) > SHOWN_PROBLEMS else ""
        by_origin = "; ".join(f"{r.origin}: {_count_text(r.counts)}" for r in results if r.bad)
        raise CorpusError(f"{len(bad)} bad line(s) ({by_origin}):\n  {shown}{more}\n"
                          "Fix them, or pass --on_bad_line skip to drop and count them.")
    for result in results:
        (log.warning if result.bad else log.debug)("%s", result.summary())


def read_pairs(path: str | Path, on_bad_line: str = "error", max_chars: int = MAX_CHARS) -> list[Pair]:
    """The pairs of one file (see check_file) under the bad-line policy (see enforce)."""
    result = check_file(path, max_chars)
    enforce([result], on_bad_line)
    return result.pairs


def check_rows(rows: Iterable[dict], origin: str, max_chars: int = MAX_CHARS, first_row: int = 1) -> CheckResult:
    """Validate `datasets` rows (first_row numbers the first of them, so a window of a split is named by its rows
    in the whole split)."""
    entries = ((number, _pair_from_record(row)) for number, row in enumerate(rows, start=first_row))
    return _validate(origin, entries, max_chars, "row", origin)


def check_source(flag: str, path: str | Path, splits: Sequence[str]) -> None:
    """Raise one CorpusError line when `path` cannot hold these splits, before anything is read: a folder without
    them, a single file asked for more than a train split, a path that does not exist. A value that is not a
    local path is taken for a datasets hub name, unless the hub is off (HF_HUB_OFFLINE=1) and it has no
    `name:subset` colon, since then it can only be a mistyped folder."""
    text, p = str(path), Path(path)
    expected = ("a folder with train.jsonl and valid.jsonl (or .tsv), a .jsonl/.tsv file, a datasets folder saved "
                "with save_to_disk, or a hub name such as wmt19:zh-en")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return
        missing = [s for s in splits if not any((p / f"{s}{ext}").is_file() for ext in (".jsonl", ".tsv"))]
        if missing:
            raise CorpusError(f"{flag} {text}: this folder has no {' or '.join(f'{s}.jsonl' for s in missing)}; "
                              f"expected {expected}")
        return
    if p.is_file():
        if p.suffix not in (".jsonl", ".tsv"):
            raise CorpusError(f"{flag} {text}: a {p.suffix or 'suffix-less'} file; expected {expected}")
        if set(splits) - {"train"}:
            raise CorpusError(f"{flag} {text}: a single file holds only a train split, and this run also needs "
                              f"{', '.join(s for s in splits if s != 'train')}; give a folder with train.jsonl and "
                              "valid.jsonl")
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if text.startswith(("/", ".", "~")) or (offline and ":" not in text) or Path(text.split("/")[0]).is_dir():
        hint = (" (build the catalog corpus with: python -m scripts.build_corpus --out data/catalogs)"
                if p.parts and p.parts[0] == "data" else "")
        raise CorpusError(f"{flag} {text}: no such file or folder{hint}; expected {expected}")


def check_split(path: str | Path, split: str, max_chars: int = MAX_CHARS) -> CheckResult:
    """Validate one split of a corpus given by folder, file, saved `datasets` folder, or hub name (`wmt19:zh-en`)."""
    text = str(path)
    p = Path(path)
    if p.is_dir() and (p / f"{split}.jsonl").is_file():
        return check_file(p / f"{split}.jsonl", max_chars)
    if p.is_dir() and (p / f"{split}.tsv").is_file():
        return check_file(p / f"{split}.tsv", max_chars)
    if p.is_file():
        if split != "train":
            raise CorpusError(f"{p}: a single file is only a train split; give a folder with {split}.jsonl")
        return check_file(p, max_chars)
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        return check_rows(saved_dataset_split(p, split), f"{p}[{split}]", max_chars)
    if p.exists():
        raise CorpusError(f"{p}: no {split}.jsonl/{split}.tsv here and not a datasets folder")
    if re.fullmatch(r"[\w.\-/]+(:[\w.\-]+)?", text) and not text.startswith(("/", ".")):
        import datasets
        name, _, subset = text.partition(":")
        try:
            loaded = datasets.load_dataset(name, subset or None)
        except Exception as exc:  # the hub raises many types; all mean "cannot load this"
            raise CorpusError(f"{text}: datasets.load_dataset failed ({type(exc).__name__}: {exc}); "
                              "check the name and that the hub or a local cache is reachable") from None
        return check_rows(loaded[_hf_split(loaded, split, text)], f"{text}[{split}]", max_chars)
    raise CorpusError(f"{path}: not found (expected a folder, a .jsonl/.tsv file, or a datasets name)")


def load_splits(path: str | Path, splits: Sequence[str] = ("train", "valid"), on_bad_line: str = "error",
                max_chars: int = MAX_CHARS) -> dict[str, CheckResult]:
    """Check every split before applying the policy, so one error lists the bad lines of all of them."""
    results = {split: check_split(path, split, max_chars) for split in splits}
    enforce(list(results.values()), on_bad_line)
    return results


def load_split(path: str | Path, split: str, on_bad_line: str = "error", max_chars: int = MAX_CHARS) -> list[Pair]:
    """The pairs of one split (see check_split) under the bad-line policy (see enforce)."""
    return load_splits(path, (split,), on_bad_line, max_chars)[split].pairs


def saved_dataset_split(path: str | Path, split: str):
    """One split of a folder written by `datasets` save_to_disk, memory-mapped (a lone Dataset is every split)."""
    import datasets
    loaded = datasets.load_from_disk(str(path))
    return loaded[_hf_split(loaded, split, str(path))] if isinstance(loaded, datasets.DatasetDict) else loaded


def arrow_sample(path: str | Path, rows: int, max_chars: int = MAX_CHARS) -> list[Pair]:
    """The good pairs among the first `rows` rows of a datasets folder's train split (for the vocabulary of a
    streamed corpus: counting every row of 26M pairs would be the whole-corpus pass streaming avoids)."""
    table = saved_dataset_split(path, "train")
    return check_rows(table.select(range(min(rows, len(table)))), f"{path}[train]", max_chars).pairs


def _hf_split(loaded, split: str, origin: str) -> str:
    for name in {"valid": ("validation", "valid", "dev"), "test": ("test",), "train": ("train",)}[split]:
        if name in loaded:
            return name
    raise CorpusError(f"{origin}: no {split} split (has {', '.join(loaded)})")


def write_jsonl(pairs: Iterable[Pair], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps({"zh": pair.zh, "en": pair.en, "catalog": pair.source}, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


# --------------------------------------------------------------------------- the gettext catalog corpus

# printf directives (%s, %1$d, %-10.3lf, %'d), Python/brace fields ({0}, {name}), and shell-ish ${VAR}
_DIRECTIVE = re.compile(r"%(\d+\$)?[-+ #0']*(\d+|\*)?(\.(\d+|\*))?(hh|h|ll|l|L|q|j|z|t|I64|I32)?[diouxXeEfFgGaAcspn%]"
                        r"|%<\w+>|\{[\w.\[\]]*\}|\$\{\w+\}")
_ACCEL_SUFFIX = re.compile(r"[(（]\s*[_&]?[A-Za-z0-9]\s*[)）]")  # "打开(_O)" or "(&O)"
_ACCEL_MARK = re.compile(r"(?<![\w&])[_&](?=\w)")  # "_File", "&Open"
_TRADEMARK = re.compile(r"\((R|TM|C)\)")
_SPACES = re.compile(r"\s+")


def clean_catalog_text(text: str) -> str:
    text = _DIRECTIVE.sub(" ", text)
    text = _ACCEL_SUFFIX.sub("", text)
    text = _ACCEL_MARK.sub("", text)
    text = _TRADEMARK.sub("", text)
    text = text.replace("\\n", " ")
    return _SPACES.sub(" ", text).strip(" :：.…")


def read_catalog(path: str | Path) -> list[Pair]:
    """English msgid -> Chinese msgstr pairs of one compiled .mo catalog, cleaned."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            catalog = gettext.GNUTranslations(handle)._catalog  # the parsed msgid -> msgstr mapping
    except Exception as exc:  # the .mo parser raises OSError, struct.error, UnicodeDecodeError, ...
        raise CorpusError(f"{path}: not a readable gettext catalog ({exc})") from None
    pairs = []
    for msgid, msgstr in catalog.items():
        if not isinstance(msgid, str) or not msgid or "\x00" in msgid:  # header, plural forms
            continue
        if "\x04" in msgid:  # a msgctxt prefix
            msgid = msgid.split("\x04", 1)[1]
        en, zh = clean_catalog_text(msgid), clean_catalog_text(msgstr)
        pairs.append(Pair(zh, en, path.stem))
    return pairs


@dataclass
class CorpusStats:
    raw_pairs: int = 0
    kept_pairs: int = 0
    dropped: Counter = field(default_factory=Counter)
    pairs: dict = field(default_factory=dict)
    catalogs: dict = field(default_factory=dict)


def build_catalog_corpus(locale_dir: str | Path, out_dir: str | Path, language: str = "zh_CN",
                         valid_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0,
                         max_chars: int = MAX_CHARS, min_catalogs: int = 3) -> CorpusStats:
    """Read every LANGUAGE gettext catalog under locale_dir and write train/valid/test.jsonl split by catalog.

    Whole catalogs go to one split, so a product's strings never leak from train to test; a pair whose
    English or Chinese side also occurs in train is dropped from valid/test for the same reason. Pairs are
    filtered by the validator's own rules (problem_with), counted per reason in stats.json, so the written
    splits pass load_splits with on_bad_line='error' at the same max_chars.
    """
    files = sorted(Path(locale_dir).glob(f"{language}/LC_MESSAGES/*.mo"))
    if len(files) < min_catalogs:
        raise CorpusError(f"{locale_dir}: found {len(files)} {language} catalog(s), need at least {min_catalogs}. "
                          "Install translations (for example `apt-get install coreutils bash gettext` with "
                          "locales), point --gettext at another locale folder, or pass your own corpus with --data.")
    stats = CorpusStats()
    by_catalog: dict[str, list[Pair]] = {}
    seen: set[str] = set()
    for file in files:
        for pair in read_catalog(file):
            stats.raw_pairs += 1
            problem = problem_with(pair.zh, pair.en, max_chars)
            if problem:
                stats.dropped[problem.reason] += 1
                continue
            if pair.en in seen:  # stricter than the validator's exact (zh, en) duplicates: one translation per string
                stats.dropped["duplicate"] += 1
                continue
            seen.add(pair.en)
            by_catalog.setdefault(pair.source, []).append(pair)

    names = sorted(by_catalog)
    random.Random(seed).shuffle(names)
    total = sum(len(v) for v in by_catalog.values())
    split_of: dict[str, str] = {}
    budget = {"test": test_fraction * total, "valid": valid_fraction * total}
    for name in names:
        size = len(by_catalog[name])
        target = next((s for s in ("test", "valid") if budget[s] > 0 and size <= 0.6 * total * max(
            test_fraction, valid_fraction) + 1), "train")
        split_of[name] = target
        if target != "train":
            budget[target] -= size

    train_sides = {side for name, ps in by_catalog.items() if split_of[name] == "train"
                   for p in ps for side in (p.zh, p.en)}
    out_dir = Path(out_dir)
    for split in SPLITS:
        chosen = [p for name in sorted(by_catalog) if split_of[name] == split for p in by_catalog[name]]
        if split != "train":
            kept = [p for p in chosen if p.zh not in train_sides and p.en not in train_sides]
            stats.dropped["also_in_train"] += len(chosen) - len(kept)
            chosen = kept
        stats.pairs[split] = write_jsonl(chosen, out_dir / f"{split}.jsonl")
        stats.catalogs[split] = sorted(name for name in by_catalog if split_of[name] == split)
    stats.kept_pairs = sum(stats.pairs.values())
    (out_dir / "stats.json").write_text(json.dumps({
        "raw_pairs": stats.raw_pairs, "kept_pairs": stats.kept_pairs, "pairs": stats.pairs,
        "catalogs_per_split": {s: len(c) for s, c in stats.catalogs.items()}, "catalogs": stats.catalogs,
        "dropped": dict(stats.dropped), "source": str(locale_dir), "seed": seed}, indent=2, ensure_ascii=False) + "\n")
    return stats


def write_label_subset(corpus_dir: str | Path, out_dir: str | Path, max_words: int) -> dict[str, int]:
    """The pairs of each split whose English side has at most max_words words (menu items and buttons such as
    "Open File" / "打开文件"), written as the same splits under out_dir: a subset of every split, so it keeps the
    corpus's split by catalog and nothing of the test catalogs reaches training. Returns the pairs per split."""
    counts = {}
    for split in SPLITS:
        pairs = [p for p in read_pairs(Path(corpus_dir) / f"{split}.jsonl") if len(p.en.split()) <= max_words]
        counts[split] = write_jsonl(pairs, Path(out_dir) / f"{split}.jsonl")
    (Path(out_dir) / "stats.json").write_text(json.dumps({"from": str(corpus_dir), "max_english_words": max_words,
                                                          "pairs": counts}, indent=2) + "\n")
    return counts
