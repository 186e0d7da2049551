"""The run report is rendered from a run's own files, and its numbers are theirs."""

import json

from conftest import ROOT  # noqa: F401 -- puts the repository on sys.path
from inference import report
import train_ds


def evaluation(bleu: float, chrf: float, params: int, ms: float) -> dict:
    return {"bleu": bleu, "chrf": chrf, "n": 3, "ms_per_sentence": ms, "params": params,
            "examples": [{"source": "打开文件", "hypothesis": f"open {bleu}", "reference": "Open file"}]}


def test_report_numbers_come_from_the_run_files(tmp_path):
    run = tmp_path / "run"
    for stage, loss in (("sft", 7.5), ("distill", 3.25)):
        (run / stage / "final").mkdir(parents=True)
        (run / stage / "final" / "model.safetensors").write_bytes(b"\0" * 2 ** 20)
        for step in (1, 2, 3):
            train_ds.record(run / stage, {"step": step, "loss": loss - step, "kd": 0.1, "ce": 1.0, "lr": 1e-3,
                                          "tokens_per_s": 100.0})
        train_ds.record(run / stage, {"eval": True, "step": 3, "loss": loss, "bleu": 1.5, "chrf": 9.0})
    scores = {"sft.zh-en": evaluation(12.34, 45.6, 1_934_464, 80.0), "sft.en-zh": evaluation(11.1, 22.2, 1_934_464, 60.0),
              "distill.zh-en": evaluation(7.89, 33.3, 1_880_704, 1.5), "distill.en-zh": evaluation(6.5, 21.0, 1_880_704, 2.5)}
    (run / "eval.json").write_text(json.dumps(scores))
    text = report.render(run, None).read_text()
    assert "| teacher (fine-tuned) | 1,934,464 | 1.00 | 12.34 / 45.60 | 11.10 / 22.20 | 70.00 |" in text
    assert "| student (PyTorch) | 1,880,704 | 1.00 | 7.89 / 33.30 | 6.50 / 21.00 | 2.00 |" in text
    assert "| 打开文件 | Open file | open 12.34 | open 7.89 |" in text
    assert f"bash scripts/tensorboard.sh {run}" in text
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resumed_runs_keep_the_last_entry_per_step(tmp_path):
    for loss in (5.0, 4.0):
        train_ds.record(tmp_path, {"step": 1, "loss": loss})
    steps, evals = report.read_metrics(tmp_path / "metrics.jsonl")
    assert steps == [{"step": 1, "loss": 4.0}] and evals == []
