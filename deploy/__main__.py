"""Student folder -> RV1126B board package, every step in one command, with a report of what each step measured.

    python -m deploy --model RUN/final --target rv1126b --calib data/labels/valid.jsonl \\
        --test data/labels/test.jsonl --out dist/rv1126b [--precision auto] [--limit 100]

 0. check       --model, --calib and --test, before anything loads (one line naming the flag when one is wrong)
 1. export      encoder/decoder ONNX, embed.bin, parity with torch, calibration rows, onnxruntime int8
 2. RKNN venv   created with deploy/setup_rknn_env.sh when missing
 3. convert     every precision to .rknn in the RKNN venv, each checked in the simulator (rknn_report.json)
 4. evaluate    on the first --limit --test pairs that share no side with a --calib pair, both directions: BLEU/chrF of
                torch, onnx, onnx-int8 and each precision in the simulator, which also checks every sentence against
                fp32 onnxruntime (graph output cosines, teacher-forced token agreement: deploy/rknn_sim_eval.py)
 5. host cost   ONNX on one CPU thread: ms/sentence and peak RSS, in a process that loads nothing else
                (deploy/host_cost.py)
 6. choose      the precisions that keep the translation (QUALIFY below); the fastest of them by the NPU estimate
                (deploy/estimate.py) ships; fp16 when none does
 7. package     DIST/board/ (deploy/package.py), then the NPU time/memory estimate of every precision
Writes DIST/report.json (everything) and DIST/report.md (the per-precision table and why the shipped one won).

QUALIFY: a precision keeps the translation when, on those test sentences, (i) each graph's output cosine to fp32
onnxruntime is at least MIN_COSINE (a graph's worst output, averaged over every call), (ii) its argmax agrees with
fp32's greedy token on at least MIN_AGREEMENT of the steps, teacher-forced along fp32's path (so one early flip counts
once, not for every later step), (iii) BLEU and chrF are each within MAX_SCORE_DELTA points of fp32 (the onnx backend:
the same graphs at batch 1) in both directions, either way, and (iv) its 0/1 mask inputs come back exactly from int8.
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

import corpus
import data
import vocabulary
from config import DIRECTIONS
from deploy import contract, estimate, export_onnx, package
from deploy.contract import Dist
from deploy.convert_rknn import PRECISIONS, QUANT_ALGORITHMS, W4A16_TARGETS
from inference import backends
from inference.evaluate import evaluate
from inference.translator import InputTooLongError, Translator

log = logging.getLogger("deploy")

REPO = Path(__file__).resolve().parents[1]
N_STEPS = 7
MIN_COSINE = 0.99
MIN_AGREEMENT = 0.98
MAX_SCORE_DELTA = 1.0  # BLEU and chrF points
REFERENCE = "onnx"  # fp32: the exported graphs in onnxruntime, batch 1, the simulator's own reference
STUDENT_FILES = ("config.json", "model.safetensors", "vocab_map.json", "tokenizer.json", "tokenizer_config.json")
PAIR_SUFFIXES = (".jsonl", ".tsv")


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


# --------------------------------------------------------------------------- step 0: the inputs


def check_model(folder: Path) -> None:
    """--model is a student folder as train_ds.py exports one."""
    expected = ("expected a student folder (RUN/final, as train_ds.py exports it) with " + ", ".join(STUDENT_FILES)
                + "; config.json's model_type rk_student")
    if not folder.is_dir():
        raise DeployError(f"--model {folder}: {'not a folder' if folder.exists() else 'does not exist'}; {expected}")
    missing = [name for name in STUDENT_FILES if not (folder / name).is_file()]
    if missing:
        raise DeployError(f"--model {folder}: no {', '.join(missing)}; {expected}")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise DeployError(f"--model {folder}: config.json cannot be read as JSON ({exc}); {expected}") from exc
    if model_type != "rk_student":
        raise DeployError(f"--model {folder}: config.json's model_type is {model_type!r}, not 'rk_student' (a teacher "
                          f"or another model); {expected}")


def check_pairs(flag: str, path: Path) -> None:
    """--calib / --test is a readable .jsonl or .tsv file holding at least one zh/en pair."""
    expected = "expected a .jsonl or .tsv file of zh/en pairs"
    if not path.is_file():
        what = "a folder" if path.is_dir() else "does not exist"
        hint = (" (build the corpus: python -m scripts.build_corpus --out data/catalogs --labels data/labels)"
                if not path.exists() and path.parts[:1] == ("data",) else "")
        raise DeployError(f"{flag} {path}: {what}; {expected}{hint}")
    if path.suffix not in PAIR_SUFFIXES:
        raise DeployError(f"{flag} {path}: a {path.suffix or 'suffix-less'} file; {expected}")
    try:
        pairs = corpus.read_pairs(path, on_bad_line="skip")
    except (OSError, UnicodeDecodeError, corpus.CorpusError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeployError(f"{flag} {path}: cannot be read ({reason}); {expected}") from exc
    if not pairs:
        raise DeployError(f"{flag} {path}: holds no zh/en pair; {expected}")


def check_inputs(args: argparse.Namespace) -> None:
    check_model(args.model)
    check_pairs("--calib", args.calib)
    check_pairs("--test", args.test)


# --------------------------------------------------------------------------- steps 2-3: the RKNN venv


def ensure_rknn_env(python: Path) -> None:
    if (python.parent.parent / ".rknn-setup-done").is_file():
        return
    log.info("creating the RKNN venv with deploy/setup_rknn_env.sh (a minute or two)")
    done = subprocess.run(["bash", str(REPO / "deploy" / "setup_rknn_env.sh"), str(python.parent.parent)])
    if done.returncode != 0:
        raise DeployError("deploy/setup_rknn_env.sh failed (messages above); fix it, then run deploy again")


def convert(python: Path, dist: Dist, precisions: Sequence[str], target: str, quant_algorithm: str) -> dict:
    # Run from the repository root, as every entry point is, so every path in it is absolute (dist's already are).
    command = [str(python.absolute()), "-m", "deploy.convert_rknn", "--onnx_dir", str(dist.onnx),
               "--calib", str(dist.calib), "--eval", str(dist.eval), "--precision", ",".join(precisions),
               "--target", target, "--quant_algorithm", quant_algorithm, "--out", str(dist.rknn)]
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise DeployError("RKNN conversion failed (the converter's message is above)")
    return json.loads(dist.rknn_report.read_text())


# --------------------------------------------------------------------------- steps 4-5: quality and host cost


def evaluate_backend(translator: Translator, pairs: list[corpus.Pair], directions: Sequence[str]) -> dict:
    results = {}
    for direction in directions:
        result = evaluate(translator, pairs, direction)
        log.info("  %-14s %s: BLEU %.2f chrF %.2f (n=%d, %.1f ms/sentence)", translator.backend, direction,
                 result["bleu"], result["chrf"], result["n"], result["ms_per_sentence"])
        results[direction] = result
    return results


def evaluate_all(model: Path, dist: Dist, pairs: list[corpus.Pair], precisions: Sequence[str],
                 directions: Sequence[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """BLEU/chrF per backend and direction (torch on the student folder, the rest on DIST), and per precision the
    simulator's fidelity to fp32 onnxruntime on the same sentences (contract.fidelity), both directions pooled."""
    quality = {"torch": evaluate_backend(Translator(model), pairs, directions)}
    fidelity = {}
    for backend in ["onnx", "onnx-int8", *(f"rknn-sim:{p}" for p in precisions)]:
        translator = Translator(dist.root, backend=backend)
        try:
            quality[backend] = evaluate_backend(translator, pairs, directions)
            if isinstance(translator.decoder, backends.RknnSimDecoder):
                fidelity[backend.partition(":")[2]] = contract.fidelity(translator.decoder.take_checks())
        finally:
            translator.decoder.close()
    return quality, fidelity


def host_requests(translator: Translator, pairs: list[corpus.Pair], directions: Sequence[str]) -> dict:
    """Student ids of every test source that fits, in both directions, as deploy/host_cost.py reads them."""
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
            command = [sys.executable, "-m", "deploy.host_cost", "--dist", str(dist.root),
                       "--backend", backend, "--requests", handle.name, "--threads", "1"]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
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


def failed_criteria(fidelity: dict[str, Any], scores: dict[str, dict[str, float]],
                    masks: dict[str, dict[str, Any]]) -> list[str]:
    """What keeps a precision from qualifying (QUALIFY in the module docstring), as short phrases; [] = qualifies."""
    failed = [f"{graph} cosine {g['cosine']:.4f} < {MIN_COSINE}" for graph, g in fidelity["graphs"].items()
              if not g["cosine"] >= MIN_COSINE]
    if not fidelity["agreement"] >= MIN_AGREEMENT:
        failed.append(f"token agreement {100 * fidelity['agreement']:.1f}% < {100 * MIN_AGREEMENT:.0f}%")
    for direction, s in scores.items():
        for metric in ("bleu", "chrf"):
            if abs(s[f"delta_{metric}"]) > MAX_SCORE_DELTA:
                failed.append(f"{direction} {'BLEU' if metric == 'bleu' else 'chrF'} {s[metric]:.2f} vs fp32 "
                              f"{s[metric] - s[f'delta_{metric}']:.2f}")
    failed += [f"{name} loses 0/1 in int8 (scale {m['scale']:.4g}, zero point {m['zero_point']})"
               for name, m in masks.items() if not m["exact"]]
    return failed


def precision_table(rknn_report: dict, quality: dict[str, dict], fidelity: dict[str, dict],
                    estimates: dict[str, dict], directions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per precision what report.md's table prints: size, cosine per graph, token agreement, BLEU/chrF per direction
    against fp32, the NPU estimate, and whether it qualifies (else the criteria it fails)."""
    table = {}
    for precision, graphs in rknn_report["precisions"].items():
        sim, ref = quality[f"rknn-sim:{precision}"], quality[REFERENCE]
        scores = {d: {"bleu": sim[d]["bleu"], "chrf": sim[d]["chrf"],
                      "delta_bleu": round(sim[d]["bleu"] - ref[d]["bleu"], 2),
                      "delta_chrf": round(sim[d]["chrf"] - ref[d]["chrf"], 2)} for d in directions}
        masks = {name: m for g in graphs.values() for name, m in g.get("masks", {}).items()}
        failed = failed_criteria(fidelity[precision], scores, masks)
        table[precision] = {"size_bytes": sum(g["size_bytes"] for g in graphs.values()),
                            "sha256": {name: g["sha256"] for name, g in graphs.items()},
                            "cosine": {name: g["cosine"] for name, g in fidelity[precision]["graphs"].items()},
                            "agreement": fidelity[precision]["agreement"], "steps": fidelity[precision]["steps"],
                            "scores": scores, "masks": masks,
                            "per_token_ms": estimates[precision]["per_token_ms"],
                            "per_sentence_ms": estimates[precision]["per_sentence_ms"],
                            "qualifies": not failed, "failed": failed}
    return table


def span(ms: dict[str, float]) -> str:
    """An estimate's range, low-high."""
    return f"{ms['low']:.2f}-{ms['high']:.2f}"


def choose_precision(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fastest qualifying precision by the estimate's high end (what a user can count on), else fp16, else
    (fp16 not built) the one with the best token agreement; with one sentence saying why."""
    qualifying = [p for p, row in table.items() if row["qualifies"]]

    def sentence_ms(p: str) -> tuple[float, float]:
        return table[p]["per_sentence_ms"]["high"], table[p]["per_sentence_ms"]["low"]

    def failures(names: Sequence[str]) -> str:
        return "; ".join(f"{p}: {', '.join(table[p]['failed'])}" for p in names)

    if qualifying:
        chosen = min(qualifying, key=sentence_ms)
        others = [p for p in qualifying if p != chosen]
        slower = "".join(f"; {p} {span(table[p]['per_sentence_ms'])} ms" for p in others)
        reason = (f"{chosen} keeps the translation (cosine >= {MIN_COSINE}, token agreement "
                  f"{100 * table[chosen]['agreement']:.1f}%, BLEU/chrF within {MAX_SCORE_DELTA:g} of fp32) and is "
                  f"{'the fastest of those that do' if others else 'the only one that does'} by the NPU estimate "
                  f"({span(table[chosen]['per_sentence_ms'])} ms a sentence{slower})")
        rejected = [p for p in table if p not in qualifying]
        if rejected:
            reason += f"; not qualifying: {failures(rejected)}"
    elif "fp16" in table:
        chosen = "fp16"
        reason = (f"no precision keeps the translation ({failures(list(table))}), so fp16, the toolkit's float type, "
                  "ships as the rule's fallback; look at rknn/rknn_report.json (worst layers) before trusting it")
    else:
        chosen = max(table, key=lambda p: table[p]["agreement"])
        reason = (f"no precision keeps the translation ({failures(list(table))}) and fp16 was not built: {chosen} has "
                  "the best token agreement; run deploy again with fp16 in --precision")
    return {"precision": chosen, "reason": reason, "qualifying": qualifying,
            "rule": {"min_cosine": MIN_COSINE, "min_agreement": MIN_AGREEMENT, "max_score_delta": MAX_SCORE_DELTA,
                     "reference": REFERENCE, "fastest_by": "estimated ms per sentence, high end"}}


def mean_target_tokens(translator: Translator, pairs: list[corpus.Pair], directions: Sequence[str]) -> float:
    """Average output length in decoder steps (reference tokens + eos), for the per-sentence latency estimate."""
    lengths = [len(translator.builder.student_ids(p.side(d.split("-")[1]))) + 1 for d in directions for p in pairs]
    return min(translator.max_target_len, sum(lengths) / max(1, len(lengths)))


# --------------------------------------------------------------------------- the report


def file_sizes(dist: Dist) -> dict[str, int]:
    files = [*dist.onnx.glob("*.onnx"), dist.embed, *dist.int8.glob("*.onnx"), *dist.rknn.glob("*/*.rknn"),
             *(dist.board.glob("*") if dist.board.is_dir() else [])]
    return {str(p.relative_to(dist.root)): p.stat().st_size for p in files if p.is_file()}


def rknn_summary(rknn_report: dict) -> dict[str, dict]:
    """Per precision and graph: size and sha256, build time, per-output cosine and diff on the converter's eval rows,
    op placement and dtypes, CPU fallbacks, I/O dtypes, mask quantization, float16 layers, worst layers."""
    keep = ("size_bytes", "sha256", "build_seconds", "outputs", "cpu_ops", "placement", "layer_dtypes", "io_dtypes",
            "masks", "float16_layers", "worst_layers")
    return {p: {g: {k: info[k] for k in keep if k in info} for g, info in graphs.items()}
            for p, graphs in rknn_report["precisions"].items()}


def signed(value: float) -> str:
    return f"{value:+.2f}"


def precision_rows(report: dict[str, Any]) -> list[str]:
    """report.md's per-precision table, fp32 first as the reference."""
    directions = report["parameters"]["directions"]
    table, reference = report["precisions"], report["quality"][REFERENCE]
    head = ["precision", "size KB", "encoder cos", "decoder cos", "token agreement",
            *(f"{d} {m}" for d in directions for m in ("BLEU", "chrF")), "NPU ms/token (estimate)", "qualifies"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|",
            "| fp32 (onnx) | " + f"{report['sizes'][REFERENCE] / 1024:.0f} | 1 | 1 | 100% | "
            + " | ".join(f"{reference[d][m]:.2f}" for d in directions for m in ("bleu", "chrf")) + " | | reference |"]
    for precision, row in table.items():
        scores = " | ".join(f"{row['scores'][d][m]:.2f} ({signed(row['scores'][d][f'delta_{m}'])})"
                            for d in directions for m in ("bleu", "chrf"))
        verdict = "yes" if row["qualifies"] else "no: " + "; ".join(row["failed"])
        rows.append(f"| {precision} | {row['size_bytes'] / 1024:.0f} | {row['cosine']['encoder']:.4f} | "
                    f"{row['cosine']['decoder']:.4f} | {100 * row['agreement']:.1f}% ({row['steps']} steps) | "
                    f"{scores} | {span(row['per_token_ms'])} | {verdict} |")
    return rows


def quantization_notes(report: dict[str, Any]) -> list[str]:
    """How hybrid differs from w8a8, and what int8 does to the 0/1 masks."""
    notes = []
    hybrid = report["hybrid_vs_w8a8"]
    if hybrid:
        kept = sum(g["float16_layers"] for g in hybrid["graphs"].values())
        same = ("**it came out the same as w8a8: no layer changed dtype**" if hybrid["same_as_w8a8"] else
                "every other layer stays int8; its layer dtypes differ from w8a8's")
        files = "identical" if any(g["identical_file"] for g in hybrid["graphs"].values()) else "different"
        notes.append(f"- hybrid keeps {kept} attention and normalisation layers in float16 "
                     f"(hybrid_quantization_step1/step2); {same} (files {files}, sha256 in report.json).")
    masks = {f"{p} {name}": m for p, row in report["precisions"].items() for name, m in row["masks"].items()
             if m.get("quantized")}
    if masks:
        exact = all(m["exact"] for m in masks.values())
        example = next(iter(masks.values()))
        notes.append(f"- 0/1 mask inputs in int8 ({', '.join(masks)}): scale {example['scale']:.6g}, zero point "
                     f"{example['zero_point']}: 0 and 1 come back {'exactly' if exact else 'WRONG'}.")
    return notes


def latency_rows(report: dict[str, Any]) -> list[str]:
    est = report["estimates_all_precisions"]
    tokens = report["tokens_per_sentence"]
    keys = ("per_token_ms", "encoder_ms", "per_sentence_ms", "worst_case_sentence_ms")
    rows = [f"| precision | ms/token | encoder ms | ms per sentence ({tokens:.1f} tokens) | worst case "
            f"({report['parameters']['meta']['Tc']} tokens) |", "|---|---|---|---|---|"]
    rows += [f"| {p} | " + " | ".join(span(e[k]) for k in keys) + " |" for p, e in est.items()]
    cal = next(iter(est.values()))["calibration"]
    ref = next(a for a in cal["anchors"] if a["chip"] == cal["reference_fit"]["chip"])
    rows += ["", f"{estimate.LABEL}. Model (deploy/estimate.py): blocks x {1e3 * cal['block_ms']['low']:.1f}-"
             f"{1e3 * cal['block_ms']['high']:.1f} us + max(bytes / {cal['bandwidth_gb_s']['low']:.1f}-"
             f"{cal['bandwidth_gb_s']['high']:.1f} GB/s, MACs / MAC rate), fitted to Rockchip's measured "
             f"lite_transformer on {ref['chip']} single core (encoder {ref['encoder_ms']:.2f} ms, decoder step "
             f"{ref['decoder_ms']:.2f} ms; {ref['source']}) and scaled to RV1126B's clocks and RKLLM's measured "
             "bandwidth there."]
    return rows


def report_markdown(report: dict[str, Any]) -> str:
    params, directions = report["parameters"], report["parameters"]["directions"]
    test = report["test_subset"]
    lines = [f"# Deploy report: {params['model']} -> {params['target']}", "",
             f"Test: the first {test['used']} pairs of {params['test']} that share no side with {params['calib']} "
             f"({test['dropped_for_calib_overlap']} of {test['in_file']} dropped for that), both directions, greedy, "
             "batch 1 (torch batches). Calibration rows come from --calib only.", "",
             "## Precisions in the simulator, against fp32 onnxruntime", "", *precision_rows(report), "",
             f"**Shipped: {report['choice']['precision']}.** {report['choice']['reason']}.", "",
             f"A precision qualifies when each graph's output cosine is at least {MIN_COSINE}, its greedy token agrees "
             f"with fp32's on at least {100 * MIN_AGREEMENT:.0f}% of the steps (teacher-forced along fp32's path, so "
             f"one early flip counts once), BLEU and chrF are within {MAX_SCORE_DELTA:g} point of fp32 in both "
             "directions (either way; the brackets), and its 0/1 masks survive int8. The fastest qualifying one by "
             "the NPU estimate ships; fp16 when none qualifies.", "", *quantization_notes(report), "",
             "## NPU latency on RV1126B", "", *latency_rows(report), "",
             "## Other backends", "",
             "| backend | " + " | ".join(f"{d} BLEU | {d} chrF" for d in directions) + " | size KB |",
             "|---|" + "---|---|" * len(directions) + "---|"]
    for backend in ("torch", "onnx", "onnx-int8"):
        per_direction, size = report["quality"][backend], report["sizes"].get(backend)
        cells = " | ".join(f"{per_direction[d]['bleu']:.2f} | {per_direction[d]['chrf']:.2f}" for d in directions)
        lines.append(f"| {backend} | {cells} | {size / 1024:.0f} |" if size else f"| {backend} | {cells} | |")
    parity, host = report["parity"]["onnx"], report["host_cpu"]["onnx"]
    lines += ["", f"- ONNX parity with torch: max |logit diff| {parity['max_abs_diff_logits']:.2e}, greedy identical "
              f"on {parity['greedy_identical']}/{parity['greedy_total']} sentences.",
              f"- ONNX on one CPU thread: {host['ms_per_sentence']:.1f} ms/sentence, peak RSS "
              f"{host['peak_rss_mb']:.0f} MB.",
              "- NPU estimate of the shipped precision, " + estimate.summary(report["estimate"]).replace("\n", "; ")
              + ".", f"- Board package: {report['board'].get('folder', report['board'].get('error'))}", ""]
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
    parser.add_argument("--calib", type=Path, default=export_onnx.ExportOptions.calib,
                        help=f"pairs (.jsonl/.tsv) for the RKNN calibration rows and nothing else (default "
                             f"{export_onnx.ExportOptions.calib})")
    parser.add_argument("--test", type=Path, default=export_onnx.ExportOptions.test,
                        help="pairs (.jsonl/.tsv) for parity, the precision checks and BLEU/chrF; pairs sharing a side "
                             f"with a --calib pair are left out (default {export_onnx.ExportOptions.test})")
    parser.add_argument("--out", type=Path, required=True, help="output folder DIST (onnx/, rknn/, board/, report)")
    parser.add_argument("--precision", default="auto",
                        help=f"auto (every precision the target supports, then choose) or a comma-separated "
                             f"subset of {', '.join(PRECISIONS)}; with several, the choice follows the auto rule "
                             "(the fastest that keeps the translation, else fp16)")
    parser.add_argument("--quant_algorithm", default="normal", choices=QUANT_ALGORITHMS,
                        help="RKNN calibration algorithm for quantized precisions (default normal)")
    parser.add_argument("--limit", type=int, default=100,
                        help="test pairs to check and score per direction, for every precision (default 100; the "
                             "simulator takes 20 ms to 1 s a sentence, by model size)")
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

    in_file = corpus.read_pairs(args.test, on_bad_line="skip")
    disjoint = export_onnx.calibration_disjoint(in_file, corpus.read_pairs(args.calib, on_bad_line="skip"))
    if not disjoint:
        raise DeployError(f"--test {args.test}: every pair shares a side with a --calib pair; give test pairs the "
                          "calibration has not seen (another split)")
    pairs = disjoint[:args.limit]
    step(4, f"evaluate {len(pairs)} test pairs x {len(directions)} directions: torch, onnx, onnx-int8, "
            f"{', '.join('rknn-sim:' + p for p in precisions)} (each checked against fp32)")
    quality, fidelity = evaluate_all(args.model, dist, pairs, precisions, directions)

    step(5, "ONNX on one CPU thread: ms/sentence and peak RSS")
    onnx_translator = Translator(dist.root, backend="onnx")
    host = host_cost(dist, host_requests(onnx_translator, pairs, directions))

    step(6, "choose the precision: the fastest that keeps the translation")
    tokens = mean_target_tokens(onnx_translator, pairs, directions)
    estimates = {p: estimate.estimate(dist, p, tokens) for p in rknn_report["precisions"]}
    table = precision_table(rknn_report, quality, fidelity, estimates, directions)
    for precision, row in table.items():
        log.info("  %-6s cosine enc %.4f dec %.4f, agreement %.1f%%, NPU %s/token: %s", precision,
                 row["cosine"]["encoder"], row["cosine"]["decoder"], 100 * row["agreement"],
                 span(row["per_token_ms"]) + " ms", "qualifies" if row["qualifies"] else "; ".join(row["failed"]))
    choice = choose_precision(table)
    log.info("  shipping %s: %s", choice["precision"], choice["reason"])

    parameters = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "precisions": precisions, "directions": directions,
                  "meta": json.loads(dist.meta.read_text()), "toolkit_version": rknn_report["toolkit_version"]}
    return {"parameters": parameters, "parity": parity, "rknn": rknn_summary(rknn_report),
            "hybrid_vs_w8a8": rknn_report["hybrid_vs_w8a8"], "quality": quality, "fidelity": fidelity,
            "precisions": table, "host_cpu": host, "choice": choice, "sizes": backend_sizes(dist, rknn_report),
            "test_subset": {"in_file": len(in_file), "dropped_for_calib_overlap": len(in_file) - len(disjoint),
                            "used": len(pairs)},
            "tokens_per_sentence": tokens, "seconds": round(time.perf_counter() - started, 1)}


def add_estimates(dist: Dist, report: dict[str, Any]) -> None:
    """NPU time and board memory for every built precision, again after packaging so tokenizer.bin counts."""
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
        check_inputs(args)
        report = run(args)
    except (DeployError, export_onnx.ExportError, contract.ContractError, backends.BackendError, corpus.CorpusError,
            vocabulary.VocabMismatchError) as exc:
        log.error("%s", exc)
        return 2
    dist = Dist(args.out.resolve())
    step(7, f"package {dist.board}")
    try:
        report["board"] = package.package(dist, report["choice"]["precision"], args.runner,
                                          report["tokens_per_sentence"], args.rknn_sdk, report["choice"]["reason"])
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
