"""Parallel zh/en data: reading, validation, the gettext catalog corpus, vocabulary trimming,
aligned teacher/student examples, and deterministic batching.

The teacher (a Qwen causal LM) sees each pair as a chat: an instruction plus the source as the user turn,
the target as the assistant turn. The student (an encoder-decoder) sees the source plus a direction id.
Both predict the *same* target token ids at the same positions, so their logits can be compared
position by position (see `collate`).
"""

from __future__ import annotations

import codecs
import gettext
import hashlib
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from config import DIRECTIONS, Config, ConfigError, DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
LANGUAGE_NAMES = {"zh": "Chinese", "en": "English"}
IGNORE_INDEX = -100
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


def _check_dataset(rows: Iterable[dict], origin: str, max_chars: int) -> CheckResult:
    entries = ((number, _pair_from_record(row)) for number, row in enumerate(rows, start=1))
    return _validate(origin, entries, max_chars, "row", origin)


def check_source(flag: str, path: str | Path, splits: Sequence[str]) -> None:
    """Raise one CorpusError line when `path` cannot hold these splits, before anything is read: a folder without
    them, a single file asked for more than a train split, a path that does not exist. A value that is not a
    local path is taken for a datasets hub name, unless the hub is off (HF_HUB_OFFLINE=1) and it has no
    `name:subset` colon, since then it can only be a mistyped folder."""
    import os
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
        hint = (" (build the catalog corpus with: python scripts/build_corpus.py --out data/catalogs)"
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
        import datasets
        loaded = datasets.load_from_disk(str(p))
        table = loaded[_hf_split(loaded, split, text)] if isinstance(loaded, datasets.DatasetDict) else loaded
        return _check_dataset(table, f"{p}[{split}]", max_chars)
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
        return _check_dataset(loaded[_hf_split(loaded, split, text)], f"{text}[{split}]", max_chars)
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


# --------------------------------------------------------------------------- vocabulary trimming

def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2/Qwen byte-level BPE's printable stand-in character for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = _byte_level_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the token -> id table: two tokenizers with equal fingerprints give equal ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


class VocabMismatchError(ValueError):
    """Teacher, student and vocabulary map were not built from the same tokenizer."""


@dataclass
class VocabMap:
    """Student id i is teacher id teacher_ids[i]; other teacher ids are spelled with byte tokens."""
    teacher_ids: list[int]
    teacher_vocab_size: int
    tokenizer_sha256: str

    FILE = "vocab_map.json"

    def __post_init__(self) -> None:
        self.student_of = {t: s for s, t in enumerate(self.teacher_ids)}

    @property
    def size(self) -> int:
        return len(self.teacher_ids)

    def save(self, folder: str | Path) -> None:
        Path(folder, self.FILE).write_text(json.dumps({
            "teacher_ids": self.teacher_ids, "teacher_vocab_size": self.teacher_vocab_size,
            "tokenizer_sha256": self.tokenizer_sha256}) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "VocabMap":
        path = Path(folder, cls.FILE)
        if not path.is_file():
            raise VocabMismatchError(f"{path}: missing; a student folder needs the vocabulary map it was trained with")
        data = json.loads(path.read_text())
        return cls(list(data["teacher_ids"]), int(data["teacher_vocab_size"]), data["tokenizer_sha256"])

    @classmethod
    def full(cls, tokenizer, teacher_vocab_size: int) -> "VocabMap":
        """Keep every tokenizer id: the teacher's own view, used when fine-tuning the teacher."""
        return cls(sorted(set(tokenizer.get_vocab().values())), teacher_vocab_size, tokenizer_fingerprint(tokenizer))

    def check_tokenizer(self, tokenizer, what: str) -> None:
        if tokenizer_fingerprint(tokenizer) != self.tokenizer_sha256:
            raise VocabMismatchError(
                f"{what}: its tokenizer differs from the one the student vocabulary was built from. "
                "Teacher and student must share one tokenizer: distil with the teacher whose tokenizer "
                "built the vocabulary map, or rebuild the map (start a new run) for this teacher.")


def byte_token_ids(tokenizer) -> list[int]:
    """Teacher ids of the 256 single-byte tokens; byte-level BPE always has them."""
    vocab = tokenizer.get_vocab()
    missing = [b for b in range(256) if BYTE_TO_CHAR[b] not in vocab]
    if missing:
        raise VocabMismatchError(f"tokenizer has no single-byte token for {len(missing)} byte(s) (first {missing[0]}); "
                                 "rk-distill needs a byte-level BPE tokenizer such as Qwen's")
    return [vocab[BYTE_TO_CHAR[b]] for b in range(256)]


def build_vocab_map(tokenizer, texts: Iterable[str], size: int, teacher_vocab_size: int) -> VocabMap:
    """Top-`size` teacher ids by frequency in texts, plus all special and byte tokens, in teacher id order."""
    counts: Counter = Counter()
    texts = list(texts)
    for start in range(0, len(texts), 4096):
        for ids in tokenizer(texts[start:start + 4096], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    required = set(byte_token_ids(tokenizer)) | set(tokenizer.all_special_ids)
    required |= {tokenizer.convert_tokens_to_ids(t) for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)}
    if None in required or any(i is None or i < 0 for i in required):
        raise VocabMismatchError(f"tokenizer lacks one of {PAD_TOKEN}, {BOS_TOKEN}, {EOS_TOKEN} (Qwen's specials)")
    room = max(0, size - len(required))
    frequent = [t for t, _ in counts.most_common() if t not in required][:room]
    ids = sorted(required | set(frequent))
    return VocabMap(ids, teacher_vocab_size, tokenizer_fingerprint(tokenizer))


# --------------------------------------------------------------------------- examples

@dataclass
class Example:
    direction: int          # index into DIRECTIONS
    source_ids: list[int]   # student ids of the source
    prompt_ids: list[int]   # teacher ids: chat-template prompt ending with the assistant header
    target_ids: list[int]   # teacher ids of the target followed by eos; every id is in the student vocabulary
    source_text: str = ""
    reference: str = ""


def direction_index(direction: str) -> int:
    return DIRECTIONS.index(direction)


def instruction(direction: str) -> str:
    src, tgt = direction.split("-")
    return f"Translate the following text from {LANGUAGE_NAMES[src]} to {LANGUAGE_NAMES[tgt]}."


class ExampleBuilder:
    """Turns pairs into aligned teacher/student examples with one tokenizer and one vocabulary map."""

    def __init__(self, tokenizer, vocab: "VocabMap", max_source_len: int, max_target_len: int):
        self.tokenizer, self.vocab = tokenizer, vocab
        self.max_source_len, self.max_target_len = max_source_len, max_target_len
        bytes_ids = byte_token_ids(tokenizer)
        self._bytes_of_token = {}
        for token, tid in tokenizer.get_vocab().items():
            if tid not in vocab.student_of and all(c in CHAR_TO_BYTE for c in token):
                self._bytes_of_token[tid] = [bytes_ids[CHAR_TO_BYTE[c]] for c in token]
        self.pad_id = vocab.student_of[tokenizer.convert_tokens_to_ids(PAD_TOKEN)]
        self.bos_id = vocab.student_of[tokenizer.convert_tokens_to_ids(BOS_TOKEN)]
        self.eos_teacher_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        self.eos_id = vocab.student_of[self.eos_teacher_id]
        self._parts: dict[str, tuple[list[int], list[int]]] = {}

    def _restrict(self, natural: list[int]) -> list[int]:
        out: list[int] = []
        for tid in natural:
            if tid in self.vocab.student_of:
                out.append(tid)
            elif tid in self._bytes_of_token:
                out.extend(self._bytes_of_token[tid])
            else:
                raise VocabMismatchError(f"teacher token id {tid} is neither kept nor spellable in bytes")
        return out

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def teacher_ids(self, text: str) -> list[int]:
        """Teacher-space ids restricted to the student vocabulary (unkept tokens spelled in bytes)."""
        return self._restrict(self._encode([text])[0])

    def student_ids(self, text: str) -> list[int]:
        return [self.vocab.student_of[t] for t in self.teacher_ids(text)]

    def prompt_text(self, source: str, direction: str, thinking: bool = False) -> str:
        """The teacher's chat prompt, ending where the translation starts. Qwen3-style templates open the
        assistant turn in thinking mode unless told otherwise (the next token would be `<think>`, which no
        translation starts with), so thinking is switched off; older Qwen templates ignore the switch."""
        messages = [{"role": "user", "content": f"{instruction(direction)}\n{source}"}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  enable_thinking=thinking)

    @property
    def has_thinking_switch(self) -> bool:
        """Whether the chat template renders differently with thinking on (a Qwen3-style template)."""
        return self.prompt_text("x", DIRECTIONS[0], thinking=True) != self.prompt_text("x", DIRECTIONS[0])

    def prompt_fingerprint(self) -> str:
        """sha256 of the prompt ids around the source in every direction: what the teacher is conditioned on."""
        parts = [self._prompt_parts(direction) for direction in DIRECTIONS]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _prompt_parts(self, direction: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the source in the rendered chat prompt.

        The source is tokenized on its own and spliced in: the prefix ends with a newline and the suffix
        starts with a special token, both pre-tokenizer boundaries in Qwen's split pattern, so the splice
        gives the same ids as tokenizing the whole prompt (tests check it on the corpus) at a fraction of
        the cost of rendering the template for every example.
        """
        if direction not in self._parts:
            marker = "\u2063SOURCE\u2063"
            rendered = self.prompt_text(marker, direction)
            if rendered.count(marker) != 1:
                raise VocabMismatchError("the teacher's chat template does not place the user message verbatim")
            before, after = rendered.split(marker)
            self._parts[direction] = (self._encode([before])[0], self._encode([after])[0])
        return self._parts[direction]

    def examples(self, pairs: Sequence[Pair], directions: Sequence[str]) -> tuple[list[Example], int]:
        """One example per pair and direction; returns (examples, number dropped as too long)."""
        built: list[Example] = []
        too_long = 0
        for direction in directions:
            src_lang, tgt_lang = direction.split("-")
            before, after = self._prompt_parts(direction)
            sources = [p.side(src_lang).strip() for p in pairs]
            references = [p.side(tgt_lang).strip() for p in pairs]
            for text, reference, natural, target in zip(sources, references, self._encode(sources),
                                                        self._encode(references)):
                source = [self.vocab.student_of[t] for t in self._restrict(natural)]
                target = self._restrict(target) + [self.eos_teacher_id]
                if len(source) > self.max_source_len or len(target) > self.max_target_len:
                    too_long += 1
                    continue
                built.append(Example(direction_index(direction), source, before + natural + after, target,
                                     text, reference))
        return built, too_long

    def collate(self, examples: Sequence[Example]) -> dict[str, list]:
        """The batch of examples built here, padded with this builder's ids (see the module's collate)."""
        return collate(examples, self.pad_id, self.bos_id, self.vocab.student_of, self.tokenizer.pad_token_id)

    def decode(self, student_ids: Iterable[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        teacher = [self.vocab.teacher_ids[i] for i in student_ids if i not in special]
        return self.tokenizer.decode(teacher, skip_special_tokens=True)


# --------------------------------------------------------------------------- batches

def make_batches(examples: Sequence[Example], micro_batch_size: int, tokens_per_batch: int, seed: int,
                 epoch: int, world_size: int) -> list[list[int]]:
    """Example indices per global micro-batch, identical on every rank, a multiple of world_size long.

    Examples are shuffled per (seed, epoch), grouped into buckets of similar length so little padding is
    needed, then batches are shuffled. With tokens_per_batch > 0 a batch grows until its padded size
    (sentences x longest source+target) would pass the budget.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    bucket = max(micro_batch_size, 1) * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket],
                       key=lambda i: (len(examples[i].target_ids), len(examples[i].source_ids)))
        current: list[int] = []
        longest = 0
        for i in chunk:
            size = len(examples[i].target_ids) + len(examples[i].source_ids)
            full = (len(current) >= micro_batch_size if tokens_per_batch <= 0
                    else current and max(longest, size) * (len(current) + 1) > tokens_per_batch)
            if full:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, size)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    usable = len(batches) - len(batches) % world_size  # every rank must run the same number of steps
    return batches[:usable]


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream resumes: the epoch, the index into that epoch's window order, and this rank's next batch
    within the window. Saved with every checkpoint (train_ds.py) so a resumed run reads on from there."""
    epoch: int = 0
    window: int = 0
    batch: int = 0


def arrow_sample(path: str | Path, rows: int, max_chars: int = MAX_CHARS) -> list[Pair]:
    """The good pairs among the first `rows` rows of a datasets folder's train split (for the vocabulary of a
    streamed corpus: counting every row of 26M pairs would be the whole-corpus pass streaming avoids)."""
    import datasets
    loaded = datasets.load_from_disk(str(path))
    table = loaded[_hf_split(loaded, "train", str(path))] if isinstance(loaded, datasets.DatasetDict) else loaded
    return _check_dataset(table.select(range(min(rows, len(table)))), f"{path}[train]", max_chars).pairs


class ExampleStream:
    """Micro-batches of a large corpus in a `datasets` folder (save_to_disk: memory-mapped Arrow), read one
    window of rows at a time, so a rank's memory follows the window, not the corpus (WMT19 zh-en is 26M pairs).

    Windows are visited in a shuffled order per epoch. Every rank reads the same window and builds the same
    batches (make_batches is deterministic) and keeps its own share: every rank runs the same number of
    steps, which ZeRO-3 needs, and a rank tokenizes only one window at a time. Bad rows are checked window by
    window under the same rules and policy as files (check the whole corpus first with `load_splits` when it
    fits in memory).
    """

    def __init__(self, path: str | Path, builder: "ExampleBuilder", directions: Sequence[str], window_rows: int,
                 micro_batch_size: int, tokens_per_batch: int, seed: int, world_size: int, rank: int,
                 on_bad_line: str = "error", max_chars: int = MAX_CHARS):
        import datasets
        loaded = datasets.load_from_disk(str(path))
        self.table = loaded[_hf_split(loaded, "train", str(path))] if isinstance(loaded, datasets.DatasetDict) \
            else loaded
        self.origin, self.builder, self.directions = str(path), builder, list(directions)
        self.window_rows, self.micro_batch_size, self.tokens_per_batch = window_rows, micro_batch_size, \
            tokens_per_batch
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.on_bad_line, self.max_chars = on_bad_line, max_chars
        self.windows = max(1, -(-len(self.table) // window_rows))
        self.skipped: Counter = Counter()  # bad rows dropped so far, by reason (on_bad_line skip)

    def __len__(self) -> int:
        return len(self.table)

    def _window_order(self, epoch: int) -> list[int]:
        order = list(range(self.windows))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _window_examples(self, window: int) -> list[Example]:
        start = window * self.window_rows
        columns = self.table[start:start + self.window_rows]  # one slice of the memory map, as columns
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        result = _validate(self.origin, ((start + i + 1, _pair_from_record(row)) for i, row in enumerate(rows)),
                           self.max_chars, "row", self.origin)
        enforce([result], self.on_bad_line)
        self.skipped.update(result.counts)
        return self.builder.examples(result.pairs, self.directions)[0]

    def batches(self, start: StreamPosition = StreamPosition()) -> Iterator[tuple[StreamPosition, list[Example]]]:
        """This rank's micro-batches from `start` on, forever (epochs reshuffle), each with the position that
        follows it."""
        epoch, first_window, first_batch = start.epoch, start.window, start.batch
        while True:
            order = self._window_order(epoch)
            for slot in range(first_window, len(order)):
                examples = self._window_examples(order[slot])
                mine = make_batches(examples, self.micro_batch_size, self.tokens_per_batch, self.seed,
                                    epoch * self.windows + order[slot], self.world_size)[self.rank::self.world_size]
                for index in range(first_batch, len(mine)):
                    yield StreamPosition(epoch, slot, index + 1), [examples[i] for i in mine[index]]
                first_batch = 0
            epoch, first_window = epoch + 1, 0


def collate(examples: Sequence[Example], pad_id: int, bos_id: int, student_of: dict[int, int],
            teacher_pad_id: int) -> dict[str, list[list[int]] | list[int]]:
    """Pad a batch into aligned student and teacher tensors (as nested lists; torch-free).

    Student: `source_ids`/`source_mask`, `direction`, `decoder_input_ids` ([bos] + target[:-1]) and
    `labels` (target, student ids, IGNORE_INDEX on padding).
    Teacher: prompts are *left*-padded to one length P and targets right-padded, so logits at positions
    P-1 .. P-1+T-1 predict the same `labels` column by column (`teacher_labels` holds them in teacher ids);
    `teacher_position_ids` skip the padding. `target_positions`: the flat indices into `labels` of the real
    targets (what the losses select, computed here so that selecting them on a GPU needs no host sync).
    """
    src_len = max(len(e.source_ids) for e in examples)
    tgt_len = max(len(e.target_ids) for e in examples)
    prompt_len = max(len(e.prompt_ids) for e in examples)
    batch: dict[str, list] = {k: [] for k in ("source_ids", "source_mask", "direction", "decoder_input_ids",
                                              "labels", "teacher_labels", "teacher_input_ids", "teacher_attention_mask",
                                              "teacher_position_ids")}
    for e in examples:
        target = [student_of[t] for t in e.target_ids]
        n_src, n_tgt, n_prompt = len(e.source_ids), len(target), len(e.prompt_ids)
        batch["source_ids"].append(e.source_ids + [pad_id] * (src_len - n_src))
        batch["source_mask"].append([1] * n_src + [0] * (src_len - n_src))
        batch["direction"].append(e.direction)
        batch["decoder_input_ids"].append([bos_id] + target[:-1] + [pad_id] * (tgt_len - n_tgt))
        batch["labels"].append(target + [IGNORE_INDEX] * (tgt_len - n_tgt))
        batch["teacher_labels"].append(e.target_ids + [IGNORE_INDEX] * (tgt_len - n_tgt))
        left = prompt_len - n_prompt
        body = e.prompt_ids + e.target_ids[:-1]
        batch["teacher_input_ids"].append([teacher_pad_id] * left + body + [teacher_pad_id] * (tgt_len - n_tgt))
        mask = [0] * left + [1] * len(body) + [0] * (tgt_len - n_tgt)
        batch["teacher_attention_mask"].append(mask)
        positions, seen = [], 0
        for m in mask:
            positions.append(seen if m else 0)
            seen += m
        batch["teacher_position_ids"].append(positions)
    batch["target_positions"] = [row * tgt_len + j for row, e in enumerate(examples) for j in range(len(e.target_ids))]
    return batch


def iter_lines(path: str | Path) -> Iterator[str]:
    """Non-empty lines of a UTF-8 text file (one sentence a line for translate --input)."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip("\n")


# ----------------------------------------------------------------------------- a run's data

@dataclass
class RunData:
    """The tokenizer, trimmed vocabulary and aligned examples of a run, and the schedule they give."""
    tokenizer: object
    teacher_config: object
    vocab: VocabMap
    builder: ExampleBuilder
    train_examples: list
    valid_examples: list
    batches_per_epoch: int
    total_steps: int
    stream: ExampleStream | None = None  # --data.stream_window: train examples read window by window


STREAM_VOCAB_ROWS = 200_000  # rows of a streamed corpus counted for the student's vocabulary


def prepare_run_data(stage: str, cfg: Config, run: Path, rank: int, world: int) -> RunData:
    """Teacher tokenizer, the student's vocabulary (reused from RUN when resuming), aligned examples, and the
    schedule they give. Every problem in the splits is listed before step 1 (CorpusError), not the first one at
    hour 30."""
    from transformers import AutoConfig, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.train.teacher, trust_remote_code=cfg.train.trust_remote_code)
    teacher_config = AutoConfig.from_pretrained(cfg.train.teacher, trust_remote_code=cfg.train.trust_remote_code)
    if len(tokenizer) > teacher_config.vocab_size:  # padded is normal (Qwen: 151,643 ids, 151,936 rows); short is not
        raise VocabMismatchError(
            f"{cfg.train.teacher}: the tokenizer has {len(tokenizer)} ids but the model has only "
            f"{teacher_config.vocab_size} output rows; the tokenizer files belong to another model: use the ones "
            "saved with this checkpoint")
    streaming = cfg.data.stream_window > 0
    if streaming and (not cfg.train.max_steps or cfg.distill.seq_kd):
        raise ConfigError("--data.stream_window needs --max_steps (a stream has no epoch length known in advance) "
                          "and --seq_kd false (seq_kd translates every scheduled example before step 1, which a "
                          "stream exists to avoid)")
    splits = load_splits(cfg.data.path, ("valid",) if streaming else ("train", "valid"), cfg.data.on_bad_line,
                         cfg.data.max_chars)
    train_pairs = (arrow_sample(cfg.data.path, STREAM_VOCAB_ROWS, cfg.data.max_chars) if streaming
                   else splits["train"].pairs)
    valid_pairs = splits["valid"].pairs[:cfg.data.valid_subset]
    if stage == "distill":
        if (run / VocabMap.FILE).is_file():
            vocab = VocabMap.load(run)
            vocab.check_tokenizer(tokenizer, f"teacher {cfg.train.teacher}")
        else:
            texts = [p.zh for p in train_pairs] + [p.en for p in train_pairs]
            vocab = build_vocab_map(tokenizer, texts, cfg.data.vocab_size, teacher_config.vocab_size)
    else:
        vocab = VocabMap.full(tokenizer, teacher_config.vocab_size)
    builder = ExampleBuilder(tokenizer, vocab, cfg.model.max_source_len, cfg.model.max_target_len)
    if streaming:
        stream = ExampleStream(cfg.data.path, builder, cfg.data.directions, cfg.data.stream_window,
                               cfg.train.micro_batch_size, cfg.data.tokens_per_batch, cfg.train.seed, world, rank,
                               cfg.data.on_bad_line, cfg.data.max_chars)
        log.info("data: streaming %d train rows in windows of %d; vocabulary from the first %d rows",
                 len(stream), cfg.data.stream_window, len(train_pairs))
        valid_examples, _ = builder.examples(valid_pairs, cfg.data.directions)
        return RunData(tokenizer, teacher_config, vocab, builder, [], valid_examples, 0, cfg.train.max_steps, stream)
    train_examples, dropped = builder.examples(train_pairs, cfg.data.directions)
    valid_examples, _ = builder.examples(valid_pairs, cfg.data.directions)
    log.info("data: %d train pairs -> %d examples (%d too long for the model), %d validation examples; "
             "vocabulary %d of the teacher's %d ids", len(train_pairs), len(train_examples), dropped,
             len(valid_examples), vocab.size, teacher_config.vocab_size)
    batches_per_epoch = len(make_batches(train_examples, cfg.train.micro_batch_size, cfg.data.tokens_per_batch,
                                         cfg.train.seed, 0, world)) // world
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    return RunData(tokenizer, teacher_config, vocab, builder, train_examples, valid_examples, batches_per_epoch,
                   total_steps)
