"""python -m deploy end to end on a tiny student, and the rknn-sim backend (deploy/rknn_sim_eval.py).

Needs the RKNN venv (created on first use by deploy/setup_rknn_env.sh, a minute or two) and, for the board runner,
cmake and the ziglang wheel of requirements.txt (without them deploy fails and its last log line says what to install).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import data
from deploy import __main__ as pipeline
from deploy import package
from inference import backends
from inference.backends import Dist
from test_export_onnx import export_args, make_student, run_module

REPO = Path(__file__).resolve().parents[1]
DIRECTIONS = ["zh-en", "en-zh"]
LIMIT = 10



@pytest.fixture(scope="module")
def pairs(small_corpus: Path) -> list[data.Pair]:
    return data.read_pairs(small_corpus / "train.jsonl")


@pytest.fixture(scope="module")
def deployed(rknn_python: Path, tiny_teacher: Path, small_corpus: Path, pairs: list[data.Pair],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Dist, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("deploy")
    student = make_student(root / "student", tiny_teacher, pairs, "transformer")
    done = run_module("deploy", "--model", str(student), "--target", "rv1126b",
                      "--calib", str(small_corpus / "valid.jsonl"), "--test", str(small_corpus / "test.jsonl"),
                      "--out", str(root / "dist"), "--precision", "w8a8,fp16", "--limit", str(LIMIT),
                      "--rknn_python", str(rknn_python), timeout=900)
    assert done.returncode == 0, f"deploy failed:\n{done.stderr[-4000:]}"
    return Dist(root / "dist"), done


@pytest.fixture(scope="module")
def report(deployed: tuple[Dist, Any]) -> dict[str, Any]:
    return json.loads(deployed[0].report.read_text())


# --------------------------------------------------------------------------- the end-to-end run


def test_every_step_says_what_it_does(deployed: tuple[Dist, subprocess.CompletedProcess[str]]) -> None:
    log = deployed[1].stderr
    for number in range(1, pipeline.N_STEPS + 1):
        assert f"[{number}/{pipeline.N_STEPS}]" in log


def test_report_has_every_section(report: dict[str, Any]) -> None:
    for section in ("parameters", "parity", "rknn", "quality", "host_cpu", "choice", "estimate",
                    "estimates_all_precisions", "sizes", "files", "board"):
        assert section in report, section
    assert report["parameters"]["precisions"] == ["w8a8", "fp16"] and report["parameters"]["limit"] == LIMIT
    assert report["parameters"]["toolkit_version"] == "2.5.0" and report["parameters"]["meta"]["decoder"]
    assert report["parity"]["onnx"]["greedy_identical"] == report["parity"]["onnx"]["greedy_total"] > 0


def test_quality_for_every_backend_and_direction(report: dict[str, Any]) -> None:
    assert set(report["quality"]) == {"torch", "onnx", "onnx-int8", "rknn-sim:w8a8", "rknn-sim:fp16"}
    for backend, per_direction in report["quality"].items():
        assert list(per_direction) == DIRECTIONS, backend
        for result in per_direction.values():
            assert 0 <= result["bleu"] <= 100 and 0 <= result["chrf"] <= 100 and 0 < result["n"] <= LIMIT
    # The ONNX path reproduces torch's greedy output, so it scores the same.
    for direction in DIRECTIONS:
        torch_hyps = [e["hypothesis"] for e in report["quality"]["torch"][direction]["examples"]]
        assert [e["hypothesis"] for e in report["quality"]["onnx"][direction]["examples"]] == torch_hyps


def test_rknn_cosines_host_cost_and_estimate(report: dict[str, Any]) -> None:
    for precision in ("w8a8", "fp16"):
        for graph in ("encoder", "decoder"):
            entry = report["rknn"][precision][graph]
            assert entry["size_bytes"] > 1000 and entry["cpu_ops"] == []
            assert all(0.9 < o["cos_min"] <= 1.0001 for o in entry["outputs"].values())
    for backend in ("onnx", "onnx-int8"):
        cost = report["host_cpu"][backend]
        assert cost["threads"] == 1 and cost["ms_per_sentence"] > 0 and 10 < cost["peak_rss_mb"] < 1000
    estimate = report["estimate"]
    assert estimate["precision"] == report["choice"]["precision"]
    assert estimate["per_token_ms"] > 0 and estimate["decoder_per_token"]["macs"] > 0
    assert estimate["assumptions"]["int8_tops"] == 3.0 and "toolkit" in estimate["decoder_per_token"]
    assert set(estimate["targets"]) >= {"latency_ms", "memory_mb", "memory_within_target"}


def test_choice_is_explained(report: dict[str, Any]) -> None:
    choice = report["choice"]
    assert choice["precision"] in ("w8a8", "fp16") and choice["precision"] in choice["reason"]
    assert set(choice["candidates"]) == {"w8a8", "fp16"}


def test_board_folder_and_markdown(deployed: tuple[Dist, Any], report: dict[str, Any]) -> None:
    dist = deployed[0]
    assert sorted(p.name for p in dist.board.iterdir()) == sorted(package.BOARD_FILES)
    assert set(report["board"]["files"]) == set(package.BOARD_FILES)
    chosen = report["choice"]["precision"]
    assert (dist.board / "decoder.rknn").read_bytes() == (dist.rknn / chosen / "decoder.rknn").read_bytes()
    runner = package.check_runner(dist.board / "rk_translate")  # aarch64, the rknn backend, glibc <= 2.28
    assert runner.glibc == (2, 17) and report["board"]["glibc"] == "glibc 2.17"
    assert "glibc 2.17" in (dist.board / "README.md").read_text()
    markdown = (dist.root / "report.md").read_text()
    assert "| backend |" in markdown and "rknn-sim:fp16" in markdown and f"Chosen precision: {chosen}" in markdown


def test_evaluate_cli_runs_the_simulator(deployed: tuple[Dist, Any], small_corpus: Path) -> None:
    done = run_module("inference.evaluate", "--model", str(deployed[0].root), "--backend", "rknn-sim",
                      "--test", str(small_corpus / "test.jsonl"), "--limit", "3", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["n"] == 3


# --------------------------------------------------------------------------- the simulator backend, recurrent


def test_rknn_sim_decodes_a_recurrent_student(rknn_python: Path, tiny_teacher: Path, small_corpus: Path,
                                              pairs: list[data.Pair], tmp_path: Path) -> None:
    student = make_student(tmp_path / "student", tiny_teacher, pairs, "recurrent", seed=1)
    dist = Dist(tmp_path / "dist")
    done = run_module("deploy.export_onnx", *export_args(student, dist.onnx, small_corpus))
    assert done.returncode == 0, done.stderr[-3000:]
    convert = subprocess.run([str(rknn_python), str(REPO / "deploy" / "convert_rknn.py"), "--onnx_dir",
                              str(dist.onnx), "--calib", str(dist.calib), "--precision", "fp16", "--out",
                              str(dist.rknn)], capture_output=True, text=True, timeout=600)
    assert convert.returncode == 0, convert.stderr[-3000:]
    sources = [[5, 6, 7, 8], [20, 30], [9, 10, 11, 12, 13, 14]]
    directions = [0, 1, 0]
    expected = backends.open_decoder(dist.root, "onnx").decode(sources, directions)
    simulated = backends.RknnSimDecoder(dist.root, "fp16", rknn_python)
    try:
        first = simulated.decode(sources, directions)
        assert simulated.decode(sources[:1], directions[:1]) == first[:1]  # one build serves many requests
    finally:
        simulated.close()
    assert simulated.proc.returncode == 0
    # fp16 rounding may flip a near-tie late in a random student's output; the first tokens must agree.
    assert [h[:2] for h in first] == [h[:2] for h in expected]


def test_rknn_sim_reports_a_bad_precision_in_one_line(rknn_python: Path, deployed: tuple[Dist, Any]) -> None:
    with pytest.raises(backends.BackendError, match="rknn-sim: unknown precision 'int3'"):
        backends.RknnSimDecoder(deployed[0].root, "int3", rknn_python)


# --------------------------------------------------------------------------- the choice, in-process


def quality(bleu: dict[str, tuple[float, float]]) -> dict[str, dict]:
    """Scores per backend and direction; chrF is BLEU + 20, enough for the reason text."""
    return {name: {d: {"bleu": b, "chrf": b + 20} for d, b in zip(DIRECTIONS, scores)} for name, scores in bleu.items()}


def test_auto_picks_the_smallest_within_one_bleu() -> None:
    scores = quality({"torch": (20.0, 15.0), "rknn-sim:w8a8": (19.5, 14.2), "rknn-sim:fp16": (20.0, 15.0),
                      "rknn-sim:w4a16": (18.5, 15.0)})
    sizes = {"w8a8": 2000, "fp16": 4000, "w4a16": 1000}
    choice = pipeline.choose_precision(scores, sizes, DIRECTIONS)
    assert choice["precision"] == "w8a8"  # w4a16 is smaller but 1.5 BLEU down in zh-en
    assert "within 1.0 BLEU" in choice["reason"] and "fp16" in choice["reason"]
    assert "zh-en BLEU 19.50 vs 20.00, chrF 39.50 vs 40.00" in choice["reason"] and "note" not in choice["reason"]


def test_auto_warns_when_bleu_cannot_separate_precisions() -> None:
    scores = quality({"torch": (0.3, 0.0), "rknn-sim:w8a8": (0.0, 0.0), "rknn-sim:fp16": (0.3, 0.0)})
    choice = pipeline.choose_precision(scores, {"w8a8": 2000, "fp16": 4000}, DIRECTIONS)
    assert choice["precision"] == "w8a8" and "torch itself scores below 1.0 BLEU" in choice["reason"]


def test_auto_falls_back_to_the_best_and_says_so() -> None:
    scores = quality({"torch": (20.0, 15.0), "rknn-sim:w8a8": (10.0, 9.0), "rknn-sim:fp16": (17.0, 13.0)})
    choice = pipeline.choose_precision(scores, {"w8a8": 2000, "fp16": 4000}, DIRECTIONS)
    assert choice["precision"] == "fp16" and choice["reason"].startswith("no precision is within 1.0 BLEU")


def test_precision_argument() -> None:
    assert pipeline.precisions_for("auto", "rv1126b") == ["w8a8", "fp16", "w4a16", "hybrid"]
    assert pipeline.precisions_for("auto", "rk3588") == ["w8a8", "fp16", "hybrid"]
    assert pipeline.precisions_for("fp16, w8a8,fp16", "rv1126b") == ["fp16", "w8a8"]
    with pytest.raises(pipeline.DeployError, match="choose auto or from"):
        pipeline.precisions_for("int4", "rv1126b")
