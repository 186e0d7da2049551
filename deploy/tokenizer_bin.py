"""Write tokenizer.bin: the teacher's byte-level BPE tokenizer plus the student's vocabulary map, for the C runner.

    python -m deploy.tokenizer_bin --model STUDENT_DIR --out tokenizer.bin [--vocab_map auto|none|PATH]

The C side (deploy/runtime/tokenizer.c) reproduces the Hugging Face tokenizer exactly: NFC, Qwen2's pre-tokenizer
split pattern, byte-level BPE by merge rank, added/special tokens; then maps teacher ids to student ids, spelling
teacher tokens the student does not keep with their single-byte tokens (docs/CONTRACTS.md).

File format (all integers little-endian u32; version 1). Also documented in deploy/runtime/README.md.

    offset 0   magic "RKTOK1\\0\\0" (8 bytes)
           8   version (1)
          12   crc32 (zlib/IEEE) of every byte from offset 16 to the end of the file
          16   flags: bit 0 = NFC normalizer, bit 1 = ignore_merges (a word that is a vocabulary token is one token)
          20   pre-tokenizer pattern id: 1 = Qwen2's split pattern (QWEN2_SPLIT_PATTERN below)
          24   T = teacher ids (largest token id + 1)      28   V = student ids
          32   M = merges                                   36   A = added tokens
          40   pad, 44 bos, 48 eos: student ids of <|endoftext|>, <|im_start|>, <|im_end|>
          52   number of sections (13), then per section (offset, size in bytes), in this order:
     0 BYTE_TOKENS      256 x teacher id of the single-byte token of byte b (the byte->unicode->vocab map resolved)
     1 MERGES           M x (left id, right id, rank, merged id), sorted by (left, right); rank = index in merges
     2 STUDENT_TEACHER  V x teacher id of student id i (the vocab map's teacher_ids)
     3 TEACHER_STUDENT  T x student id of teacher id t, 0xFFFFFFFF if the student does not keep t
     4 TOKEN_OFFSETS    T+1 x offset into TOKEN_BYTES; teacher id t is bytes [off[t], off[t+1])
     5 TOKEN_BYTES      what each teacher id decodes to (byte-level tokens: their bytes; added tokens: their text)
     6 VOCAB_INDEX      model-vocabulary ids sorted by their bytes (memcmp, shorter first); empty without ignore_merges
     7 ADDED            A x (teacher id, flags: bit 0 = special, skipped when decoding)
     8 CATEGORIES       (first, last, class) code point ranges, sorted and disjoint: 1 = \\p{L}, 2 = \\p{N},
                        3 = \\s (White_Space: Zs, Zl, Zp, U+0009-000D, U+0085); every other code point is "other"
     9 CCC              (first, last, canonical combining class) ranges, sorted and disjoint, class 1-254
    10 DECOMP           (code point, offset, length) into DECOMP_POOL: full canonical decompositions, sorted
    11 DECOMP_POOL      code points
    12 COMPOSE          (first, second, composite) primary composites, sorted by (first, second)
Hangul syllables are decomposed and composed algorithmically on the C side. The Unicode tables come from this
Python's unicodedata (its Unicode version is printed); the tokenizers library's Oniguruma and normalization tables
must agree on every character the corpus uses (tests/test_runtime.py checks a real corpus).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import struct
import sys
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vocabulary import BOS_TOKEN, BYTE_TO_CHAR, CHAR_TO_BYTE, EOS_TOKEN, PAD_TOKEN, VocabMap, tokenizer_fingerprint

MAGIC = b"RKTOK1\0\0"
VERSION = 1
FLAG_NFC = 1
FLAG_IGNORE_MERGES = 2
PATTERN_QWEN2 = 1
NOT_KEPT = 0xFFFFFFFF
N_SECTIONS = 13
HEADER_SIZE = 56 + 8 * N_SECTIONS
CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE = 1, 2, 3
MAX_CODE_POINT = 0x10FFFF
HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3

# Qwen2's pre-tokenizer split pattern, the one the C side implements (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


class TokenizerBinError(ValueError):
    """The tokenizer or vocabulary map cannot be written as tokenizer.bin (the message says why)."""


@dataclass(frozen=True)
class TokenizerBinInfo:
    path: Path
    teacher_ids: int
    student_ids: int
    merges: int
    added: int
    nfc: bool
    ignore_merges: bool
    size: int

    def summary(self) -> str:
        return (f"{self.path}: {self.size:,} bytes; {self.student_ids} student ids of {self.teacher_ids} teacher ids, "
                f"{self.merges} merges, {self.added} added tokens, NFC {'on' if self.nfc else 'off'}, "
                f"ignore_merges {'on' if self.ignore_merges else 'off'}, Unicode {unicodedata.unidata_version}")


# --------------------------------------------------------------------------- Unicode tables

def _ranges(values: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first, last, value) runs of equal non-zero values over code points 0..len-1."""
    out: list[tuple[int, int, int]] = []
    for cp, value in enumerate(values):
        if not value:
            continue
        if out and out[-1][1] == cp - 1 and out[-1][2] == value:
            out[-1] = (out[-1][0], cp, value)
        else:
            out.append((cp, cp, value))
    return out


def _is_surrogate(cp: int) -> bool:
    return 0xD800 <= cp <= 0xDFFF


@functools.lru_cache(maxsize=1)
def category_ranges() -> tuple[tuple[int, int, int], ...]:
    """\\p{L}, \\p{N} and \\s as Oniguruma (the tokenizers library's regex engine) defines them."""
    classes = []
    for cp in range(MAX_CODE_POINT + 1):
        cat = unicodedata.category(chr(cp))
        if cat[0] == "L":
            classes.append(CLASS_LETTER)
        elif cat[0] == "N":
            classes.append(CLASS_NUMBER)
        elif cat in ("Zs", "Zl", "Zp") or 0x09 <= cp <= 0x0D or cp == 0x85:
            classes.append(CLASS_SPACE)
        else:
            classes.append(0)
    return tuple(_ranges(classes))


@functools.lru_cache(maxsize=1)
def nfc_tables() -> tuple[tuple, tuple, tuple]:
    """(ccc ranges, (code point, full canonical decomposition) pairs, primary composites (first, second, composite))."""
    ccc = [unicodedata.combining(chr(cp)) for cp in range(MAX_CODE_POINT + 1)]
    decomp: list[tuple[int, tuple[int, ...]]] = []
    compose: list[tuple[int, int, int]] = []
    for cp in range(MAX_CODE_POINT + 1):
        if _is_surrogate(cp) or HANGUL_FIRST <= cp <= HANGUL_LAST:
            continue  # Hangul is algorithmic on the C side; surrogates never occur in valid UTF-8
        mapping = unicodedata.decomposition(chr(cp))
        if not mapping or mapping.startswith("<"):
            continue  # no canonical decomposition (compatibility ones are tagged <...>)
        char = chr(cp)
        full = unicodedata.normalize("NFD", char)
        decomp.append((cp, tuple(ord(c) for c in full)))
        parts = [int(x, 16) for x in mapping.split()]
        # A primary composite survives NFC; composition exclusions and singletons do not.
        if len(parts) == 2 and unicodedata.normalize("NFC", char) == char:
            compose.append((parts[0], parts[1], cp))
    return tuple(_ranges(ccc)), tuple(decomp), tuple(sorted(compose))


# --------------------------------------------------------------------------- tokenizer.json

def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TokenizerBinError(f"{path}: missing; give the folder of a Hugging Face tokenizer (tokenizer.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerBinError(f"{path}: not valid JSON: {exc}") from exc


def _check_normalizer(spec: dict | None, where: str) -> bool:
    """True for NFC, False for none; anything else would change the text in ways the C side does not."""
    if spec is None:
        return False
    if spec.get("type") == "NFC":
        return True
    if spec.get("type") == "Sequence" and [n.get("type") for n in spec.get("normalizers", [])] == ["NFC"]:
        return True
    raise TokenizerBinError(f"{where}: normalizer {json.dumps(spec)} is not supported (only NFC or none)")


def _check_pre_tokenizer(spec: dict | None, where: str) -> None:
    """Qwen2's: Split(pattern, Isolated) then ByteLevel without its own regex or prefix space."""
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    ok = len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
    if ok:
        split, byte_level = steps
        pattern = split.get("pattern", {}).get("Regex")
        if pattern != QWEN2_SPLIT_PATTERN:
            raise TokenizerBinError(f"{where}: split pattern {pattern!r} is not Qwen2's {QWEN2_SPLIT_PATTERN!r}, "
                                    "the only one the C pre-tokenizer implements")
        ok = (split.get("behavior") == "Isolated" and not split.get("invert")
              and not byte_level.get("add_prefix_space") and not byte_level.get("use_regex", True))
    if not ok:
        raise TokenizerBinError(f"{where}: pre_tokenizer {json.dumps(spec)[:300]} is not Qwen2's "
                                "(Sequence of Split(pattern, Isolated) and ByteLevel(add_prefix_space=false, "
                                "use_regex=false))")


def _check_model(model: dict, where: str) -> bool:
    """Returns ignore_merges; rejects BPE options the C side does not implement."""
    if model.get("type") != "BPE":
        raise TokenizerBinError(f"{where}: model type {model.get('type')!r} is not BPE")
    unsupported = {"dropout": model.get("dropout"), "byte_fallback": model.get("byte_fallback"),
                   "continuing_subword_prefix": model.get("continuing_subword_prefix"),
                   "end_of_word_suffix": model.get("end_of_word_suffix")}
    set_options = {k: v for k, v in unsupported.items() if v}
    if set_options:
        raise TokenizerBinError(f"{where}: BPE options {set_options} are not supported by the C tokenizer")
    return bool(model.get("ignore_merges"))


def _merge_pairs(merges: list, where: str) -> list[tuple[str, str]]:
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise TokenizerBinError(f"{where}: merge {i} {merge!r} is not a pair of tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


_NOT_BYTE_LEVEL = re.compile("[^" + re.escape("".join(CHAR_TO_BYTE)) + "]")
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in CHAR_TO_BYTE.items()})


def _is_byte_level(token: str) -> bool:
    return _NOT_BYTE_LEVEL.search(token) is None


def _token_bytes(token: str) -> bytes:
    """What the ByteLevel decoder makes of a token: byte-level characters mapped back, else the raw text."""
    if _is_byte_level(token):
        return token.translate(_TO_LATIN1).encode("latin-1")
    return token.encode("utf-8")


@dataclass
class _Tokenizer:
    vocab: dict[str, int]          # model vocabulary, byte-level strings
    added: list[tuple[int, str, bool]]  # (id, content, special)
    merges: list[tuple[str, str]]
    nfc: bool
    ignore_merges: bool

    @property
    def size(self) -> int:
        return max([*self.vocab.values(), *(i for i, _, _ in self.added)]) + 1

    def id_of(self, content: str, where: str) -> int:
        for tid, text, _ in self.added:
            if text == content:
                return tid
        raise TokenizerBinError(f"{where}: no added token {content!r} (Qwen's pad/bos/eos)")


def read_tokenizer(tokenizer_dir: Path) -> _Tokenizer:
    where = str(tokenizer_dir / "tokenizer.json")
    spec = _load_json(tokenizer_dir / "tokenizer.json")
    nfc = _check_normalizer(spec.get("normalizer"), where)
    _check_pre_tokenizer(spec.get("pre_tokenizer"), where)
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise TokenizerBinError(f"{where}: decoder {json.dumps(spec.get('decoder'))} is not ByteLevel")
    model = spec.get("model") or {}
    ignore_merges = _check_model(model, where)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerBinError(f"{where}: model.vocab is missing or empty")
    if any(not isinstance(i, int) or i < 0 for i in vocab.values()) or len(set(vocab.values())) != len(vocab):
        raise TokenizerBinError(f"{where}: model.vocab ids must be distinct non-negative integers")
    missing = [b for b in range(256) if BYTE_TO_CHAR[b] not in vocab]
    if missing:
        raise TokenizerBinError(f"{where}: no single-byte token for {len(missing)} byte(s) (first {missing[0]}); "
                                "this is not a byte-level BPE")
    added = []
    model_ids = set(vocab.values())
    for entry in spec.get("added_tokens", []):
        if entry.get("single_word") or entry.get("lstrip") or entry.get("rstrip") or entry.get("normalized"):
            raise TokenizerBinError(f"{where}: added token {entry.get('content')!r} uses single_word/lstrip/rstrip/"
                                    "normalized, which the C tokenizer does not implement")
        content, tid = entry.get("content"), entry.get("id")
        if not isinstance(content, str) or not content or not isinstance(tid, int) or tid < 0:
            raise TokenizerBinError(f"{where}: malformed added token {entry!r}")
        if tid in model_ids and vocab.get(content) != tid:
            raise TokenizerBinError(f"{where}: added token {content!r} reuses id {tid} of another vocabulary token")
        added.append((tid, content, bool(entry.get("special"))))
    return _Tokenizer(vocab, added, _merge_pairs(model.get("merges") or [], where), nfc, ignore_merges)


def _merge_table(tok: _Tokenizer, where: str) -> list[tuple[int, int, int, int]]:
    """(left, right, rank, merged) as the tokenizers library builds it: a later duplicate pair overwrites."""
    table: dict[tuple[int, int], tuple[int, int]] = {}
    for rank, (a, b) in enumerate(tok.merges):
        ids = [tok.vocab.get(a), tok.vocab.get(b), tok.vocab.get(a + b)]
        if None in ids:
            raise TokenizerBinError(f"{where}: merge {rank} ({a!r}, {b!r}) names a token missing from model.vocab")
        table[(ids[0], ids[1])] = (rank, ids[2])
    return [(left, right, rank, merged)
            for (left, right), (rank, merged) in sorted(table.items(), key=lambda kv: kv[0][0] << 32 | kv[0][1])]


# --------------------------------------------------------------------------- vocabulary map

def _student_ids(tok: _Tokenizer, tokenizer_dir: Path, vocab_map_path: Path | None) -> list[int]:
    existing = set(tok.vocab.values()) | {i for i, _, _ in tok.added}
    if vocab_map_path is None:
        return sorted(existing)  # the teacher's own view, as vocabulary.VocabMap.full
    if not vocab_map_path.is_file():
        raise TokenizerBinError(f"{vocab_map_path}: missing vocabulary map")
    raw = _load_json(vocab_map_path)
    fields = ("teacher_ids", "teacher_vocab_size", "tokenizer_sha256")
    if not isinstance(raw, dict) or any(k not in raw for k in fields) or not isinstance(raw["teacher_ids"], list):
        raise TokenizerBinError(f"{vocab_map_path}: not a vocabulary map (needs {', '.join(fields)})")
    vocab_map = VocabMap(list(raw["teacher_ids"]), raw["teacher_vocab_size"], raw["tokenizer_sha256"])
    from tokenizers import Tokenizer
    fingerprint = tokenizer_fingerprint(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    if vocab_map.tokenizer_sha256 != fingerprint:
        raise TokenizerBinError(f"{vocab_map_path}: built for another tokenizer (tokenizer_sha256 differs from "
                                f"{tokenizer_dir}/tokenizer.json); the student and this tokenizer must match")
    ids = vocab_map.teacher_ids
    if any(not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        raise TokenizerBinError(f"{vocab_map_path}: teacher_ids must be distinct integers")
    unknown = [i for i in ids if i not in existing]
    if unknown:
        raise TokenizerBinError(f"{vocab_map_path}: {len(unknown)} teacher id(s) are not tokens (first {unknown[0]})")
    return list(ids)


def _check_kept(tok: _Tokenizer, teacher_to_student: dict[int, int], where: str) -> None:
    lost_bytes = [b for b in range(256) if tok.vocab[BYTE_TO_CHAR[b]] not in teacher_to_student]
    if lost_bytes:
        raise TokenizerBinError(f"{where}: the student drops the byte token of byte {lost_bytes[0]}; all 256 must "
                                "be kept so every text stays encodable")
    for tid, content, _ in tok.added:
        # A dropped added token is spelled with the byte tokens of its text, as data.ExampleBuilder spells it.
        if tid not in teacher_to_student and _token_bytes(content) != content.encode("utf-8"):
            raise TokenizerBinError(f"{where}: added token {content!r} is dropped and cannot be spelled in bytes "
                                    "the way the training code spells it; keep it in the vocabulary map")


# --------------------------------------------------------------------------- writing

def _u32s(values) -> bytes:
    values = list(values)
    return struct.pack(f"<{len(values)}I", *values)


def _sections(tok: _Tokenizer, student: list[int], where: str) -> list[bytes]:
    size = tok.size
    teacher_to_student = {t: s for s, t in enumerate(student)}
    _check_kept(tok, teacher_to_student, where)
    token_bytes: list[bytes] = [b""] * size
    for token, tid in tok.vocab.items():
        token_bytes[tid] = _token_bytes(token)
    for tid, content, _ in tok.added:
        token_bytes[tid] = content.encode("utf-8")
    offsets = [0]
    for item in token_bytes:
        offsets.append(offsets[-1] + len(item))
    index: list[int] = []
    if tok.ignore_merges:
        index = sorted((i for t, i in tok.vocab.items() if _is_byte_level(t)), key=token_bytes.__getitem__)
    ccc, decomp, compose = nfc_tables() if tok.nfc else ((), (), ())
    pool: list[int] = []
    decomp_rows = []
    for cp, seq in decomp:
        decomp_rows += [cp, len(pool), len(seq)]
        pool += seq
    return [
        _u32s(tok.vocab[BYTE_TO_CHAR[b]] for b in range(256)),
        _u32s(v for row in _merge_table(tok, where) for v in row),
        _u32s(student),
        _u32s(teacher_to_student.get(t, NOT_KEPT) for t in range(size)),
        _u32s(offsets),
        b"".join(token_bytes),
        _u32s(index),
        _u32s(v for tid, _, special in tok.added for v in (tid, int(special))),
        _u32s(v for row in category_ranges() for v in row),
        _u32s(v for row in ccc for v in row),
        _u32s(decomp_rows),
        _u32s(pool),
        _u32s(v for row in compose for v in row),
    ]


def write_tokenizer_bin(tokenizer_dir: str | Path, vocab_map_path: str | Path | None,
                        out_path: str | Path) -> TokenizerBinInfo:
    """Write tokenizer.bin for the tokenizer in tokenizer_dir and (optionally) a student vocab_map.json.

    Without a vocabulary map the student ids are all teacher ids in order (the teacher's own view).
    """
    tokenizer_dir, out_path = Path(tokenizer_dir), Path(out_path)
    where = str(vocab_map_path or tokenizer_dir / "tokenizer.json")
    tok = read_tokenizer(tokenizer_dir)
    student = _student_ids(tok, tokenizer_dir, None if vocab_map_path is None else Path(vocab_map_path))
    position = {t: s for s, t in enumerate(student)}
    specials = []
    for content in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN):
        tid = tok.id_of(content, where)
        if tid not in position:
            raise TokenizerBinError(f"{where}: the student does not keep {content} (teacher id {tid})")
        specials.append(position[tid])
    sections = _sections(tok, student, where)

    flags = (FLAG_NFC if tok.nfc else 0) | (FLAG_IGNORE_MERGES if tok.ignore_merges else 0)
    table, offset = [], HEADER_SIZE
    for blob in sections:
        table += [offset, len(blob)]
        offset += len(blob)
    body = _u32s([flags, PATTERN_QWEN2, tok.size, len(student), len(sections[1]) // 16, len(tok.added),
                  *specials, N_SECTIONS, *table]) + b"".join(sections)
    if offset >= 1 << 32:
        raise TokenizerBinError(f"{where}: tokenizer.bin would exceed 4 GiB")
    data = MAGIC + _u32s([VERSION, zlib.crc32(body)]) + body
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)
    return TokenizerBinInfo(out_path, tok.size, len(student), len(sections[1]) // 16, len(tok.added), tok.nfc,
                            tok.ignore_merges, len(data))


def _vocab_map_arg(model_dir: Path, value: str) -> Path | None:
    if value == "none":
        return None
    if value == "auto":
        candidate = model_dir / VocabMap.FILE
        return candidate if candidate.is_file() else None
    return Path(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="folder holding tokenizer.json (a student folder, or the teacher's)")
    parser.add_argument("--out", required=True, help="tokenizer.bin to write")
    parser.add_argument("--vocab_map", default="auto",
                        help="student vocabulary map: a vocab_map.json path, 'none' for the teacher's full vocabulary, "
                             "or 'auto' (default): MODEL/vocab_map.json when it exists, else the full vocabulary")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    try:
        info = write_tokenizer_bin(model_dir, _vocab_map_arg(model_dir, args.vocab_map), args.out)
    except (TokenizerBinError, ValueError, OSError) as exc:
        print(f"tokenizer_bin: {exc}", file=sys.stderr)
        return 2
    print(info.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
