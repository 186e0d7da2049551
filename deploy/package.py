"""Assemble DIST/board/: everything an RV1126B needs to translate, ready to copy over with scp or adb.

    python -m deploy.package --dist DIST [--precision w8a8] [--runner PATH_TO_AARCH64_rk_translate]

board/ holds the chosen precision's encoder.rknn and decoder.rknn, tokenizer.bin (deploy/tokenizer_bin.py),
embed.bin, the aarch64 runner rk_translate, run.sh and a README.md for the board. Without --runner the runner is
built from deploy/runtime with CMake and the aarch64 cross compiler (apt install gcc-aarch64-linux-gnu).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from deploy import estimate
from deploy.tokenizer_bin import TokenizerBinError, write_tokenizer_bin
from inference.backends import BackendError, DeployMeta, Dist, default_precision

log = logging.getLogger("deploy.package")

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "deploy" / "runtime"
TOOLCHAIN = RUNTIME / "toolchain-aarch64.cmake"
CROSS_COMPILER = "aarch64-linux-gnu-gcc"
RUNNER = "rk_translate"
TOOLKIT_VERSION = "2.5.0"  # rknn-toolkit2 in .venv-rknn; the board's librknnrt.so must be the same version
EM_AARCH64 = 183  # ELF e_machine
BOARD_FILES = ("encoder.rknn", "decoder.rknn", "tokenizer.bin", "embed.bin", RUNNER, "run.sh", "README.md")
EXAMPLES = {"zh-en": "打开文件", "en-zh": "Open the file"}


class PackageError(RuntimeError):
    """The board folder cannot be assembled; the message says what is missing."""


def elf_machine(path: Path) -> int | None:
    """The ELF e_machine field, or None for a file that is not ELF."""
    header = path.read_bytes()[:20]
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def check_runner(path: Path) -> Path:
    if not path.is_file():
        raise PackageError(f"runner {path} not found")
    if elf_machine(path) != EM_AARCH64:
        raise PackageError(f"runner {path} is not an aarch64 ELF executable; build it with the aarch64 toolchain "
                           f"({TOOLCHAIN.relative_to(REPO)}) or omit --runner to build it here")
    return path


def build_runner(build_dir: Path, rknn_sdk: Path | None) -> Path:
    """rk_translate for aarch64, with CMake and the cross toolchain file (CROSS_COMPILE picks another compiler).

    rknn_sdk: Rockchip's runtime folder (rknn_api.h, aarch64 librknnrt.so); without it the runner has no NPU
    backend, only the replay one the host tests use."""
    compiler = f"{os.environ['CROSS_COMPILE']}gcc" if os.environ.get("CROSS_COMPILE") else CROSS_COMPILER
    if shutil.which(compiler) is None:
        raise PackageError(f"no aarch64 cross compiler ({compiler} not on PATH): install it "
                           "(apt install gcc-aarch64-linux-gnu) or pass --runner PATH_TO_AARCH64_rk_translate")
    if not TOOLCHAIN.is_file():
        raise PackageError(f"{TOOLCHAIN.relative_to(REPO)} not found; the C runner sources are incomplete")
    configure = ["cmake", "-S", str(RUNTIME), "-B", str(build_dir), f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN}",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DRKNN_SDK={rknn_sdk or ''}"]
    log.info("building %s for aarch64 in %s (%s)", RUNNER, build_dir,
             f"RKNN_SDK={rknn_sdk}" if rknn_sdk else "no RKNN_SDK: replay backend only, no NPU")
    for command in (configure, ["cmake", "--build", str(build_dir), "--target", RUNNER, "--parallel"]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise PackageError(f"`{' '.join(command[:2])} ...` failed: {done.stderr.strip()[-800:]}")
    return check_runner(build_dir / RUNNER)


def run_sh(meta: DeployMeta) -> str:
    """The board's launcher: finds librknnrt.so, then translates its arguments (or one example each way)."""
    return f"""#!/bin/sh
# Translate on the RV1126B NPU:  ./run.sh zh-en "打开文件"  |  ./run.sh en-zh "Open the file"  |  ./run.sh
# librknnrt.so must be version {TOOLKIT_VERSION} (the rknn-toolkit2 that built the .rknn files); set RKNN_LIB to the
# folder holding it when it is not in /usr/lib or /oem/usr/lib.
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="${{RKNN_LIB:-/usr/lib}}:/oem/usr/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
translate() {{
  "$HERE/{RUNNER}" --backend rknn --direction "$1" --max_tokens {meta.Tc} \\
    "$HERE/encoder.rknn" "$HERE/decoder.rknn" "$HERE/tokenizer.bin" "$HERE/embed.bin" "$2"
}}
case "$#" in
  0) translate zh-en "{EXAMPLES['zh-en']}"; translate en-zh "{EXAMPLES['en-zh']}" ;;
  2) translate "$1" "$2" ;;
  *) echo "usage: $0 [zh-en|en-zh TEXT]" >&2; exit 2 ;;
esac
"""


def readme(meta: DeployMeta, precision: str, files: dict[str, int], npu: dict[str, Any], runner_note: str) -> str:
    listing = "\n".join(f"| `{name}` | {size / 1024:,.0f} KB |" for name, size in files.items())
    expect = (f"About {npu['per_token_ms']:.1f} ms of NPU time per output token and "
              f"{npu['encoder_per_sentence']['ms']:.1f} ms for the encoder, so roughly {npu['per_sentence_ms']:.0f} ms "
              f"for a {npu['tokens_per_sentence']:.0f}-token translation; about {npu['memory']['total_mb']:.0f} MB "
              "resident. These are estimates from the graphs' MACs and bytes (deploy/estimate.py; every assumption is "
              "in DIST/report.json), not board measurements: compare them with the timing line the runner prints.")
    return f"""# rk-distill on the RV1126B

A {meta.parameters:,}-parameter zh<->en student ({meta.decoder} decoder), {precision} on the NPU.
Runner: {runner_note}.

| file | size |
|---|---|
{listing}

## Copy to the board

    scp -r board root@BOARD_IP:/userdata/rk-distill        # network
    adb push board /userdata/rk-distill                     # USB

## Run

    cd /userdata/rk-distill
    ./run.sh                                                # one example each way
    ./run.sh zh-en "{EXAMPLES['zh-en']}"
    ./run.sh en-zh "{EXAMPLES['en-zh']}"

`run.sh` puts the board's `librknnrt.so` on LD_LIBRARY_PATH (`RKNN_LIB=/path/to/dir ./run.sh ...` when it lives
elsewhere than /usr/lib or /oem/usr/lib). It **must be version {TOOLKIT_VERSION}**, the rknn-toolkit2 that built these
.rknn files (`strings librknnrt.so | grep "librknnrt version"`); another version fails at load or computes wrongly.
If the runner does not start because the board's C library is older than the cross compiler's, rebuild it with the
board SDK's compiler: `CROSS_COMPILE=/path/to/aarch64-...- python -m deploy.package --dist DIST`.

## Expected output

The translation on stdout; the source and output ids and a timing line (load, tokenize, encoder, mean decoder step,
total) on stderr. Sources longer than {meta.S} tokens are refused (split the sentence); translations stop at
{meta.Tc} tokens. The text matches what the simulator produced for {precision} (DIST/report.json, `quality`), up to
rounding differences between the simulator and the NPU.

## Memory and latency to expect

{expect}
"""


def package(dist: Dist, precision: str, runner: Path | None = None, tokens: float = 0.0,
            rknn_sdk: Path | None = None) -> dict[str, Any]:
    """Fill dist.board and return {"folder", "precision", "runner", "files": {name: bytes}}.

    runner: a prebuilt aarch64 rk_translate, else one is built (with rknn_sdk for the NPU backend).
    tokens: output tokens of a typical translation, for the README's latency estimate (0: the longest, Tc).
    The data files are written before the runner is built, so a missing cross compiler leaves a board folder
    that lacks only the runner, run.sh and README."""
    source = dist.rknn / precision
    meta = load_meta(dist)
    models = [source / "encoder.rknn", source / "decoder.rknn"]
    missing = [p for p in [*models, dist.embed, dist.tokenizer / "tokenizer.json"] if not p.is_file()]
    if missing:
        raise PackageError(f"missing {', '.join(map(str, missing))}; run export and convert for {precision} first")
    board = dist.board
    board.mkdir(parents=True, exist_ok=True)
    for path in [*models, dist.embed]:
        shutil.copy2(path, board / path.name)
    try:
        write_tokenizer_bin(dist.tokenizer, dist.tokenizer / "vocab_map.json", board / "tokenizer.bin")
    except TokenizerBinError as exc:
        raise PackageError(f"tokenizer.bin: {exc}") from exc
    if runner:
        runner, note = check_runner(runner), f"prebuilt {runner}"
    elif rknn_sdk:
        runner, note = build_runner(dist.root / "build-aarch64", rknn_sdk), f"built with RKNN_SDK={rknn_sdk}"
    else:
        runner = build_runner(dist.root / "build-aarch64", None)
        note = ("built WITHOUT an RKNN SDK, so it has no NPU backend (replay only): rebuild with "
                "`python -m deploy.package --rknn_sdk DIR` before running on the board")
        log.warning("runner %s", note)
    shutil.copy2(runner, board / RUNNER)
    (board / RUNNER).chmod((board / RUNNER).stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    (board / "run.sh").write_text(run_sh(meta))
    (board / "run.sh").chmod(0o755)
    files = {name: (board / name).stat().st_size for name in BOARD_FILES if name != "README.md"}
    npu = estimate.estimate(dist, precision, tokens)
    (board / "README.md").write_text(readme(meta, precision, files, npu, note))
    files["README.md"] = (board / "README.md").stat().st_size
    log.info("board package: %s (%s, %.0f KB)", board, precision, sum(files.values()) / 1024)
    return {"folder": str(board), "precision": precision, "runner": note, "files": files}


def load_meta(dist: Dist) -> DeployMeta:
    try:
        return DeployMeta.load(dist.meta)
    except BackendError as exc:
        raise PackageError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dist", type=Path, required=True, help="deploy output folder (onnx/, rknn/, tokenizer/)")
    parser.add_argument("--precision", default=None,
                        help="which rknn/<precision>/ to ship (default: the one python -m deploy chose)")
    parser.add_argument("--runner", type=Path, default=None,
                        help="prebuilt aarch64 rk_translate (default: build it with CMake and the cross compiler)")
    parser.add_argument("--rknn_sdk", type=Path, default=None,
                        help=f"Rockchip RKNN runtime folder (rknn_api.h, aarch64 librknnrt.so {TOOLKIT_VERSION}) to "
                             "build the runner's NPU backend with (default: none, replay backend only)")
    parser.add_argument("--tokens", type=float, default=0.0,
                        help="output tokens of a typical translation, for the README's estimate (default: Tc)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    dist = Dist(args.dist.resolve())
    try:
        result = package(dist, args.precision or default_precision(dist), args.runner, args.tokens, args.rknn_sdk)
    except (PackageError, BackendError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
