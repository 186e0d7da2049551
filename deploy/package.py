"""Assemble DIST/board/: everything an RV1126B needs to translate, ready to copy over with scp or adb.

    python -m deploy.package --dist DIST [--precision w8a8] [--runner PATH_TO_AARCH64_rk_translate]

board/ holds the chosen precision's encoder.rknn and decoder.rknn, tokenizer.bin (deploy/tokenizer_bin.py),
embed.bin, the aarch64 runner rk_translate, run.sh and a README.md for the board. Without --runner the runner is
built from deploy/runtime with CMake and zig's C compiler (the ziglang wheel of requirements.txt) against glibc 2.17;
CROSS_COMPILE=/path/to/aarch64-...- builds it with a board SDK's gcc instead. The runner's rknn backend loads the
board's librknnrt.so at run time, so no RKNN SDK is needed (--rknn_sdk links one instead). Whatever built it, the
runner must be aarch64, carry that backend and need no glibc symbol newer than 2.28 (read from its ELF version needs),
or packaging fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from deploy import estimate
from deploy.tokenizer_bin import TokenizerBinError, write_tokenizer_bin
from deploy.contract import ContractError, DeployMeta, Dist, default_precision

log = logging.getLogger("deploy.package")

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "deploy" / "runtime"
ZIG_TOOLCHAIN = RUNTIME / "toolchain-zig-aarch64.cmake"
GCC_TOOLCHAIN = RUNTIME / "toolchain-aarch64.cmake"  # CROSS_COMPILE's gcc: a board SDK's or Debian's
RUNNER = "rk_translate"
TOOLKIT_VERSION = "2.5.0"  # rknn-toolkit2 in .venv-rknn; the board's librknnrt.so must be the same version
EM_AARCH64 = 183  # ELF e_machine
MAX_GLIBC = (2, 28)  # the newest glibc symbol version the runner may need: older board images must run it
BOARD_FILES = ("encoder.rknn", "decoder.rknn", "tokenizer.bin", "embed.bin", RUNNER, "run.sh", "README.md")
EXAMPLES = {"zh-en": "打开文件", "en-zh": "Open the file"}
BENCH_RUNS = 20  # run.sh --bench's default


class PackageError(RuntimeError):
    """The board folder cannot be assembled; the message says what is missing."""


@dataclass(frozen=True)
class Elf:
    """What packaging checks in an ELF file: its machine and the symbol versions it needs (.gnu.version_r)."""

    machine: int
    version_needs: dict[str, list[str]]  # library -> versions, e.g. {"libc.so.6": ["GLIBC_2.17"]}

    @property
    def glibc(self) -> tuple[int, ...]:
        """The newest GLIBC_x.y any library is asked for, (0,) when none."""
        versions = [tuple(int(n) for n in v[len("GLIBC_"):].split(".")) for vs in self.version_needs.values()
                    for v in vs if v.startswith("GLIBC_") and v[len("GLIBC_"):].replace(".", "").isdigit()]
        return max(versions, default=(0,))


SHT_GNU_VERNEED = 0x6FFFFFFE


def read_elf(path: Path) -> Elf | None:
    """The machine and version needs of an ELF file (32 or 64 bit, either byte order); None when it is not ELF."""
    blob = path.read_bytes()
    if len(blob) < 52 or blob[:4] != b"\x7fELF" or blob[4] not in (1, 2) or blob[5] not in (1, 2):
        return None
    wide, order = blob[4] == 2, "<" if blob[5] == 1 else ">"

    def unpack(fmt: str, offset: int) -> tuple:
        return struct.unpack_from(order + fmt, blob, offset)

    machine = unpack("H", 18)[0]
    shoff, (shentsize, shnum) = (unpack("Q", 40)[0], unpack("2H", 58)) if wide else (unpack("I", 32)[0],
                                                                                      unpack("2H", 46))
    section = "IIQQQQIIQQ" if wide else "IIIIIIIIII"  # name, type, flags, addr, offset, size, link, info, ...
    sections = [unpack(section, shoff + i * shentsize) for i in range(shnum)] if shoff else []
    needs: dict[str, list[str]] = {}
    for sh in sections:
        if sh[1] != SHT_GNU_VERNEED:
            continue
        strings = sections[sh[6]][4]

        def name(offset: int) -> str:
            end = blob.index(b"\0", strings + offset)
            return blob[strings + offset:end].decode(errors="replace")

        entry = sh[4]
        for _ in range(sh[7]):  # sh_info: the number of Verneed entries
            _, count, file, aux, following = unpack("HHIII", entry)
            versions, at = [], entry + aux
            for _ in range(count):
                _, _, _, vna_name, vna_next = unpack("IHHII", at)
                versions.append(name(vna_name))
                at += vna_next
            needs[name(file)] = versions
            if not following:
                break
            entry += following
    return Elf(machine, needs)


def elf_machine(path: Path) -> int | None:
    elf = read_elf(path)
    return elf.machine if elf else None


def check_runner(path: Path) -> Elf:
    """An aarch64 rk_translate with the rknn backend that runs on glibc MAX_GLIBC; PackageError otherwise."""
    if not path.is_file():
        raise PackageError(f"runner {path} not found")
    try:
        elf = read_elf(path)
    except (struct.error, IndexError, ValueError) as exc:
        raise PackageError(f"runner {path}: its ELF headers cannot be read ({exc}); rebuild it") from exc
    if elf is None or elf.machine != EM_AARCH64:
        raise PackageError(f"runner {path} is not an aarch64 ELF executable; build it with the aarch64 toolchain "
                           f"({ZIG_TOOLCHAIN.relative_to(REPO)}) or omit --runner to build it here")
    blob = path.read_bytes()
    if b"librknnrt.so" not in blob or b"rknn_set_io_mem" not in blob:
        raise PackageError(f"runner {path} has no rknn backend (an rk_translate older than this deploy/runtime); "
                           "omit --runner to build it here")
    if elf.glibc > MAX_GLIBC:
        newest = ".".join(map(str, elf.glibc))
        raise PackageError(f"runner {path} needs glibc {newest} (GLIBC_{newest} in its ELF version needs), newer than "
                           f"the {'.'.join(map(str, MAX_GLIBC))} that old board images have: build it here with zig "
                           "(omit --runner and CROSS_COMPILE) or with the board SDK's compiler (CROSS_COMPILE=...)")
    return elf


def glibc_label(elf: Elf) -> str:
    """The newest glibc the runner asks for, as the board README states it."""
    return "glibc " + ".".join(map(str, elf.glibc)) if elf.glibc > (0,) else "no glibc symbol version"


def build_runner(build_dir: Path, rknn_sdk: Path | None) -> Path:
    """rk_translate for aarch64 with CMake: zig's C compiler against glibc 2.17 by default, CROSS_COMPILE's gcc when
    that is set (a board SDK's toolchain). rknn_sdk: link Rockchip's librknnrt.so instead of loading it at run time."""
    if shutil.which("cmake") is None:
        raise PackageError("cmake not found: install it (apt install cmake) or pass --runner "
                           "PATH_TO_AARCH64_rk_translate")
    env = {**os.environ, "RKT_PYTHON": sys.executable}
    if os.environ.get("CROSS_COMPILE"):
        compiler = f"{os.environ['CROSS_COMPILE']}gcc"
        if shutil.which(compiler) is None:
            raise PackageError(f"CROSS_COMPILE={os.environ['CROSS_COMPILE']}: {compiler} not found; fix the prefix or "
                               "unset CROSS_COMPILE to build with zig")
        toolchain, what = GCC_TOOLCHAIN, compiler
    else:
        if importlib.util.find_spec("ziglang") is None:
            raise PackageError(f"the ziglang wheel is missing from {sys.executable}: pip install ziglang==0.17.0 "
                               "(requirements.txt), or set CROSS_COMPILE for a board SDK's gcc, or pass --runner")
        toolchain, what = ZIG_TOOLCHAIN, "zig cc (glibc 2.17)"
    configure = ["cmake", "-S", str(RUNTIME), "-B", str(build_dir), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DRKNN_SDK={rknn_sdk or ''}"]
    log.info("building %s for aarch64 in %s with %s (%s)", RUNNER, build_dir, what,
             f"RKNN_SDK={rknn_sdk}" if rknn_sdk else "librknnrt.so loaded at run time")
    for command in (configure, ["cmake", "--build", str(build_dir), "--target", RUNNER, "--parallel"]):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise PackageError(f"`{' '.join(command[:2])} ...` failed: {done.stderr.strip()[-800:]}")
    return build_dir / RUNNER


def run_sh(meta: DeployMeta) -> str:
    """The board's launcher: translates its arguments (or one example each way); --bench measures them."""
    return f"""#!/bin/sh
# Translate on the RV1126B NPU:  ./run.sh zh-en "打开文件"  |  ./run.sh en-zh "Open the file"  |  ./run.sh
# Measure it:  ./run.sh --bench [N] [zh-en|en-zh TEXT]   (N more translations, default {BENCH_RUNS}: the mean time per
# token, rknn_run and the runner's own work apart)
# librknnrt.so must be version {TOOLKIT_VERSION} (the rknn-toolkit2 that built the .rknn files); the runner loads it
# from RKNN_LIB (its folder) when set, else from the library path (/usr/lib, ...), then /oem/usr/lib.
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
bench=""
if [ "${{1-}}" = "--bench" ]; then
  shift
  case "${{1-}}" in
    ''|*[!0-9]*) bench="--bench {BENCH_RUNS}" ;;
    *) bench="--bench $1"; shift ;;
  esac
fi
translate() {{
  "$HERE/{RUNNER}" --backend rknn --direction "$1" --max_tokens {meta.Tc} $bench \\
    "$HERE/encoder.rknn" "$HERE/decoder.rknn" "$HERE/tokenizer.bin" "$HERE/embed.bin" "$2"
}}
case "$#" in
  0) translate zh-en "{EXAMPLES['zh-en']}"; translate en-zh "{EXAMPLES['en-zh']}" ;;
  2) translate "$1" "$2" ;;
  *) echo "usage: $0 [--bench [N]] [zh-en|en-zh TEXT]" >&2; exit 2 ;;
esac
"""


def readme(meta: DeployMeta, precision: str, reason: str, files: dict[str, int], npu: dict[str, Any],
           runner_note: str, glibc: str) -> str:
    listing = "\n".join(f"| `{name}` | {size / 1024:,.0f} KB |" for name, size in files.items())
    token, encoder, sentence = npu["per_token_ms"], npu["encoder_ms"], npu["per_sentence_ms"]
    expect = (f"{token['low']:.1f}-{token['high']:.1f} ms of NPU time per output token and {encoder['low']:.1f}-"
              f"{encoder['high']:.1f} ms for the encoder, so {sentence['low']:.0f}-{sentence['high']:.0f} ms for a "
              f"{npu['tokens_per_sentence']:.0f}-token translation; about {npu['memory']['total_mb']:.0f} MB resident. "
              "This is an estimate, not a board measurement: deploy/estimate.py fits Rockchip's measured "
              "lite_transformer times (RK3576, one core) and scales them to this board's clocks and bandwidth (every "
              "figure and its source is in DIST/report.json). `./run.sh --bench` measures the real figure.")
    return f"""# rk-distill on the RV1126B

A {meta.parameters:,}-parameter zh<->en student ({meta.decoder} decoder), **{precision}** on the NPU.
Why {precision}: {reason}.
Runner: {runner_note}.
The newest C library it asks for: {glibc} (read from its ELF's version needs when this folder was made; the
board's glibc must be that or newer).

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
    ./run.sh --bench                                        # measured time per token (below)

The runner loads the board's `librknnrt.so` when it starts (from `RKNN_LIB=/its/folder` when set, else the library
path: /usr/lib, then /oem/usr/lib) and prints its API and driver versions first.
It **must be version {TOOLKIT_VERSION}**, the rknn-toolkit2 that built these .rknn files; another version fails at
load or computes wrongly. Without the library the runner stops with one line saying where to put it.

## Expected output

The translation on stdout; on stderr the runtime's versions, the source and output ids and a timing line (load,
tokenize, encoder, mean decoder step with its rknn_run and host parts, total). Sources longer than {meta.S} tokens
are refused (split the sentence); translations stop at {meta.Tc} tokens. The text matches what the simulator
produced for {precision} (DIST/report.json, `quality`), up to rounding differences between the simulator and the
NPU.

## Memory and latency to expect

{expect}

`./run.sh --bench [N]` translates each example N more times ({BENCH_RUNS} by default) and prints one line per
example: `per_token_ms` (a decoder step, all of it), `run_ms` (wall clock around `rknn_run`), `perf_run_ms` (the
runtime's own RKNN_QUERY_PERF_RUN figure, n/a where it has none), `host_ms` (the runner's work per token: embedding,
conversion to the model's types, cache shift, argmax) and the encoder's time per sentence. Please report these.
"""


def package(dist: Dist, precision: str, runner: Path | None = None, tokens: float = 0.0,
            rknn_sdk: Path | None = None, reason: str = "") -> dict[str, Any]:
    """Fill dist.board and return {"folder", "precision", "runner", "glibc", "files": {name: bytes}}.

    reason: why this precision ships, for the README (default: what DIST/report.json says, see shipped_reason).
    runner: a prebuilt aarch64 rk_translate, else one is built (linked against rknn_sdk's librknnrt.so if given).
    tokens: output tokens of a typical translation, for the README's latency estimate (0: the longest, Tc).
    The data files are written before the runner is built, so a failed build leaves a board folder that lacks only
    the runner, run.sh and README."""
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
        note = f"prebuilt {runner}"
    else:
        runner = build_runner(dist.root / "build-aarch64", rknn_sdk)
        note = f"built with RKNN_SDK={rknn_sdk}" if rknn_sdk else "built here, librknnrt.so loaded at run time"
    glibc = glibc_label(check_runner(runner))
    shutil.copy2(runner, board / RUNNER)
    (board / RUNNER).chmod((board / RUNNER).stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    (board / "run.sh").write_text(run_sh(meta))
    (board / "run.sh").chmod(0o755)
    files = {name: (board / name).stat().st_size for name in BOARD_FILES if name != "README.md"}
    npu = estimate.estimate(dist, precision, tokens)
    (board / "README.md").write_text(readme(meta, precision, reason or shipped_reason(dist, precision), files, npu,
                                            note, glibc))
    files["README.md"] = (board / "README.md").stat().st_size
    log.info("board package: %s (%s, %.0f KB, runner needs %s)", board, precision, sum(files.values()) / 1024, glibc)
    return {"folder": str(board), "precision": precision, "runner": note, "glibc": glibc, "files": files}


def shipped_reason(dist: Dist, precision: str) -> str:
    """Why `python -m deploy` shipped this precision (DIST/report.json), or that someone picked it by hand."""
    choice = json.loads(dist.report.read_text())["choice"] if dist.report.is_file() else {}
    if choice.get("precision") == precision:
        return choice["reason"]
    return (f"chosen by hand (deploy.package --precision {precision}); DIST/report.md says which precisions keep the "
            "translation")


def load_meta(dist: Dist) -> DeployMeta:
    try:
        return DeployMeta.load(dist.meta)
    except ContractError as exc:
        raise PackageError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dist", type=Path, required=True, help="deploy output folder (onnx/, rknn/, tokenizer/)")
    parser.add_argument("--precision", default=None,
                        help="which rknn/<precision>/ to ship (default: the one python -m deploy chose)")
    parser.add_argument("--runner", type=Path, default=None,
                        help="prebuilt aarch64 rk_translate (default: build it with CMake and zig, or CROSS_COMPILE's "
                             "gcc)")
    parser.add_argument("--rknn_sdk", type=Path, default=None,
                        help=f"Rockchip RKNN runtime folder (rknn_api.h, aarch64 librknnrt.so {TOOLKIT_VERSION}) to "
                             "link the runner against (default: none, the runner loads the board's librknnrt.so)")
    parser.add_argument("--tokens", type=float, default=0.0,
                        help="output tokens of a typical translation, for the README's estimate (default: Tc)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    dist = Dist(args.dist.resolve())
    try:
        result = package(dist, args.precision or default_precision(dist), args.runner, args.tokens, args.rknn_sdk)
    except (PackageError, ContractError) as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
