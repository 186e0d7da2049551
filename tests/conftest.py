"""Shared fixtures: real objects built small (a corpus from gettext catalogs, a tiny Qwen-shaped teacher)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import data  # noqa: E402


def write_mo(path: Path, messages: dict[str, str]) -> Path:
    """A GNU .mo catalog (little-endian, no hash table) with the header entry gettext expects."""
    entries = {"": "Content-Type: text/plain; charset=UTF-8\n", **messages}
    keys = sorted(entries)
    ids = [k.encode() for k in keys]
    strs = [entries[k].encode() for k in keys]
    header_size = 7 * 4
    originals_at = header_size
    translations_at = originals_at + 8 * len(keys)
    blob_at = translations_at + 8 * len(keys)
    blob = b""
    orig_table, trans_table = b"", b""
    for item in ids:
        orig_table += struct.pack("<II", len(item), blob_at + len(blob))
        blob += item + b"\0"
    for item in strs:
        trans_table += struct.pack("<II", len(item), blob_at + len(blob))
        blob += item + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, len(keys), originals_at, translations_at, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + orig_table + trans_table + blob)
    return path


@pytest.fixture(scope="session")
def rknn_python() -> Path:
    """The RKNN toolkit's own virtualenv, created on first use (a few minutes on a fresh machine)."""
    venv = ROOT / ".venv-rknn"
    if not (venv / ".rknn-setup-done").is_file():
        subprocess.run(["bash", str(ROOT / "deploy" / "setup_rknn_env.sh"), str(venv)], check=True, timeout=1800)
    return venv / "bin" / "python"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """The real catalog corpus of this machine, built once per test session."""
    out = tmp_path_factory.mktemp("corpus")
    data.build_catalog_corpus("/usr/share/locale", out)
    return out


@pytest.fixture(scope="session")
def small_corpus(corpus_dir, tmp_path_factory) -> Path:
    """Short pairs only (UI labels learn fastest): 600 train, 24 valid, 24 test."""
    out = tmp_path_factory.mktemp("small_corpus")
    for split, count in (("train", 600), ("valid", 24), ("test", 24)):
        pairs = [p for p in data.read_pairs(corpus_dir / f"{split}.jsonl") if len(p.en) <= 30][:count]
        data.write_jsonl(pairs, out / f"{split}.jsonl")
    return out


@pytest.fixture(scope="session")
def tiny_teacher(small_corpus, tmp_path_factory) -> Path:
    from make_tiny_teacher import make_tiny_teacher
    pairs = data.read_pairs(small_corpus / "train.jsonl")
    return make_tiny_teacher(pairs, tmp_path_factory.mktemp("teacher") / "tiny-qwen", vocab_size=800)


@pytest.fixture(scope="session")
def tokenizer(tiny_teacher):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_teacher)
