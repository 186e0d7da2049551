"""The student's vocabulary: a trimmed subset of the teacher tokenizer's ids (vocab_map.json in a student folder),
and the byte-level alphabet that spells every teacher token the subset leaves out.

The student shares the teacher's byte-level BPE tokenizer; keeping all 256 byte tokens and the specials below
keeps every text encodable whatever else is trimmed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# The student's pad, bos and eos are Qwen's chat specials, so every Qwen tokenizer already has them.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


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
