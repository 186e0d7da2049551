"""The run report a person reads: one Markdown page with a results table, plots and example translations.

    python -m inference.report --run runs/quickstart [--dist runs/quickstart/dist/rv1126b]

Reads only the run's own files: RUN/eval.json (teacher and student scores from `inference.evaluate` on the label
test subset and on the full test split; see read_eval),
RUN/{sft,distill}/metrics.jsonl (losses and evaluations logged by train_ds.py), the model folders' sizes,
and DIST/report.json (ONNX and RKNN figures from `python -m deploy`). Writes RUN/report.md and RUN/*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DIRECTIONS = ("zh-en", "en-zh")


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(step entries, eval entries); a resumed run appends, so the last entry of each step wins."""
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            (evals if entry.get("eval") else steps)[entry["step"]] = entry
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def plot(run: Path, stages: dict[str, Path]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    fig, (loss_ax, bleu_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, folder in stages.items():
        steps, evals = read_metrics(folder / "metrics.jsonl")
        if steps:
            loss_ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label=f"{name} train", alpha=0.6)
        if evals:
            loss_ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label=f"{name} validation")
            bleu_ax.plot([e["step"] for e in evals], [e["bleu"] for e in evals], "o-", label=name)
    loss_ax.set(title="loss", xlabel="step")
    bleu_ax.set(title="validation BLEU (greedy, mean of directions)", xlabel="step")
    for ax in (loss_ax, bleu_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "training.png", dpi=100)
    plt.close(fig)
    written.append("training.png")
    return written


def size_mb(path: Path) -> float:
    return path.stat().st_size / 2 ** 20 if path.is_file() else float("nan")


SUBSETS = ("labels", "full")  # RUN/eval.json: the short-label test subset the demo trains for, and the whole split
SCALE_NOTE = ("For scale, not measured here: Mozilla's distilled on-device zh-en students (about 43M parameters, int8) "
              "score 27.6 BLEU zh-en and 38.8 en-zh on the Flores test (firefox-translations-models), distilled from "
              "large teachers on tens of millions of sentence pairs on GPUs; that is the kind of run a real Qwen "
              "teacher is for.")


def read_eval(run: Path) -> dict:
    """RUN/eval.json: {"splits": {subset: test file}, "scores": {subset: {"<stage>.<direction>": result}}}, where
    each result is what inference.evaluate --json printed."""
    return json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {"scores": {}}


def table_rows(run: Path, dist: Path | None) -> list[list[str]]:
    evaluations = read_eval(run)["scores"]
    rows = []
    for stage, label in (("sft", "teacher (fine-tuned)"), ("distill", "student (PyTorch)")):
        scores = [evaluations.get(subset, {}).get(f"{stage}.{d}") for subset in SUBSETS for d in DIRECTIONS]
        if not any(scores):
            continue
        params = next(s["params"] for s in scores if s)
        ms = sum(s["ms_per_sentence"] for s in scores[:2] if s) / max(1, len([s for s in scores[:2] if s]))
        rows.append([label, f"{params:,}", f"{size_mb(run / stage / 'final' / 'model.safetensors'):.2f}",
                     *[f"{s['bleu']:.2f} / {s['chrf']:.2f}" if s else "-" for s in scores], f"{ms:.2f}"])
    if dist and (dist / "report.json").is_file():
        deployed = json.loads((dist / "report.json").read_text())
        chosen = deployed["choice"]["precision"]
        params = deployed["quality"]["torch"]["zh-en"]["params"]
        for backend, label in (("onnx", "ONNX fp32"), ("onnx-int8", "ONNX int8 (CPU)"),
                               ("rknn-sim:w8a8", "RKNN int8 (simulator)"),
                               (f"rknn-sim:{chosen}", f"RKNN {chosen}, shipped (simulator)")):
            scores = deployed["quality"].get(backend)
            if not scores or (backend == "rknn-sim:w8a8" and chosen == "w8a8" and label.startswith("RKNN int8")):
                continue
            ms = sum(scores[d]["ms_per_sentence"] for d in DIRECTIONS) / 2
            rows.append([label, f"{params:,}", f"{deployed['sizes'][backend] / 2 ** 20:.2f}",
                         *[f"{scores[d]['bleu']:.2f} / {scores[d]['chrf']:.2f}" for d in DIRECTIONS], "-", "-",
                         f"{ms:.2f}"])
    return rows


def example_table(evaluations: dict, subset: str, direction: str, pick) -> list[str]:
    """Reference, teacher and student side by side for the student's examples that `pick` keeps."""
    student = pick(evaluations.get(subset, {}).get(f"distill.{direction}", {}).get("examples", []))
    teacher = {e["source"]: e["hypothesis"]
               for e in evaluations.get(subset, {}).get(f"sft.{direction}", {}).get("examples", [])}
    if not student:
        return []
    lines = ["| source | reference | teacher | student |", "|---|---|---|---|"]
    for e in student:
        cells = [e["source"], e["reference"], teacher.get(e["source"], ""), e["hypothesis"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|")[:80] for c in cells) + " |")
    return lines


def validation_vs_test(run: Path, evaluations: dict) -> list[str]:
    """Each model's last validation scores (its run's validation catalogs, logged by train_ds.py) beside its label
    test scores: held-out catalogs differ, and the gap says how much of a low test score is the catalogs'."""
    header = ["model", "validation zh-en BLEU / chrF", "validation en-zh BLEU / chrF", "label test zh-en BLEU / chrF",
              "label test en-zh BLEU / chrF"]
    lines = []
    for stage, label in (("sft", "teacher (fine-tuned)"), ("distill", "student (PyTorch)")):
        _, evals = read_metrics(run / stage / "metrics.jsonl")
        tests = [evaluations.get("labels", {}).get(f"{stage}.{d}") for d in DIRECTIONS]
        if not evals or not evals[-1].get("directions") or not all(tests):
            continue
        last = evals[-1]["directions"]
        cells = [f"{last[d]['bleu']:.2f} / {last[d]['chrf']:.2f} (step {evals[-1]['step']}, n={last[d]['n']})"
                 for d in DIRECTIONS] + [f"{t['bleu']:.2f} / {t['chrf']:.2f}" for t in tests]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines] if lines else []


def catalog_rows(evaluations: dict) -> list[str]:
    """The label test scores per catalog (inference.evaluate's by_source): one catalog can dominate a test split, and
    a model's score is mostly its score there."""
    labels = evaluations.get("labels", {})
    sources = next((r["by_source"] for r in labels.values() if r.get("by_source")), None)
    if not sources:
        return []
    header = ["catalog", "pairs"] + [f"{who} {d} BLEU / chrF" for who in ("teacher", "student") for d in DIRECTIONS]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---|" * 4]
    for source, first in sources.items():
        cells = []
        for stage in ("sft", "distill"):
            for direction in DIRECTIONS:
                got = labels.get(f"{stage}.{direction}", {}).get("by_source", {}).get(source)
                cells.append(f"{got['bleu']:.2f} / {got['chrf']:.2f}" if got else "-")
        lines.append(f"| {source} | {first['n']} | " + " | ".join(cells) + " |")
    return lines


def longest(examples: list[dict], n: int = 3) -> list[dict]:
    return sorted(examples, key=lambda e: -len(e["source"]))[:n]


def examples(run: Path) -> list[str]:
    """A fixed sample of the label test subset in both directions (spread over the file by inference.evaluate, so
    a reader judges the same sentences run after run), then the longest sentences of the full split's sample."""
    evaluations = read_eval(run)["scores"]
    lines = []
    for direction in DIRECTIONS:
        labels = example_table(evaluations, "labels", direction, list)
        sentences = example_table(evaluations, "full", direction, longest)
        if labels:
            lines += [f"\n**{direction}, short labels** (the subset the demo trains for)\n", *labels]
        if sentences:
            lines += [f"\n**{direction}, longer sentences** (the full test split)\n", *sentences]
    return lines


def deployed_line(dist: Path | None) -> str:
    """What the deployed rows were scored on: `python -m deploy`'s own test pairs, counted from DIST/report.json."""
    if not dist or not (dist / "report.json").is_file():
        return ""
    deployed = json.loads((dist / "report.json").read_text())
    n = deployed["quality"]["torch"]["zh-en"]["n"]
    return (f"Deployed rows are scored by `python -m deploy` on {n} pairs of its --test file per direction (those "
            "that share no side with its calibration pairs).")


def render(run: Path, dist: Path | None) -> Path:
    stages = {name: run / name for name in ("sft", "distill") if (run / name).is_dir()}
    pictures = plot(run, stages)
    splits = read_eval(run).get("splits", {})
    header = ["model", "parameters", "size on disk (MB)", "labels zh-en BLEU / chrF", "labels en-zh BLEU / chrF",
              "full zh-en BLEU / chrF", "full en-zh BLEU / chrF", "ms / sentence (labels)"]
    lines = [f"# Run report: {run}", "",
             "Scores on the held-out test catalogs (greedy): on their short labels (at most three English words, "
             f"{splits.get('labels', 'the labels test split')}), the subset this CPU demo trains for, and on the "
             f"whole test split ({splits.get('full', 'the full test split')}), whose longer sentences a "
             "few-million-parameter model trained for minutes has not learnt.", deployed_line(dist), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(run, dist)]
    evaluations = read_eval(run)["scores"]
    gap = validation_vs_test(run, evaluations)
    if gap:
        lines += ["", "Where the scores stop: the last validation during training (the validation catalogs' labels) "
                  "beside the label test subset (the test catalogs'). Both are held out from training; the "
                  "difference is how unlike the test catalogs are to everything trained on.", "", *gap]
    per_catalog = catalog_rows(evaluations)
    if per_catalog:
        lines += ["", "Per test catalog on the labels, largest first: the held-out catalogs are not alike, and the "
                  "largest ones set most of the subset's score.", "", *per_catalog]
    lines += ["", SCALE_NOTE, "", "## Training", ""] + [f"![{p}]({p})" for p in pictures]
    lines += ["", "## Example translations"] + examples(run)
    lines += ["", "## Look closer", "", f"    bash scripts/tensorboard.sh {run}", ""]
    if dist:
        lines += [f"Deployment details, with the precision that shipped and why: {dist / 'report.md'}", ""]
    out = run / "report.md"
    out.write_text("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/quickstart", help="run folder holding sft/, distill/ and eval.json")
    parser.add_argument("--dist", default=None,
                        help="deploy output folder with report.json (default: RUN/dist/rv1126b; optional)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    dist = Path(args.dist) if args.dist else run / "dist" / "rv1126b"
    if not run.is_dir():
        print(f"report: {run}: no such run folder", file=sys.stderr)
        return 2
    print(render(run, dist if dist.is_dir() else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
