"""Which distillation method trains the best student: the same `tiny` student, teacher, steps and seeds, one
method at a time, scored on a test split in both directions.

    python -m bench.kd_methods                       # the quickstart's label subset and stored teacher
    python -m bench.kd_methods --methods ce_only,seq_kd --seeds 1,2,3 --steps 3000
    python -m bench.kd_methods --corpus full --steps 120   # the whole catalog corpus, a teacher fine-tuned here

--corpus labels (the default) is what the quickstart trains: the short-label subset of the catalog corpus (at most
three English words), the stored teacher models/tiny-qwen-catalogs, fine-tuned for the labels by the project's own
`--stage sft` (or --teacher), and the quickstart's distillation recipe. --corpus full is the whole corpus with a
tiny teacher fine-tuned 800 steps here, where every model trained on CPU scores near zero.

Methods: ce_only (alpha 0: the reference alone, no teacher term), the six token-level divergences of kd_loss.py
(alpha 0.5), seq_kd (forward KL on the teacher's greedy translations instead of the references), seq_kd_beam4
(the same with the teacher's 4-beam translations) and on_policy
(forward KL on the student's own samples on half of the steps). Everything else is the default `tiny` recipe.

Once, under bench/.cache/kd/CORPUS: the corpus (corpus.build_catalog_corpus, corpus.write_label_subset), for --corpus
full a tiny Qwen2-shaped teacher (scripts/make_tiny_teacher.py) fine-tuned with `train_ds.py --stage sft`, and the
seq_kd cache of teacher translations (shared by every seed). Each (method, seed) run is cached too: its scores are
kept in bench/.cache/kd/CORPUS/runs/METHOD-sSEED/scores.json and reused unless --force, so an interrupted bench
resumes.
Scores come from inference.evaluate (BLEU and chrF with sacrebleu) on the first --limit test pairs per
direction. Writes bench/results/kd_methods-<device>.json and the "KD methods" section of bench/RESULTS.md
(mean ± spread over seeds, spread = half the range).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.results_io import write_results
from engine import free_port

ROOT = Path(__file__).resolve().parents[1]

CATALOGS = ROOT / "bench" / ".cache" / "catalogs"  # shared with bench/train_step.py
STORED_TEACHER = ROOT / "models" / "tiny-qwen-catalogs"  # the quickstart's (scripts/stored_teacher.py)
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
DIRECTIONS = ("zh-en", "en-zh")

METHODS: dict[str, list[str]] = {
    "ce_only": ["--alpha", "0"],
    "forward_kl": ["--kd_loss", "forward_kl"],
    "reverse_kl": ["--kd_loss", "reverse_kl"],
    "jsd": ["--kd_loss", "jsd"],
    "skew_forward_kl": ["--kd_loss", "skew_forward_kl"],
    "skew_reverse_kl": ["--kd_loss", "skew_reverse_kl"],
    "tvd": ["--kd_loss", "tvd"],
    "seq_kd": ["--kd_loss", "forward_kl", "--seq_kd", "true"],
    "seq_kd_beam4": ["--kd_loss", "forward_kl", "--seq_kd", "true", "--distill.seq_kd_beams", "4"],
    "on_policy": ["--kd_loss", "forward_kl", "--on_policy_ratio", "0.5"],
}

# The student's recipe, the same for every method; seq_kd is train_ds.py's default (this bench chose it): off here,
# and on again in the seq_kd methods' own flags (given after).
RECIPES = {
    # scripts/quickstart.sh's distillation on the label subset
    "labels": ["--config", "scripts/recipes/labels-distill.yaml", "--seq_kd", "false"],
    # the whole corpus: short sentences (the catalogs are mostly UI labels; 24 tokens keeps 9 in 10 of them) so a
    # CPU run of a few hundred steps learns something and decoding stays cheap
    "full": ["--micro_batch_size", "32", "--lr", "3e-3", "--warmup_steps", "20", "--model.max_source_len", "24",
             "--model.max_target_len", "24", "--data.valid_subset", "32", "--log_every", "25", "--seq_kd", "false"],
}


@dataclass(frozen=True)
class Bench:
    """One corpus's set-up: its folder, its cache of runs, the student's recipe."""
    corpus: str  # labels or full

    @property
    def data(self) -> Path:
        return CATALOGS if self.corpus == "full" else self.cache / "labels"

    @property
    def cache(self) -> Path:
        return ROOT / "bench" / ".cache" / "kd" / self.corpus

    @property
    def recipe(self) -> list[str]:
        return RECIPES[self.corpus]

    @property
    def section(self) -> str:
        return f"## KD methods (bench/kd_methods.py, {self.corpus})"


LABELS_SFT = ["--config", "scripts/recipes/labels-sft.yaml", "--seed", "0"]  # the quickstart's, on the stored teacher
TEACHER_SFT = ["--max_steps", "800", "--eval_every", "800", "--save_every", "800", "--micro_batch_size", "32",
               "--lr", "3e-3", "--warmup_steps", "30", "--data.valid_subset", "64", "--log_every", "50", "--seed", "0"]


def deepspeed(args: list[str], log: Path, tries: int = 2) -> float:
    """`deepspeed --num_gpus 2 train_ds.py ARGS` (two CPU ranks, or two GPUs); returns wall seconds. A failed run
    is tried once more from scratch (on a shared machine a rank can be killed for memory)."""
    for attempt in range(1, tries + 1):
        port = free_port()
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
               "train_ds.py", *args]
        print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
        start = time.perf_counter()
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            done = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode == 0:
            return time.perf_counter() - start
        print(f"train_ds.py failed (exit {done.returncode}, try {attempt} of {tries}); see {log}", file=sys.stderr)
    raise SystemExit(f"bench/kd_methods.py: train_ds.py failed (exit {done.returncode}); see {log}:\n"
                     + log.read_text()[-3000:])


def prepare(bench: Bench, teacher: Path | None) -> Path:
    """The corpus, built once under bench/.cache, and the teacher: the one given, the stored one for labels (checked
    against this corpus's held-out catalogs), or for the whole corpus a tiny one fine-tuned here once."""
    import corpus
    from scripts import make_tiny_teacher, stored_teacher
    if not (CATALOGS / "train.jsonl").is_file():
        corpus.build_catalog_corpus("/usr/share/locale", CATALOGS)
    if bench.corpus == "labels" and not (bench.data / "train.jsonl").is_file():
        corpus.write_label_subset(CATALOGS, bench.data, 3)
    if teacher:
        return teacher
    sft = bench.cache / "teacher-sft"
    if bench.corpus == "labels":  # the quickstart's teacher: the stored one, fine-tuned on the labels as it does
        stored_teacher.check(STORED_TEACHER, CATALOGS)
        if not (sft / "final" / "config.json").is_file():
            deepspeed(["--stage", "sft", "--teacher", str(STORED_TEACHER), "--data", str(bench.data), "--out",
                       str(sft), *LABELS_SFT], bench.cache / "teacher-sft.log")
        return sft / "final"
    base = bench.cache / "teacher-base"
    if not (base / "config.json").is_file():
        make_tiny_teacher.build_teacher(corpus.read_pairs(CATALOGS / "train.jsonl"), base, "tiny", force=True)
    if not (sft / "final" / "config.json").is_file():
        print("fine-tuning the teacher once (800 steps, several minutes)", file=sys.stderr)
        deepspeed(["--stage", "sft", "--teacher", str(base), "--data", str(CATALOGS), "--out", str(sft),
                   *TEACHER_SFT], bench.cache / "teacher-sft.log")
    return sft / "final"


def score(bench: Bench, model: Path, limit: int) -> dict:
    """BLEU/chrF per direction on the test split (inference.evaluate's own scoring, --limit pairs)."""
    import corpus
    from inference.evaluate import evaluate
    from inference.translator import Translator
    pairs = corpus.read_pairs(bench.data / "test.jsonl", on_bad_line="skip")[:limit]
    translator = Translator(model)
    out = {}
    for direction in DIRECTIONS:
        result = evaluate(translator, pairs, direction)
        out[direction] = {k: result[k] for k in ("bleu", "chrf", "n", "skipped_too_long")}
        out[direction]["example"] = result["examples"][0] if result["examples"] else None
    return out


def reference_ce(bench: Bench, model: Path, limit: int) -> dict:
    """Teacher-forced cross-entropy of the test references (nats per target token) per direction: smooth where
    BLEU and chrF are not (a barely trained student's greedy output collapses to a few frequent tokens)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    import corpus
    import data
    import vocabulary
    from model import StudentForTranslation
    student = StudentForTranslation.from_pretrained(model).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = vocabulary.VocabMap.load(model)
    builder = data.ExampleBuilder(tokenizer, vocab, student.config.max_source_len, student.config.max_target_len)
    pairs = corpus.read_pairs(bench.data / "test.jsonl", on_bad_line="skip")[:limit]
    out = {}
    for direction in DIRECTIONS:
        examples, _ = builder.examples(pairs, [direction])  # pairs over the length limits are left out
        total, tokens = 0.0, 0
        for start in range(0, len(examples), 64):
            batch = {k: torch.tensor(v) for k, v in builder.collate(examples[start:start + 64]).items()}
            with torch.no_grad():
                logits = student(source_ids=batch["source_ids"], source_mask=batch["source_mask"],
                                 direction=batch["direction"], decoder_input_ids=batch["decoder_input_ids"]).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                     ignore_index=data.IGNORE_INDEX, reduction="sum").item()
            tokens += int((batch["labels"] != data.IGNORE_INDEX).sum())
        out[direction] = {"ce": total / max(tokens, 1), "n": len(examples)}
    return out


def run_method(bench: Bench, method: str, seed: int, teacher: Path, steps: int, limit: int, force: bool) -> dict:
    run = bench.cache / "runs" / f"{method}-s{seed}"
    scores_file = run / "scores.json"
    flags = METHODS[method] + (["--distill.seq_kd_cache", str(bench.cache / f"{method}_cache.jsonl")]
                               if "--seq_kd" in METHODS[method] else [])
    setting = {"method": method, "seed": seed, "steps": steps, "limit": limit, "args": flags,
               "teacher": str(teacher), "recipe": bench.recipe}
    if scores_file.is_file() and not force:
        cached = json.loads(scores_file.read_text())
        if cached.get("setting") == setting:
            print(f"{method} seed {seed}: cached ({scores_file})", file=sys.stderr)
            return cached
    args = ["--stage", "distill", "--teacher", str(teacher), "--data", str(bench.data), "--preset", "tiny",
            "--out", str(run), "--max_steps", str(steps), "--eval_every", str(steps), "--save_every", str(steps),
            "--keep", "1", *bench.recipe, "--seed", str(seed), *flags]
    import shutil
    shutil.rmtree(run, ignore_errors=True)
    seconds = deepspeed(args, bench.cache / "logs" / f"{method}-s{seed}.log")
    steps_log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in steps_log if "eval" not in e]
    start = time.perf_counter()
    scores = score(bench, run / "final", limit)
    result = {"setting": setting, "train_seconds": round(seconds, 1),
              "score_seconds": round(time.perf_counter() - start, 1),
              "final_loss": statistics.fmean(e["loss"] for e in train[-20:]),
              "on_policy_steps": sum(bool(e.get("on_policy")) for e in train), "scores": scores,
              "reference_ce": reference_ce(bench, run / "final", limit)}
    seq_line = [line for line in (run / "train.log").read_text().splitlines() if "seq_kd:" in line]
    if seq_line:
        result["seq_kd_log"] = [line.split(" ", 1)[1] for line in seq_line]
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # keep the scores, not the shards
    scores_file.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"{method} seed {seed}: " + "  ".join(f"{d} BLEU {result['scores'][d]['bleu']:.2f} chrF "
                                                f"{result['scores'][d]['chrf']:.2f}" for d in DIRECTIONS)
          + f"  ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return result


def summarise(runs: list[dict]) -> dict:
    """Per method and metric: mean and spread (half the range) over seeds."""
    summary = {}
    for method in dict.fromkeys(r["setting"]["method"] for r in runs):
        mine = [r for r in runs if r["setting"]["method"] == method]
        entry = {}
        for direction in DIRECTIONS:
            for metric in ("bleu", "chrf"):
                values = [r["scores"][direction][metric] for r in mine]
                entry[f"{direction}/{metric}"] = {"mean": statistics.fmean(values),
                                                  "spread": (max(values) - min(values)) / 2, "values": values}
            values = [r["reference_ce"][direction]["ce"] for r in mine]
            entry[f"{direction}/ce"] = {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2,
                                        "values": values}
        for metric in ("bleu", "chrf", "ce"):  # the mean of both directions, per seed
            source = (lambda r, d: r["reference_ce"][d]["ce"]) if metric == "ce" else \
                (lambda r, d: r["scores"][d][metric])
            values = [statistics.fmean(source(r, d) for d in DIRECTIONS) for r in mine]
            entry[f"mean/{metric}"] = {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2,
                                       "values": values}
        entry["train_seconds"] = statistics.fmean(r["train_seconds"] for r in mine)
        summary[method] = entry
    return summary


def table(summary: dict) -> str:
    cell = lambda s: f"{s['mean']:.2f} ± {s['spread']:.2f}"  # noqa: E731
    lines = ["| method | zh-en BLEU | zh-en chrF | en-zh BLEU | en-zh chrF | mean chrF | zh-en CE | en-zh CE | "
             "mean CE | s/run |", "|---|" + "---:|" * 9]
    for method, s in summary.items():
        lines.append(f"| {method} | {cell(s['zh-en/bleu'])} | {cell(s['zh-en/chrf'])} | {cell(s['en-zh/bleu'])} | "
                     f"{cell(s['en-zh/chrf'])} | {cell(s['mean/chrf'])} | {cell(s['zh-en/ce'])} | "
                     f"{cell(s['en-zh/ce'])} | {cell(s['mean/ce'])} | {s['train_seconds']:.0f} |")
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """Best method by mean chrF and by mean reference CE, and the methods each one's seed range clears."""
    sentences = []
    for key, name, higher in (("mean/bleu", "mean BLEU", True), ("mean/chrf", "mean chrF", True),
                              ("mean/ce", "mean reference CE", False)):
        sign = 1 if higher else -1
        ranked = sorted(summary, key=lambda m: sign * summary[m][key]["mean"], reverse=True)
        best, runner_up = ranked[0], ranked[1]
        b, r = summary[best][key], summary[runner_up][key]
        clear = [m for m in ranked[1:] if sign * (b["mean"] - sign * b["spread"])
                 > sign * (summary[m][key]["mean"] + sign * summary[m][key]["spread"])]
        sentences.append(
            f"By {name}: **{best}** ({b['mean']:.2f} ± {b['spread']:.2f}), then {runner_up} ({r['mean']:.2f} ± "
            f"{r['spread']:.2f}); its seed range clears {', '.join(clear) if clear else 'no other method'}"
            + ("" if len(clear) == len(ranked) - 1 else ", the rest are within the seed spread") + ".")
    base = summary.get("ce_only", {}).get("mean/ce")
    if base:  # does the teacher term help at all, on the smooth metric?
        lower = [m for m in summary if m != "ce_only" and summary[m]["mean/ce"]["mean"]
                 + summary[m]["mean/ce"]["spread"] < base["mean"] - base["spread"]]
        sentences.append(f"Against ce_only (no teacher term), the reference CE is lower beyond the seed spread for "
                         f"{', '.join(lower) if lower else 'no method'}.")
    return " ".join(sentences) + default_against_ce(summary)


DEFAULT_METHOD = "seq_kd"  # train_ds.py's default (distill.seq_kd on, forward KL)


def default_against_ce(summary: dict) -> str:
    """The question the bench is for: does the default method beat training without a teacher, per direction and
    metric, beyond the seed spread (its worst seed above ce_only's best)?"""
    if DEFAULT_METHOD not in summary or "ce_only" not in summary:
        return ""
    verdicts = []
    for direction in DIRECTIONS:
        for metric, name in (("bleu", "BLEU"), ("chrf", "chrF")):
            mine = summary[DEFAULT_METHOD][f"{direction}/{metric}"]["values"]
            base = summary["ce_only"][f"{direction}/{metric}"]["values"]
            how = ("ahead beyond the seed spread" if min(mine) > max(base) else
                   "behind beyond the seed spread" if max(mine) < min(base) else "within the seed spread")
            verdicts.append(f"{direction} {name} {statistics.fmean(mine):.2f} against {statistics.fmean(base):.2f} "
                            f"({how})")
    return f" The default ({DEFAULT_METHOD}) against ce_only, worst seed against best: {'; '.join(verdicts)}."


def write_markdown(section: str, text: str) -> None:
    """Replace (or append) this bench's section of bench/RESULTS.md, leaving every other section as it is."""
    old = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Benchmark results\n"
    start = old.find(section)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(section))
        new = old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else "")
    RESULTS_MD.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=sorted(RECIPES), default="labels",
                        help="labels: the quickstart's short-label subset and stored teacher (default); full: the "
                             "whole catalog corpus and a teacher fine-tuned here")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="teacher folder (default: models/tiny-qwen-catalogs for labels, one fine-tuned here for "
                             "full)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds (at least 2 for a spread)")
    parser.add_argument("--steps", type=int, default=0,
                        help="distillation steps per run (default: the quickstart's 3,000 for labels, 120 for full)")
    parser.add_argument("--limit", type=int, default=0,
                        help="test pairs scored per direction (default: all 723 for labels, 300 for full)")
    parser.add_argument("--force", action="store_true", help="redo runs whose scores are cached")
    parser.add_argument("--json", type=Path, default=None, help="default: bench/results/kd_methods-CORPUS-cpu.json")
    parser.add_argument("--note", default="", help="a sentence on the conditions (e.g. other load) for RESULTS.md")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    bench = Bench(args.corpus)
    steps = args.steps or (3000 if bench.corpus == "labels" else 120)
    limit = args.limit or (100000 if bench.corpus == "labels" else 300)

    import torch
    device = "gpu" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    teacher = prepare(bench, args.teacher)
    teacher_scores_file = bench.cache / f"teacher-scores-{limit}.json"
    if not teacher_scores_file.is_file() or json.loads(teacher_scores_file.read_text()).get("teacher") != str(teacher):
        teacher_scores_file.parent.mkdir(parents=True, exist_ok=True)
        teacher_scores_file.write_text(json.dumps({"teacher": str(teacher), **score(bench, teacher, limit)},
                                                  indent=2, ensure_ascii=False) + "\n")
    teacher_scores = json.loads(teacher_scores_file.read_text())
    runs = [run_method(bench, m, seed, teacher, steps, limit, args.force) for m in methods for seed in seeds]
    summary = summarise(runs)
    elapsed = time.perf_counter() - started
    runs_seconds = sum(r["train_seconds"] + r.get("score_seconds", 0.0) for r in runs)
    print(table(summary))
    print(verdict(summary))
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    write_results(f"kd_methods-{bench.corpus}-{device}", args.json, {
        "device": device, "machine": cpu, "corpus": bench.corpus, "teacher": str(teacher),
        "teacher_scores": teacher_scores, "steps": steps, "seeds": seeds, "limit": limit,
        "student": "tiny", "recipe": " ".join(bench.recipe) + " (alpha 0.5, temperature 2)", "note": args.note,
        "bench_seconds": round(elapsed), "runs_seconds": round(runs_seconds), "summary": summary, "runs": runs,
        "verdict": verdict(summary)})
    teacher_line = ", ".join(f"{d} BLEU {teacher_scores[d]['bleu']:.2f} chrF {teacher_scores[d]['chrf']:.2f}"
                             for d in DIRECTIONS)
    n_test = teacher_scores[DIRECTIONS[0]]["n"]
    about_teacher = (f"the stored teacher models/tiny-qwen-catalogs fine-tuned on the labels as the quickstart does "
                     f"(scripts/recipes/labels-sft.yaml; {teacher_line})" if bench.corpus == "labels" and
                     not args.teacher else f"{args.teacher} ({teacher_line})" if args.teacher else
                     f"the tiny Qwen2-shaped model fine-tuned 800 steps here ({teacher_line})")
    closing = ("The label subset is what a from-scratch model learns on a CPU in minutes; the student is the "
               "quickstart's, with the quickstart's teacher." if bench.corpus == "labels" else
               "On CPU both models are trained from scratch for minutes: the teacher itself scores near zero BLEU, "
               "and so does every student. chrF is the more telling number at this scale; what holds for a real "
               "Qwen teacher on a GPU has to be measured there (`--steps`, `--seeds`).")
    write_markdown(bench.section,
        f"{bench.section}\n\n"
        f"`python -m bench.kd_methods --corpus {bench.corpus} --methods {args.methods} --steps {steps} --seeds "
        f"{args.seeds}` on {device} ({cpu}), 2 ranks: {runs_seconds / 60:.0f} minutes for the {len(runs)} runs "
        f"(training and scoring). {args.note + ' ' if args.note else ''}"
        f"The `tiny` student, {steps} steps, `{' '.join(bench.recipe)}`; alpha 0.5 and temperature 2 for every "
        f"method but ce_only (alpha 0); seq_kd, seq_kd_beam4 and on_policy use forward KL. Teacher: "
        f"{about_teacher}. Scores: inference.evaluate on {n_test} test pairs per direction; CE = teacher-forced "
        f"cross-entropy of those references (nats per token, lower is better; ce_only trains on that very objective "
        f"alone, the others give it weight 0.5); mean ± spread over seeds {args.seeds} (spread = half the range)."
        f"\n\n{table(summary)}\n\n{verdict(summary)}\n\n{closing}\n\n"
        f"Raw numbers per run: bench/results/kd_methods-{bench.corpus}-{device}.json.\n")


if __name__ == "__main__":
    main()
