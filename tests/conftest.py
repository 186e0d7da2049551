"""Shared fixtures: real objects built small (a corpus from gettext catalogs, a tiny Qwen-shaped teacher)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import corpus
import data
import vocabulary
from engine import free_port

ROOT = Path(__file__).resolve().parent.parent  # on sys.path (pytest.ini): every module imports as in the run


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
    corpus.build_catalog_corpus("/usr/share/locale", out)
    return out


@pytest.fixture(scope="session")
def small_corpus(corpus_dir, tmp_path_factory) -> Path:
    """Short pairs only (UI labels learn fastest): 600 train, 24 valid, 24 test."""
    out = tmp_path_factory.mktemp("small_corpus")
    for split, count in (("train", 600), ("valid", 24), ("test", 24)):
        pairs = [p for p in corpus.read_pairs(corpus_dir / f"{split}.jsonl") if len(p.en) <= 30][:count]
        corpus.write_jsonl(pairs, out / f"{split}.jsonl")
    return out


@pytest.fixture(scope="session")
def tiny_teacher(small_corpus, tmp_path_factory) -> Path:
    from scripts.make_tiny_teacher import make_tiny_teacher
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")
    return make_tiny_teacher(pairs, tmp_path_factory.mktemp("teacher") / "tiny-qwen", vocab_size=800)


@pytest.fixture(scope="session")
def tokenizer(tiny_teacher):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_teacher)


# --------------------------------------------------------------------------- one tiny training run, shared
# A quickstart-shaped run folder (RUN/sft, RUN/distill) trained once per session on 2 CPU ranks and shared by
# test_train_ds.py (training, resume, export), test_report.py (the report rendered from its files) and
# test_scripts.py (the README's launch scripts). The teacher fine-tuning goes through scripts/run_teacher_sft.sh,
# the README's command; the distillation launches train_ds.py directly because it is the reference that
# test_resume_is_exact compares a resumed `launch(*DISTILL)` run against.

COMMON = ["--micro_batch_size", "8", "--data.valid_subset", "8", "--log_every", "5", "--save_every", "100"]
SFT = ["--max_steps", "12", "--eval_every", "12", *COMMON]
DISTILL = ["--stage", "distill", "--max_steps", "24", "--eval_every", "12", "--lr", "3e-3", "--warmup_steps", "4",
           "--data.vocab_size", "600", *COMMON]


def launch(*args: str, fault: str = "", check: bool = True, num_gpus: int = 2) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N train_ds.py ARGS` on N CPU ranks; fault sets $RK_DISTILL_FAULT (train_ds.fault)."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus), "--master_port",
           str(port), "train_ds.py", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "RK_DISTILL_FAULT": fault})
    # engine.init_processes: DeepSpeed's 66 MB /dev/shm buffers are never left behind, even by a killed run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# What scripts/*.sh read from the environment: only the values a test passes may reach them.
SCRIPT_VARIABLES = ("CONFIG", "TEACHER", "DATA", "OUT", "PRESET", "DS_CONFIG", "TEACHER_DS_CONFIG", "MICRO_BATCH",
                    "GRAD_ACCUM", "LR", "EPOCHS", "KD_LOSS", "NUM_GPUS", "HOSTFILE", "NUM_NODES", "MASTER_ADDR",
                    "MASTER_PORT", "LAUNCHER_ARGS", "DEEPSPEED", "DRY_RUN", "HOST", "RUN", "DIST", "SFT_STEPS",
                    "DISTILL_STEPS", "TAG", "EXTRACT_WORKERS", "MERGE_WORKERS", "PYTHON")


def run_script(script: str, env: dict[str, str], *args: str, timeout: int = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """`VAR=... bash scripts/SCRIPT ARGS` as a person types it (from any folder: the scripts cd to the repository)."""
    inherited = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}
    result = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                            timeout=timeout, env={**inherited, "PYTHONUNBUFFERED": "1", **env})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def step_losses(run: Path) -> dict[int, float]:
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "eval" not in entry:
            losses[entry["step"]] = entry["loss"]
    return losses


@pytest.fixture(scope="session")
def run_root(tmp_path_factory) -> Path:
    """The shared run folder: sft/ and distill/ appear in it as their fixtures are used."""
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="session")
def sft_run(run_root, tiny_teacher, small_corpus) -> Path:
    """12 teacher fine-tuning steps through scripts/run_teacher_sft.sh; its output is kept in RUN/sft.launch.log."""
    run = run_root / "sft"
    result = run_script("run_teacher_sft.sh", {
        "TEACHER": str(tiny_teacher), "DATA": str(small_corpus), "OUT": str(run), "NUM_GPUS": "2",
        "MASTER_PORT": str(free_port()), "MICRO_BATCH": "8", "GRAD_ACCUM": "1", "LR": "3e-3"}, *SFT)
    (run_root / "sft.launch.log").write_text(result.stdout + result.stderr)
    return run


@pytest.fixture(scope="session")
def distill_run(run_root, sft_run, small_corpus) -> Path:
    """24 distillation steps of the tiny student from the fine-tuned teacher, evaluated at steps 12 and 24."""
    run = run_root / "distill"
    launch(*DISTILL, "--teacher", str(sft_run / "final"), "--data", str(small_corpus), "--out", str(run))
    return run


@pytest.fixture(scope="session")
def student_folder(tokenizer, small_corpus, tmp_path_factory) -> Path:
    """A tiny untrained student saved as train_ds.py exports one (weights, tokenizer, vocab_map.json).

    Its matrices are drawn wider than the model's own init: at that init the residual stream carries the input
    token through, so every step re-emits bos and every translation is empty. Wider weights make the output depend
    on the source, so tests can tell translations apart.
    """
    import torch

    from model import StudentConfig, StudentForTranslation
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")
    vocab = vocabulary.build_vocab_map(tokenizer, [p.zh for p in pairs] + [p.en for p in pairs], 600, 832)
    builder = data.ExampleBuilder(tokenizer, vocab, 24, 24)
    torch.manual_seed(0)
    model = StudentForTranslation(StudentConfig(vocab_size=vocab.size, d_model=32, n_heads=4, encoder_layers=1,
                                                decoder_layers=1, ffn_dim=64, max_source_len=24, max_target_len=24,
                                                pad_token_id=builder.pad_id, bos_token_id=builder.bos_id,
                                                eos_token_id=builder.eos_id))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                weight.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("student")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vocab.save(folder)
    return folder


# --------------------------------------------------------------------------- exported students, shared
# Tiny random students of both decoder kinds exported with the real command line (tests/test_export_onnx.py's
# helpers), shared by test_export_onnx.py (the graphs and their parity), test_convert_rknn.py (the toolkit on them)
# and test_runtime.py (the board runner on the same graphs).


@pytest.fixture(scope="session")
def students(tiny_teacher, small_corpus, tmp_path_factory) -> dict[str, Path]:
    from test_export_onnx import KINDS, make_student
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")
    return {kind: make_student(tmp_path_factory.mktemp(f"student_{kind}"), tiny_teacher, pairs, kind)
            for kind in KINDS}


@pytest.fixture(scope="session")
def exported(students, small_corpus, tmp_path_factory) -> dict:
    """{kind: deploy.contract.Dist} of each student's `python -m deploy.export_onnx` output."""
    from deploy.contract import Dist
    from test_export_onnx import N_PARITY, export_args, run_module
    dists = {}
    for kind, student in students.items():
        dist = Dist(tmp_path_factory.mktemp(f"dist_{kind}"))
        done = run_module("deploy.export_onnx", *export_args(student, dist.onnx, small_corpus))
        assert done.returncode == 0, f"export failed for {kind}:\n{done.stderr[-3000:]}"
        assert f"greedy {N_PARITY}/{N_PARITY} identical" in done.stdout
        dists[kind] = dist
    return dists
