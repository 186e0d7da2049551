"""deploy/package.py: DIST/board/ for the RV1126B.

The DIST comes from a real export of a tiny student; its .rknn files are stand-ins (packaging only copies them; the
real conversion runs in tests/test_deploy.py). The runner is built for real with zig (the ziglang wheel of
requirements.txt) and, for the glibc check, with Debian's aarch64 gcc, which CI installs (gcc-aarch64-linux-gnu).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import corpus
from deploy import package
from deploy.contract import Dist
from test_export_onnx import TGT_LEN, export_args, make_student, run_module

REPO = Path(__file__).resolve().parents[1]
FAKE_MODELS = {p: {g: f"{p} {g} model".encode() * 64 for g in ("encoder", "decoder")} for p in ("w8a8", "fp16")}


def fake_aarch64_elf(path: Path) -> Path:
    """What package.py reads of a runner: an ELF header (64-bit, little-endian, e_machine = 183: aarch64, no section
    headers, so no version needs) and the names the rknn backend loads."""
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + (2).to_bytes(2, "little") + (183).to_bytes(2, "little")
    path.write_bytes(header + bytes(44) + b"librknnrt.so\0rknn_set_io_mem\0")
    return path


@pytest.fixture(scope="module")
def dist(tiny_teacher: Path, small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Dist:
    root = tmp_path_factory.mktemp("package_dist")
    pairs = corpus.read_pairs(small_corpus / "train.jsonl")
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
    for needle in ("scp -r board", "adb push board", "./run.sh zh-en", "librknnrt.so", "version 2.5.0",
                   "**w8a8** on the NPU", "ms of NPU time per output token", "MB", "6-token translation", "prebuilt",
                   "RKNN_LIB", "no glibc symbol version", "./run.sh --bench", "host_ms", "perf_run_ms",
                   "This is an estimate, not a board measurement", "lite_transformer"):
        assert needle in readme, needle
    # No report.json in this DIST: the packager says the precision was picked by hand.
    assert "Why w8a8: chosen by hand (deploy.package --precision w8a8)" in readme


def test_readme_says_why_the_precision_ships(dist: Dist, tmp_path: Path) -> None:
    shutil.rmtree(dist.board, ignore_errors=True)
    package.package(dist, "fp16", fake_aarch64_elf(tmp_path / "rk_translate"), reason="fp16 is the only one")
    assert "Why fp16: fp16 is the only one." in (dist.board / "README.md").read_text()
    dist.report.write_text(json.dumps({"choice": {"precision": "fp16", "reason": "deploy chose it"}}))
    try:
        assert package.shipped_reason(dist, "fp16") == "deploy chose it"
        assert package.shipped_reason(dist, "w8a8").startswith("chosen by hand")
    finally:
        dist.report.unlink()


def test_run_sh_calls_the_runner_as_it_expects(packaged: Dist) -> None:
    """A host stand-in for rk_translate echoes its arguments: run.sh must pass the runner's CLI, and RKNN_LIB reaches
    the runner, which loads librknnrt.so from there."""
    board = packaged.board
    (board / "rk_translate").write_text('#!/bin/sh\necho "RKNN_LIB=$RKNN_LIB"\nprintf "[%s]" "$@"; echo\n')
    env = {**os.environ, "RKNN_LIB": "/opt/rknn/lib"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(board / "run.sh"), *args], capture_output=True, text=True, env=env, timeout=30)

    one = run("en-zh", "Open the file")
    assert one.returncode == 0, one.stderr
    library, argv = one.stdout.splitlines()
    assert library == "RKNN_LIB=/opt/rknn/lib"
    files = "".join(f"[{board / name}]" for name in ("encoder.rknn", "decoder.rknn", "tokenizer.bin", "embed.bin"))
    assert argv == f"[--backend][rknn][--direction][en-zh][--max_tokens][{TGT_LEN}]{files}[Open the file]"
    examples = run()
    assert examples.returncode == 0 and "[zh-en]" in examples.stdout and "[en-zh]" in examples.stdout
    bench = run("--bench")
    assert bench.returncode == 0 and bench.stdout.count(f"[--bench][{package.BENCH_RUNS}]") == 2
    bench = run("--bench", "5", "zh-en", "打开文件")
    assert bench.returncode == 0 and "[--bench][5]" in bench.stdout and "[打开文件]" in bench.stdout
    wrong = run("zh-en")
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


def test_rejects_a_runner_without_the_rknn_backend(tmp_path: Path) -> None:
    elf = fake_aarch64_elf(tmp_path / "rk_translate")
    elf.write_bytes(elf.read_bytes().replace(b"rknn_set_io_mem", b"rknn_inputs_set"))
    with pytest.raises(package.PackageError, match="has no rknn backend"):
        package.check_runner(elf)


@pytest.fixture(scope="module")
def zig_runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runner as deploy builds it by default: CMake and zig, against glibc 2.17."""
    return package.build_runner(tmp_path_factory.mktemp("build_zig"), None)


def test_builds_the_aarch64_runner_with_zig_for_old_boards(zig_runner: Path) -> None:
    elf = package.check_runner(zig_runner)
    assert elf.machine == package.EM_AARCH64 and elf.glibc == (2, 17)
    assert "libc.so.6" in elf.version_needs and package.glibc_label(elf) == "glibc 2.17"
    readelf = shutil.which("aarch64-linux-gnu-readelf") or shutil.which("readelf")
    if readelf:  # the parser of .gnu.version_r against binutils' own
        listing = subprocess.run([readelf, "-V", str(zig_runner)], capture_output=True, text=True).stdout
        needs = listing[listing.index("Version needs section"):]
        assert sorted(set(re.findall(r"Name: (GLIBC_[\d.]+)", needs))) == sorted(
            {v for vs in elf.version_needs.values() for v in vs})
    qemu = shutil.which("qemu-aarch64")
    if qemu and Path("/usr/aarch64-linux-gnu/lib").is_dir():  # the runner's CLI is what run.sh calls
        usage = subprocess.run([qemu, "-L", "/usr/aarch64-linux-gnu", str(zig_runner), "--help"], capture_output=True,
                               text=True, timeout=60)
        assert usage.returncode == 0
        assert all(flag in usage.stdout for flag in ("--direction", "--backend", "--max_tokens", "--bench",
                                                     "TOKENIZER_BIN", "rknn (default)"))


def test_refuses_a_runner_that_needs_a_newer_glibc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian 12's aarch64 gcc links __libc_start_main@GLIBC_2.34: CROSS_COMPILE builds with it, packaging refuses."""
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.fail("aarch64-linux-gnu-gcc not found: install it (apt install gcc-aarch64-linux-gnu) for this test")
    monkeypatch.setenv("CROSS_COMPILE", "aarch64-linux-gnu-")
    runner = package.build_runner(tmp_path / "build", None)
    assert package.read_elf(runner).glibc > package.MAX_GLIBC
    with pytest.raises(package.PackageError, match=r"needs glibc 2\.\d+ .*newer than the 2\.28"):
        package.check_runner(runner)
