"""The run report is rendered from a real tiny run, and every number in it is one found in that run's own files.

The run is conftest's shared one (RUN/sft and RUN/distill, trained on 2 CPU ranks). RUN/eval.json is written
here as quickstart's evaluate stage writes it (inference.evaluate per model and direction). The expected values
are read back from the files (eval.json, the two metrics.jsonl, the model files' sizes, DIST/report.json), never
typed in, and the plots' points are caught as matplotlib draws them.

DIST is synthetic: a real one needs the RKNN toolkit and the aarch64 cross compiler (tests/test_deploy.py builds
one from another student). Its report.json holds only the fields inference.report reads.
"""

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

import step_log
from inference import report

DIRECTIONS = ("zh-en", "en-zh")
STAGES = (("sft", "teacher (fine-tuned)"), ("distill", "student (PyTorch)"))


SUBSETS = ("labels", "full")


@pytest.fixture(scope="module")
def run(run_root, sft_run, distill_run, small_corpus) -> Path:
    """The shared run folder with RUN/eval.json as quickstart's evaluate stage writes it: scores on a label subset
    (here 8 test pairs) and on the full split (here 12 others), with 8 and 12 examples kept."""
    import corpus
    from inference.evaluate import evaluate
    from inference.translator import Translator
    pairs = corpus.read_pairs(small_corpus / "test.jsonl")
    # the label subset as two catalogs (5 and 3 pairs), so the report's per-catalog table has rows to check
    labels = [dataclasses.replace(p, source="catalog-a" if i < 5 else "catalog-b") for i, p in enumerate(pairs[:8])]
    subsets = {"labels": (labels, 8), "full": (pairs[8:20], 12)}
    scores = {subset: {} for subset in SUBSETS}
    for stage in ("sft", "distill"):
        translator = Translator(run_root / stage / "final", "cpu")
        for subset, (chosen, examples) in subsets.items():
            for direction in DIRECTIONS:
                scores[subset][f"{stage}.{direction}"] = evaluate(translator, chosen, direction, examples=examples)
    splits = {"labels": "the first 8 test pairs", "full": "the next 12"}
    (run_root / "eval.json").write_text(json.dumps({"splits": splits, "scores": scores}, indent=2,
                                                   ensure_ascii=False) + "\n")
    return run_root


@pytest.fixture
def dist(tmp_path, run) -> Path:
    """A deploy output folder holding report.json as `python -m deploy` writes it (the fields the report reads)."""
    params = json.loads((run / "eval.json").read_text())["scores"]["labels"]["distill.zh-en"]["params"]

    def quality(bleu: float, chrf: float, ms: float) -> dict:
        return {d: {"bleu": bleu + i, "chrf": chrf + i, "ms_per_sentence": ms + i, "params": params, "n": 8}
                for i, d in enumerate(DIRECTIONS)}

    deployed = {"choice": {"precision": "fp16"},
                "quality": {"torch": quality(0.11, 1.23, 4.5), "onnx": quality(0.12, 1.34, 2.25),
                            "onnx-int8": quality(0.13, 1.45, 1.75), "rknn-sim:w8a8": quality(0.14, 1.56, 30.5),
                            "rknn-sim:fp16": quality(0.15, 1.67, 40.25)},
                "sizes": {"onnx": 3_456_789, "onnx-int8": 987_654, "rknn-sim:w8a8": 1_234_567,
                          "rknn-sim:fp16": 2_345_678}}
    out = tmp_path / "dist" / "rv1126b"
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(deployed))
    return out


def metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Step and evaluation entries of a metrics.jsonl, read here without the report's reader."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in entries if not e.get("eval")], [e for e in entries if e.get("eval")]


def cell(text: str) -> str:
    return text.replace("|", "\\|")[:80]


def row(label: str, params: int, megabytes: float, zh: dict, en: dict, full_zh: dict | None = None,
        full_en: dict | None = None) -> str:
    full = " | ".join(f"{s['bleu']:.2f} / {s['chrf']:.2f}" if s else "-" for s in (full_zh, full_en))
    return (f"| {label} | {params:,} | {megabytes:.2f} | {zh['bleu']:.2f} / {zh['chrf']:.2f} | "
            f"{en['bleu']:.2f} / {en['chrf']:.2f} | {full} | {(zh['ms_per_sentence'] + en['ms_per_sentence']) / 2:.2f} |")


def expected_table(run: Path, dist: Path) -> list[str]:
    """The results table as the files say: the models' scores, parameters and speed from RUN/eval.json, their
    sizes from the model files, the deployed rows from DIST/report.json."""
    scores = json.loads((run / "eval.json").read_text())["scores"]
    rows = []
    for stage, label in STAGES:
        zh, en, full_zh, full_en = (scores[subset][f"{stage}.{d}"] for subset in SUBSETS for d in DIRECTIONS)
        assert zh["params"] == en["params"] == full_zh["params"] > 0
        rows.append(row(label, zh["params"], (run / stage / "final" / "model.safetensors").stat().st_size / 2 ** 20,
                        zh, en, full_zh, full_en))
    deployed = json.loads((dist / "report.json").read_text())
    for backend, label in (("onnx", "ONNX fp32"), ("onnx-int8", "ONNX int8 (CPU)"),
                           ("rknn-sim:w8a8", "RKNN int8 (simulator)"), ("rknn-sim:fp16", "RKNN fp16, shipped (simulator)")):
        rows.append(row(label, deployed["quality"]["torch"]["zh-en"]["params"], deployed["sizes"][backend] / 2 ** 20,
                        *(deployed["quality"][backend][d] for d in DIRECTIONS)))
    return rows


def rendered_table(text: str) -> list[str]:
    lines = text.splitlines()
    first_row = lines.index(next(line for line in lines if line.startswith("| model |"))) + 2
    return list(itertools.takewhile(lambda line: line.startswith("|"), lines[first_row:]))


def test_report_numbers_come_from_the_run_files(run, dist, monkeypatch):
    import matplotlib.axes
    drawn = []  # (axes, label, xs, ys) for every line the report plots
    original_plot = matplotlib.axes.Axes.plot

    def recording_plot(ax, *args, **kwargs):
        drawn.append((ax, kwargs.get("label"), list(args[0]), list(args[1])))
        return original_plot(ax, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    assert report.main(["--run", str(run), "--dist", str(dist)]) == 0
    text = (run / "report.md").read_text()
    assert rendered_table(text) == expected_table(run, dist)

    # The plots: every training and validation point of both stages, exactly as metrics.jsonl logged it.
    assert {label for _, label, _, _ in drawn} == {"sft train", "sft validation", "sft",
                                                   "distill train", "distill validation", "distill"}
    series = {(ax.get_title(), label): (xs, ys) for ax, label, xs, ys in drawn}
    for stage, steps_expected in (("sft", 12), ("distill", 24)):
        steps, evals = metrics(run / stage / "metrics.jsonl")
        assert len(steps) == steps_expected and evals
        assert series[("loss", f"{stage} train")] == ([e["step"] for e in steps], [e["loss"] for e in steps])
        assert series[("loss", f"{stage} validation")] == ([e["step"] for e in evals], [e["loss"] for e in evals])
        bleu_title = next(ax.get_title() for ax, label, _, _ in drawn if label == stage)
        assert bleu_title.startswith("validation BLEU")
        assert series[(bleu_title, stage)] == ([e["step"] for e in evals], [e["bleu"] for e in evals])
    assert "![training.png](training.png)" in text
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Example translations: every kept label example and the three longest of the full split's, the student's
    # beside the reference and the teacher's, in both directions; then the line on what to expect at scale.
    scores = json.loads((run / "eval.json").read_text())["scores"]
    lines = text.splitlines()
    for direction in DIRECTIONS:
        for subset, count in (("labels", 8), ("full", 3)):
            teacher = {e["source"]: e["hypothesis"] for e in scores[subset][f"sft.{direction}"]["examples"]}
            student = scores[subset][f"distill.{direction}"]["examples"]
            shown = student if subset == "labels" else sorted(student, key=lambda e: -len(e["source"]))[:3]
            assert len(shown) == count
            for e in shown:
                cells = [e["source"], e["reference"], teacher.get(e["source"], ""), e["hypothesis"]]
                assert "| " + " | ".join(cell(c) for c in cells) + " |" in lines
    # Where the scores stop: each model's last validation (from its metrics.jsonl) beside its label test scores.
    for stage, label in STAGES:
        last = metrics(run / stage / "metrics.jsonl")[1][-1]
        cells = [f"{last['directions'][d]['bleu']:.2f} / {last['directions'][d]['chrf']:.2f} (step {last['step']}, "
                 f"n={last['directions'][d]['n']})" for d in DIRECTIONS]
        cells += [f"{scores['labels'][f'{stage}.{d}']['bleu']:.2f} / {scores['labels'][f'{stage}.{d}']['chrf']:.2f}"
                  for d in DIRECTIONS]
        assert f"| {label} | " + " | ".join(cells) + " |" in lines
    # Per catalog of the label subset, largest first: each model's own per-catalog scores.
    for source, n in (("catalog-a", 5), ("catalog-b", 3)):
        cells = [f"{scores['labels'][f'{stage}.{d}']['by_source'][source]['bleu']:.2f} / "
                 f"{scores['labels'][f'{stage}.{d}']['by_source'][source]['chrf']:.2f}"
                 for stage in ("sft", "distill") for d in DIRECTIONS]
        assert f"| {source} | {n} | " + " | ".join(cells) + " |" in lines
    assert report.SCALE_NOTE in lines
    assert "Deployed rows are scored by `python -m deploy` on 8 pairs of its --test file per direction" in text
    assert f"bash scripts/tensorboard.sh {run}" in text
    assert f"Deployment details, with the precision that shipped and why: {dist / 'report.md'}" in text


def test_report_follows_the_files_when_they_change(run, dist, tmp_path):
    """A few training steps leave both models' BLEU and chrF at 0.00, which a constant would match too: the same
    run with every score in eval.json moved to a distinct value must show exactly the new values."""
    moved = tmp_path / "run"
    moved.mkdir()
    for stage in ("sft", "distill"):
        (moved / stage).symlink_to(run / stage, target_is_directory=True)
    evaluations = json.loads((run / "eval.json").read_text())
    results = [(name, result) for subset in SUBSETS for name, result in evaluations["scores"][subset].items()]
    for i, (name, result) in enumerate(results):
        result.update(bleu=result["bleu"] + 10.25 + i, chrf=result["chrf"] + 20.5 + 2 * i,
                      ms_per_sentence=result["ms_per_sentence"] + 0.5 * i,
                      params=result["params"] + (1000 if name.startswith("sft.") else 2000))
    (moved / "eval.json").write_text(json.dumps(evaluations, ensure_ascii=False))
    table = rendered_table(report.render(moved, dist).read_text())
    assert table == expected_table(moved, dist)
    assert table[:2] != expected_table(run, dist)[:2]


def test_resumed_runs_keep_the_last_entry_per_step(tmp_path):
    for loss in (5.0, 4.0):
        step_log.record(tmp_path, {"step": 1, "loss": loss})
    steps, evals = report.read_metrics(tmp_path / "metrics.jsonl")
    assert steps == [{"step": 1, "loss": 4.0}] and evals == []
