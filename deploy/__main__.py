"""Student folder -> RV1126B board package, every step in one command, with a report of what each step measured.

    python -m deploy --model RUN/final --target rv1126b --calib data/catalogs/valid.jsonl \\
        --test data/catalogs/test.jsonl --out dist/rv1126b [--precision auto] [--limit 100]

 1. export      encoder/decoder ONNX, embed.bin, parity with torch, calibration rows, onnxruntime int8
 2. RKNN venv   created with deploy/setup_rknn_env.sh when missing
 3. convert     every precision to .rknn in the RKNN venv, each checked in the simulator (rknn_report.json)
 4. evaluate    BLEU/chrF on --limit test pairs, both directions: torch, onnx, onnx-int8, each precision simulated
 5. host cost   ONNX on one CPU thread: ms/sentence and peak RSS, in a process that loads nothing else
 6. choose      --precision auto: the smallest .rknn within 1 BLEU of torch in both directions
 7. package     DIST/board/ (deploy/package.py), then the NPU time/memory estimate (deploy/estimate.py)
Writes DIST/report.json (everything) and DIST/report.md (a summary with a table).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

import data
from config import DIRECTIONS
from deploy import estimate, export_onnx, package
from deploy.convert_rknn import PRECISIONS, QUANT_ALGORITHMS, W4A16_TARGETS
from inference import backends
from inference.backends import Dist
from inference.evaluate import evaluate
from inference.translator import InputTooLongError, Translator

log = logging.getLogger("deploy")

REPO = Path(__file__).resolve().parents[1]
BLEU_TOLERANCE = 1.0  # --precision auto accepts a precision this close to torch's BLEU in every direction
N_STEPS = 7


class DeployError(RuntimeError):
    """A step failed; the message names it and what to do."""


def step(number: int, what: str) -> None:
    log.info("[%d/%d] %s", number, N_STEPS, what)


def precisions_for(arg: str, target: str) -> list[str]:
    """`auto` = every precision the target supports; otherwise a comma-separated list."""
    if arg == "auto":
        return [p for p in PRECISIONS if p != "w4a16" or target in W4A16_TARGETS]
    names = list(dict.fromkeys(p.strip() for p in arg.split(",") if p.strip()))
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown or not names:
        raise DeployError(f"--precision {arg!r}: choose auto or from {', '.join(PRECISIONS)} (comma-separated)")
    return names


# --------------------------------------------------------------------------- steps 2-3: the RKNN venv


def ensure_rknn_env(python: Path) -> None:
    if (python.parent.parent / ".rknn-setup-done").is_file():
        return
    log.info("creating the RKNN venv with deploy/setup_rknn_env.sh (a minute or two)")
    done = subprocess.run(["bash", str(REPO / "deploy" / "setup_rknn_env.sh"), str(python.parent.parent)])
    if done.returncode != 0:
        raise DeployError("deploy/setup_rknn_env.sh failed (messages above); fix it, then run deploy again")


def convert(python: Path, dist: Dist, precisions: Sequence[str], target: str, quant_algorithm: str) -> dict:
    command = [str(python), str(REPO / "deploy" / "convert_rknn.py"), "--onnx_dir", str(dist.onnx),
               "--calib", str(dist.calib), "--eval", str(dist.eval), "--precision", ",".join(precisions),
               "--target", target, "--quant_algorithm", quant_algorithm, "--out", str(dist.rknn)]
    if subprocess.run(command).returncode != 0:
        raise DeployError("RKNN conversion failed (the converter's message is above)")
    return json.loads(dist.rknn_report.read_text())


# --------------------------------------------------------------------------- steps 4-5: quality and host cost


def evaluate_backend(translator: Translator, pairs: list[data.Pair], directions: Sequence[str]) -> dict:
    results = {}
    for direction in directions:
        result = evaluate(translator, pairs, direction)
        log.info("  %-14s %s: BLEU %.2f chrF %.2f (n=%d, %.1f ms/sentence)", translator.backend, direction,
                 result["bleu"], result["chrf"], result["n"], result["ms_per_sentence"])
        results[direction] = result
    return results


def evaluate_all(model: Path, dist: Dist, pairs: list[data.Pair], precisions: Sequence[str],
                 directions: Sequence[str]) -> dict[str, dict]:
    """BLEU/chrF per backend and direction: torch on the student folder, the rest on DIST."""
    quality = {"torch": evaluate_backend(Translator(model), pairs, directions)}
    for backend in ["onnx", "onnx-int8", *(f"rknn-sim:{p}" for p in precisions)]:
        translator = Translator(dist.root, backend=backend)
        try:
            quality[backend] = evaluate_backend(translator, pairs, directions)
        finally:
            translator.decoder.close()
    return quality


def host_requests(translator: Translator, pairs: list[data.Pair], directions: Sequence[str]) -> dict:
    """Student ids of every test source that fits, in both directions, as inference/backends.py reads them."""
    sources, direction_ids = [], []
    for direction in directions:
        for pair in pairs:
            try:
                sources.append(translator.source_ids(pair.side(direction.split("-")[0])))
            except InputTooLongError:
                continue
            direction_ids.append(data.direction_index(direction))
    return {"sources": sources, "directions": direction_ids}


def host_cost(dist: Dist, requests: dict) -> dict[str, dict]:
    """ms/sentence and peak RSS of the ONNX paths on one CPU thread, each in a fresh numpy+onnxruntime process."""
    costs = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(requests, handle)
        handle.flush()
        for backend in ("onnx", "onnx-int8"):
            command = [sys.executable, str(REPO / "inference" / "backends.py"), "--dist", str(dist.root),
                       "--backend", backend, "--requests", handle.name, "--threads", "1"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise DeployError(f"timing {backend} failed: {done.stderr.strip()[-500:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            costs[backend] = {k: result[k] for k in ("threads", "n", "ms_per_sentence", "peak_rss_mb")}
            log.info("  %-9s %.2f ms/sentence on 1 thread, peak RSS %.0f MB", backend, result["ms_per_sentence"],
                     result["peak_rss_mb"])
    return costs


# --------------------------------------------------------------------------- step 6: the choice


def rknn_sizes(rknn_report: dict) -> dict[str, int]:
    return {p: sum(g["size_bytes"] for g in graphs.values()) for p, graphs in rknn_report["precisions"].items()}


def choose_precision(quality: dict[str, dict], sizes: dict[str, int], directions: Sequence[str]) -> dict[str, Any]:
    """The smallest precision within BLEU_TOLERANCE of torch in every direction, else the best by mean BLEU."""
    reference = {d: quality["torch"][d]["bleu"] for d in directions}

    def bleus(precision: str) -> dict[str, float]:
        return {d: quality[f"rknn-sim:{precision}"][d]["bleu"] for d in directions}

    def describe(precision: str) -> str:
        backend = quality[f"rknn-sim:{precision}"]
        return ", ".join(f"{d} BLEU {backend[d]['bleu']:.2f} vs {reference[d]:.2f}, chrF {backend[d]['chrf']:.2f} vs "
                         f"{quality['torch'][d]['chrf']:.2f}" for d in directions)

    within = [p for p in sizes if all(bleus(p)[d] >= reference[d] - BLEU_TOLERANCE for d in directions)]
    if within:
        chosen = min(within, key=lambda p: sizes[p])
        others = ", ".join(f"{p} {sizes[p] / 1024:.0f} KB" for p in within if p != chosen) or "none"
        reason = (f"{chosen} is the smallest .rknn pair ({sizes[chosen] / 1024:.0f} KB) within {BLEU_TOLERANCE} BLEU "
                  f"of torch fp32 in both directions ({describe(chosen)}); also within: {others}")
    else:
        chosen = max(sizes, key=lambda p: sum(bleus(p).values()))
        reason = (f"no precision is within {BLEU_TOLERANCE} BLEU of torch fp32; {chosen} has the best mean BLEU "
                  f"({describe(chosen)}); consider hybrid, --quant_algorithm mmse, or more calibration data")
    if min(reference.values()) < BLEU_TOLERANCE:
        reason += (f"; note: torch itself scores below {BLEU_TOLERANCE} BLEU, so the BLEU rule cannot tell the "
                   "precisions apart here: compare their chrF")
    return {"precision": chosen, "reason": reason, "tolerance_bleu": BLEU_TOLERANCE,
            "candidates": {p: {"size_bytes": sizes[p], "bleu": bleus(p)} for p in sizes}}


def mean_target_tokens(translator: Translator, pairs: list[data.Pair], directions: Sequence[str]) -> float:
    """Average output length in decoder steps (reference tokens + eos), for the per-sentence latency estimate."""
    lengths = [len(translator.builder.student_ids(p.side(d.split("-")[1]))) + 1 for d in directions for p in pairs]
    return min(translator.max_target_len, sum(lengths) / max(1, len(lengths)))


# --------------------------------------------------------------------------- the report


def file_sizes(dist: Dist) -> dict[str, int]:
    files = [*dist.onnx.glob("*.onnx"), dist.embed, *dist.int8.glob("*.onnx"), *dist.rknn.glob("*/*.rknn"),
             *(dist.board.glob("*") if dist.board.is_dir() else [])]
    return {str(p.relative_to(dist.root)): p.stat().st_size for p in files if p.is_file()}


def rknn_summary(rknn_report: dict) -> dict[str, dict]:
    """Per precision and graph: size, build time, per-output cosine and diff, op placement and CPU fallbacks,
    I/O dtypes."""
    keep = ("size_bytes", "build_seconds", "outputs", "cpu_ops", "placement", "io_dtypes", "worst_layers")
    return {p: {g: {k: info[k] for k in keep} for g, info in graphs.items()}
            for p, graphs in rknn_report["precisions"].items()}


def report_markdown(report: dict[str, Any]) -> str:
    directions = report["parameters"]["directions"]
    lines = [f"# Deploy report: {report['parameters']['model']} -> {report['parameters']['target']}", "",
             f"Test pairs: first {report['parameters']['limit']} of {report['parameters']['test']} "
             f"(greedy, batch 1 for every backend but torch).", "",
             "| backend | " + " | ".join(f"{d} BLEU | {d} chrF" for d in directions) + " | size KB |",
             "|---|" + "---|---|" * len(directions) + "---|"]
    sizes = report["sizes"]
    for backend, per_direction in report["quality"].items():
        size = sizes.get(backend)
        cells = " | ".join(f"{per_direction[d]['bleu']:.2f} | {per_direction[d]['chrf']:.2f}" for d in directions)
        lines.append(f"| {backend} | {cells} | {size / 1024:.0f} |" if size else f"| {backend} | {cells} | |")
    parity, host, est = report["parity"]["onnx"], report["host_cpu"]["onnx"], report["estimate"]
    lines += ["", f"**Chosen precision: {report['choice']['precision']}** - {report['choice']['reason']}.", "",
              f"- ONNX parity with torch: max |logit diff| {parity['max_abs_diff_logits']:.2e}, greedy identical on "
              f"{parity['greedy_identical']}/{parity['greedy_total']} sentences.",
              f"- ONNX on one CPU thread: {host['ms_per_sentence']:.1f} ms/sentence, peak RSS "
              f"{host['peak_rss_mb']:.0f} MB.",
              "- NPU estimate, " + estimate.summary(est).replace("\n", "; ") + ".",
              f"- Board package: {report['board'].get('folder', report['board'].get('error'))}", ""]
    return "\n".join(lines)


def backend_sizes(dist: Dist, rknn_report: dict) -> dict[str, int]:
    """Bytes of the graphs each backend runs (embed.bin aside), for the report's table."""
    sizes = {"onnx": sum(p.stat().st_size for p in dist.onnx.glob("*.onnx")),
             "onnx-int8": sum(p.stat().st_size for p in dist.int8.glob("*.onnx"))}
    return {**sizes, **{f"rknn-sim:{p}": size for p, size in rknn_sizes(rknn_report).items()}}


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="student folder (RUN/final)")
    parser.add_argument("--target", default="rv1126b", help="RKNN target platform (default rv1126b)")
    parser.add_argument("--calib", type=Path, default=Path("data/catalogs/valid.jsonl"),
                        help="pairs for RKNN calibration rows (default data/catalogs/valid.jsonl)")
    parser.add_argument("--test", type=Path, default=Path("data/catalogs/test.jsonl"),
                        help="pairs for parity and BLEU/chrF (default data/catalogs/test.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="output folder DIST (onnx/, rknn/, board/, report)")
    parser.add_argument("--precision", default="auto",
                        help=f"auto (every precision the target supports, then choose) or a comma-separated "
                             f"subset of {', '.join(PRECISIONS)}; with several, the choice follows the auto rule")
    parser.add_argument("--quant_algorithm", default="normal", choices=QUANT_ALGORITHMS,
                        help="RKNN calibration algorithm for quantized precisions (default normal)")
    parser.add_argument("--limit", type=int, default=100,
                        help="test pairs to score per direction (default 100; the simulator takes ~1 s a sentence)")
    parser.add_argument("--max_source_len", type=int, default=0,
                        help="static source length of the graphs (default 0: the model's max_source_len)")
    parser.add_argument("--runner", type=Path, default=None,
                        help="a prebuilt aarch64 rk_translate (default: build it with CMake and zig, or "
                             "CROSS_COMPILE's gcc; see deploy/package.py)")
    parser.add_argument("--rknn_sdk", type=Path, default=None,
                        help="Rockchip RKNN runtime folder (rknn_api.h, aarch64 librknnrt.so) to link the runner "
                             "against (default: none; the runner loads the board's librknnrt.so at run time)")
    parser.add_argument("--rknn_python", type=Path, default=backends.default_rknn_python(),
                        help="the RKNN venv's python (default .venv-rknn/bin/python; created when missing)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Steps 1-6; returns the report without its board section."""
    dist = Dist(args.out.resolve())
    precisions = precisions_for(args.precision, args.target)
    directions = list(DIRECTIONS)
    started = time.perf_counter()

    step(1, f"export {args.model} to {dist.onnx}")
    parity = export_onnx.export(export_onnx.ExportOptions(args.model, dist.onnx, args.max_source_len,
                                                          calib=args.calib, test=args.test))
    step(2, f"RKNN venv {args.rknn_python}")
    ensure_rknn_env(args.rknn_python)
    step(3, f"convert {', '.join(precisions)} for {args.target} ({args.quant_algorithm})")
    rknn_report = convert(args.rknn_python, dist, precisions, args.target, args.quant_algorithm)

    pairs = data.read_pairs(args.test, on_bad_line="skip")[:args.limit]
    step(4, f"evaluate {len(pairs)} test pairs x {len(directions)} directions: torch, onnx, onnx-int8, "
            f"{', '.join('rknn-sim:' + p for p in precisions)}")
    quality = evaluate_all(args.model, dist, pairs, precisions, directions)

    step(5, "ONNX on one CPU thread: ms/sentence and peak RSS")
    onnx_translator = Translator(dist.root, backend="onnx")
    host = host_cost(dist, host_requests(onnx_translator, pairs, directions))

    step(6, "choose the precision")
    choice = choose_precision(quality, rknn_sizes(rknn_report), directions)
    log.info("  chosen %s: %s", choice["precision"], choice["reason"])

    parameters = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "precisions": precisions, "directions": directions,
                  "meta": json.loads(dist.meta.read_text()), "toolkit_version": rknn_report["toolkit_version"]}
    return {"parameters": parameters, "parity": parity, "rknn": rknn_summary(rknn_report), "quality": quality,
            "host_cpu": host, "choice": choice, "sizes": backend_sizes(dist, rknn_report),
            "tokens_per_sentence": mean_target_tokens(onnx_translator, pairs, directions),
            "seconds": round(time.perf_counter() - started, 1)}


def add_estimates(dist: Dist, report: dict[str, Any]) -> None:
    """NPU time and board memory for every built precision; after packaging so tokenizer.bin counts."""
    tokens, chosen = report["tokens_per_sentence"], report["choice"]["precision"]
    report["estimates_all_precisions"] = {p: estimate.estimate(dist, p, tokens) for p in report["rknn"]}
    report["estimate"] = report["estimates_all_precisions"][chosen]
    log.info("  NPU estimate %s", estimate.summary(report["estimate"]).replace("\n", "\n  "))


def write_report(dist: Dist, report: dict[str, Any]) -> None:
    report["files"] = file_sizes(dist)
    dist.report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (dist.root / "report.md").write_text(report_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    export_onnx.configure_logging()
    torch.set_num_threads(1)  # batch-1 decoding of a small model: more threads only stall on a busy host
    try:
        report = run(args)
    except (DeployError, export_onnx.ExportError, backends.BackendError, data.CorpusError,
            data.VocabMismatchError) as exc:
        log.error("%s", exc)
        return 2
    dist = Dist(args.out.resolve())
    step(7, f"package {dist.board}")
    try:
        report["board"] = package.package(dist, report["choice"]["precision"], args.runner,
                                          report["tokens_per_sentence"], args.rknn_sdk)
    except package.PackageError as exc:
        report["board"] = {"error": str(exc)}
    add_estimates(dist, report)
    write_report(dist, report)
    if "error" in report["board"]:
        log.error("%s (report written: %s)", report["board"]["error"], dist.report)
        return 2
    log.info("done in %.0f s: %s, %s", report["seconds"], dist.report, dist.root / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
