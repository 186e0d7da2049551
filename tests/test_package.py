"""deploy/package.py: DIST/board/ for the RV1126B.

The DIST comes from a real export of a tiny student; its .rknn files are stand-ins (packaging only copies them; the
real conversion runs in tests/test_deploy.py). The runner is built for real with the aarch64 cross compiler, which
CI installs (gcc-aarch64-linux-gnu); without it that test fails and says so.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data
from deploy import package
from inference.backends import Dist
from test_export_onnx import TGT_LEN, export_args, make_student, run_module

REPO = Path(__file__).resolve().parents[1]
FAKE_MODELS = {p: {g: f"{p} {g} model".encode() * 64 for g in ("encoder", "decoder")} for p in ("w8a8", "fp16")}


def fake_aarch64_elf(path: Path) -> Path:
    """The 20 header bytes package.py reads: ELF magic, 64-bit, little-endian, e_machine = 183 (aarch64)."""
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + (2).to_bytes(2, "little") + (183).to_bytes(2, "little")
    path.write_bytes(header + bytes(44))
    return path


@pytest.fixture(scope="module")
def dist(tiny_teacher: Path, small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Dist:
    root = tmp_path_factory.mktemp("package_dist")
    pairs = data.read_pairs(small_corpus / "train.jsonl")
    student = make_student(root / "student", tiny_teacher, pairs, "transformer")
    done = run_module("deploy.export_onnx", *export_args(student, root / "dist" / "onnx", small_corpus))
    assert done.returncode == 0, done.stderr[-3000:]
    dist = Dist(root / "dist")
    for precision, graphs in FAKE_MODELS.items():
        (dist.rknn / precision).mkdir(parents=True)
        for graph, blob in graphs.items():
            (dist.rknn / precision / f"{graph}.rknn").write_bytes(blob)
    dist.rknn_report.write_text(json.dumps({"precisions": {"fp16": {}, "w8a8": {}}}))
    return dist


@pytest.fixture()
def packaged(dist: Dist, tmp_path: Path) -> Dist:
    shutil.rmtree(dist.board, ignore_errors=True)
    package.package(dist, "w8a8", fake_aarch64_elf(tmp_path / "rk_translate"), tokens=6.0)
    return dist


def test_board_has_every_file(packaged: Dist) -> None:
    board = packaged.board
    assert sorted(p.name for p in board.iterdir()) == sorted(package.BOARD_FILES)
    for graph in ("encoder", "decoder"):
        assert (board / f"{graph}.rknn").read_bytes() == FAKE_MODELS["w8a8"][graph]
    assert (board / "embed.bin").read_bytes() == packaged.embed.read_bytes()
    assert (board / "tokenizer.bin").read_bytes()[:8] == b"RKTOK1\0\0"
    for name in ("run.sh", "rk_translate"):
        assert os.access(board / name, os.X_OK), name


def test_readme_tells_how_to_copy_run_and_what_to_expect(packaged: Dist) -> None:
    readme = (packaged.board / "README.md").read_text()
    for needle in ("scp -r board", "adb push board", "./run.sh zh-en", "librknnrt.so", "version 2.5.0", "w8a8",
                   "ms of NPU time per output token", "MB", "6-token translation", "prebuilt"):
        assert needle in readme, needle


def test_run_sh_calls_the_runner_as_it_expects(packaged: Dist) -> None:
    """A host stand-in for rk_translate echoes its arguments: run.sh must pass the runner's CLI and library path."""
    board = packaged.board
    (board / "rk_translate").write_text('#!/bin/sh\necho "LD=$LD_LIBRARY_PATH"\nprintf "[%s]" "$@"; echo\n')
    env = {**os.environ, "RKNN_LIB": "/opt/rknn/lib"}
    one = subprocess.run(["sh", str(board / "run.sh"), "en-zh", "Open the file"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert one.returncode == 0, one.stderr
    ld, argv = one.stdout.splitlines()
    assert ld.startswith("LD=/opt/rknn/lib:")
    files = "".join(f"[{board / name}]" for name in ("encoder.rknn", "decoder.rknn", "tokenizer.bin", "embed.bin"))
    assert argv == f"[--backend][rknn][--direction][en-zh][--max_tokens][{TGT_LEN}]{files}[Open the file]"
    examples = subprocess.run(["sh", str(board / "run.sh")], capture_output=True, text=True, env=env, timeout=30)
    assert examples.returncode == 0 and "[zh-en]" in examples.stdout and "[en-zh]" in examples.stdout
    wrong = subprocess.run(["sh", str(board / "run.sh"), "zh-en"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "usage" in wrong.stderr


def test_rejects_a_runner_for_another_architecture(dist: Dist) -> None:
    host_binary = Path(sys.executable).resolve()
    with pytest.raises(package.PackageError, match="is not an aarch64 ELF executable"):
        package.package(dist, "w8a8", host_binary)


def test_names_what_is_missing(dist: Dist, tmp_path: Path) -> None:
    with pytest.raises(package.PackageError, match=r"hybrid/encoder\.rknn.*run export and convert for hybrid"):
        package.package(dist, "hybrid", fake_aarch64_elf(tmp_path / "rk_translate"))


def test_cli_defaults_to_the_first_converted_precision(dist: Dist, tmp_path: Path) -> None:
    done = run_module("deploy.package", "--dist", str(dist.root), "--runner",
                      str(fake_aarch64_elf(tmp_path / "rk_translate")))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["precision"] == "fp16" and set(result["files"]) == set(package.BOARD_FILES)
    assert (dist.board / "encoder.rknn").read_bytes() == FAKE_MODELS["fp16"]["encoder"]
    bad = run_module("deploy.package", "--dist", str(dist.root), "--runner", sys.executable)
    assert bad.returncode == 2 and "not an aarch64 ELF executable" in bad.stderr.strip().splitlines()[-1]


def test_builds_the_aarch64_runner_with_cmake(tmp_path: Path) -> None:
    if shutil.which(package.CROSS_COMPILER) is None:
        pytest.fail(f"{package.CROSS_COMPILER} not found: install the aarch64 cross compiler "
                    "(apt install gcc-aarch64-linux-gnu) to build the board runner")
    runner = package.build_runner(tmp_path / "build", None)
    assert package.elf_machine(runner) == package.EM_AARCH64
    qemu = shutil.which("qemu-aarch64")
    if qemu and Path("/usr/aarch64-linux-gnu/lib").is_dir():  # the runner's CLI is what run.sh calls
        usage = subprocess.run([qemu, "-L", "/usr/aarch64-linux-gnu", str(runner), "--help"], capture_output=True,
                               text=True, timeout=60)
        assert usage.returncode == 0
        assert all(flag in usage.stdout for flag in ("--direction", "--backend", "--max_tokens", "TOKENIZER_BIN"))
