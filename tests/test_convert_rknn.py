"""deploy/convert_rknn.py: ONNX -> .rknn for rv1126b, checked in the RKNN simulator against onnxruntime.

Runs in the main venv. The converter itself runs in .venv-rknn as a subprocess (that venv is created on first use by
deploy/setup_rknn_env.sh, which takes a minute or two); its pure helpers need only numpy and are tested in-process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import fixtures_onnx as fx

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / "deploy" / "convert_rknn.py"
KINDS = ("recurrent", "transformer")

# Regression floor for w8a8 on the tiny random fixtures. Measured (rknn-toolkit2 2.5.0, rv1126b, normal algorithm,
# 8 calibration sentences x 4 steps, 2 held-out ones): worst per-sample cosine 0.9987 encoder, 0.9949 transformer
# decoder (logits), 0.9972 recurrent decoder (new_state); the attention blocks (exSDPAttention) lose the most in int8.
W8A8_MIN_COS = 0.98


# deploy/convert_rknn.py needs only numpy at import time, so the main venv can import it
sys.path.insert(0, str(REPO / "deploy"))
import convert_rknn as cr  # noqa: E402



@pytest.fixture(scope="session")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fx.Fixture]:
    root = tmp_path_factory.mktemp("onnx_fixtures")
    return {kind: fx.build_fixture(root / kind, kind) for kind in KINDS}


def run_converter(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), str(CONVERTER), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="session")
def converted(rknn_python: Path, fixtures: dict[str, fx.Fixture],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """w8a8 + fp16 conversions of both fixtures. The recurrent one forces accuracy_analysis (threshold above 1)."""
    results = {}
    for kind, fixture in fixtures.items():
        out = tmp_path_factory.mktemp(f"rknn_{kind}")
        extra = ["--analysis_cos_thresh", "1.01"] if kind == "recurrent" else []
        proc = run_converter(rknn_python, "--onnx_dir", str(fixture.onnx_dir), "--calib", str(fixture.calib),
                             "--eval", str(fixture.eval), "--precision", "w8a8", "--precision", "fp16",
                             "--target", "rv1126b", "--out", str(out), *extra)
        assert proc.returncode == 0, f"converter failed for {kind}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        results[kind] = (out, proc)
    return results


# --- the fixtures obey docs/CONTRACTS.md ------------------------------------------------------------------------

CONTRACT_SHAPES = {
    "encoder": {"src_embeds": [1, fx.SRC_LEN, fx.WIDTH], "src_mask_bias": [1, fx.SRC_LEN],
                "enc_out": [1, fx.SRC_LEN, fx.WIDTH]},
    "recurrent": {"tok_embeds": [1, 1, fx.WIDTH], "enc_out": [1, fx.SRC_LEN, fx.WIDTH],
                  "src_mask_bias": [1, fx.SRC_LEN], "state": [fx.DEC_LAYERS, 1, fx.WIDTH], "logits": [1, fx.VOCAB],
                  "new_state": [fx.DEC_LAYERS, 1, fx.WIDTH]},
    "transformer": {"tok_embeds": [1, 1, fx.WIDTH], "enc_out": [1, fx.SRC_LEN, fx.WIDTH],
                    "src_mask_bias": [1, fx.SRC_LEN],
                    "cache_k": [fx.DEC_LAYERS, fx.HEADS, fx.TGT_LEN, fx.WIDTH // fx.HEADS],
                    "cache_v": [fx.DEC_LAYERS, fx.HEADS, fx.TGT_LEN, fx.WIDTH // fx.HEADS],
                    "cache_mask_bias": [1, fx.TGT_LEN], "logits": [1, fx.VOCAB],
                    "new_cache_k": [fx.DEC_LAYERS, fx.HEADS, fx.TGT_LEN, fx.WIDTH // fx.HEADS],
                    "new_cache_v": [fx.DEC_LAYERS, fx.HEADS, fx.TGT_LEN, fx.WIDTH // fx.HEADS]},
}


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_graphs_follow_contract(fixtures: dict[str, fx.Fixture], kind: str) -> None:
    fixture = fixtures[kind]
    for graph, contract in (("encoder", "encoder"), ("decoder", kind)):
        path = fixture.onnx_dir / f"{graph}.onnx"
        assert fx.io_shapes(path) == CONTRACT_SHAPES[contract]
        assert not fx.op_types(path) & fx.FORBIDDEN_OPS, f"{graph}.onnx uses ops the NPU toolkit rejects"
        assert {o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")} == {fx.OPSET}


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_samples_have_finite_masks(fixtures: dict[str, fx.Fixture], kind: str) -> None:
    with np.load(fixtures[kind].calib) as npz:
        for key in npz.files:
            assert npz[key].dtype == np.float32 and np.isfinite(npz[key]).all(), key
            if key.endswith("mask_bias"):
                assert set(np.unique(npz[key])) <= {0.0, np.float32(fx.MASK_NEG)}, key
        if kind == "transformer":  # step t unmasks exactly the last t+1 cache positions
            real = (npz["decoder/cache_mask_bias"][:, 0, :] == 0).sum(axis=1)
            assert list(real[:4]) == [1, 2, 3, 4]


# --- converter helpers, in-process ------------------------------------------------------------------------------

def test_parse_precisions_splits_commas_and_dedupes() -> None:
    assert cr.parse_precisions(["w8a8,fp16", "hybrid", "fp16"]) == ["w8a8", "fp16", "hybrid"]


def test_build_options_reject_w4a16_off_rv1126b_and_rk3576() -> None:
    cr.BuildOptions("w4a16", "rk3576")
    with pytest.raises(cr.ConvertError, match="w4a16 needs"):
        cr.BuildOptions("w4a16", "rk3588")
    with pytest.raises(cr.ConvertError, match="unknown precision"):
        cr.BuildOptions("int4")


def test_load_samples_and_dataset_file(fixtures: dict[str, fx.Fixture], tmp_path: Path) -> None:
    io = cr.GraphIO.from_onnx(fixtures["transformer"].onnx_dir / "decoder.onnx")
    samples = cr.load_samples(fixtures["transformer"].calib, "decoder", io)
    assert len(samples) == 32 and [s.shape for s in samples[0]] == [tuple(sh) for sh in io.shapes]
    lines = cr.write_dataset(samples[:3], io, tmp_path).read_text().splitlines()
    assert len(lines) == 3
    paths = lines[1].split(" ")
    assert len(paths) == len(io.inputs)
    # Cache arrays stay NCHW: the toolkit rejects NHWC calibration files for a 4-D input.
    np.testing.assert_array_equal(np.load(paths[io.inputs.index("cache_k")]), samples[1][io.inputs.index("cache_k")])


def test_load_samples_names_the_missing_array(fixtures: dict[str, fx.Fixture]) -> None:
    io = cr.GraphIO.from_onnx(fixtures["recurrent"].onnx_dir / "decoder.onnx")
    with pytest.raises(cr.ConvertError, match="decoder/state"):
        cr.load_samples(fixtures["transformer"].calib, "decoder", io)


def test_parse_build_log_finds_cpu_ops_and_io_dtypes() -> None:
    text = textwrap.dedent("""\
        W build: The default input dtype of 'state' is changed from 'float32' to 'int8' in rknn model
        D RKNN: [06:51:00.549] 0    InputOperator  INT8  CPU  \\  (2,1,64)  0/0/0  0  InputOperator:state
        D RKNN: [06:51:00.549] 56   Conv           INT8  NPU  (1,64,1,1)  (1,500,1,1)  9000/1024/9000  0%  Conv:/head/p
        D RKNN: [06:51:00.549] 57   Reshape        INT8  CPU  (1,500,1,1),(2)  (1,500)  0/0/0  1  Reshape:/head/Reshape
        I RKNN: [06:50:01.380] Meet hybrid type, dtype: float16, tensor: /layers.0/cross/MatMul_1_output_0_sdpa
        """)
    parsed = cr.parse_build_log(text)
    assert parsed == {"cpu_ops": ["Reshape:/head/Reshape"], "io_dtypes": {"state": "int8"},
                      "hybrid_fp16_tensors": ["/layers.0/cross/MatMul_1_output_0_sdpa"]}


def test_parse_error_analysis_sorts_by_single_layer_cosine() -> None:
    text = textwrap.dedent("""\
        layer_name                                   simulator_error
        [Input] src_embeds                           1.00000 | 0.00000   1.00000 | 0.00000
        [exSDPAttention] /l0/attn_sdpa               0.96088 | 2.04455   \x1b[1;33m0.96138\x1b[0m | 2.03181
        [Conv] /l0/o                                 0.96322 | 1.23553   0.99995 | 0.04434
        """)
    assert [r["layer"] for r in cr.parse_error_analysis(text, k=2)] == ["/l0/attn_sdpa", "/l0/o"]


# --- the converter in the RKNN venv -----------------------------------------------------------------------------

def read_report(out: Path) -> dict[str, Any]:
    return json.loads((out / "rknn_report.json").read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_convert_writes_rknn_files_and_report(converted: dict[str, Any], kind: str) -> None:
    out, proc = converted[kind]
    report = read_report(out)
    assert report["target"] == "rv1126b" and report["toolkit_version"] and not report["eval_is_calib"]
    assert list(report["precisions"]) == ["w8a8", "fp16"]
    expected_outputs = [n for n in CONTRACT_SHAPES[kind] if n in ("logits", "new_state", "new_cache_k", "new_cache_v")]
    for precision, graphs in report["precisions"].items():
        assert set(graphs) == {"encoder", "decoder"}
        for name, g in graphs.items():
            rknn = out / g["file"]
            assert rknn == out / precision / f"{name}.rknn" and rknn.stat().st_size == g["size_bytes"] > 10_000
            assert g["build_seconds"] > 0 and (out / g["log"]).is_file()
            assert list(g["outputs"]) == (["enc_out"] if name == "encoder" else expected_outputs)
            assert g["cpu_ops"] == [], f"{precision} {name}: ops fell back to the CPU: {g['cpu_ops']}"
    assert "precision" in proc.stdout and "w8a8" in proc.stdout  # the compact table


@pytest.mark.parametrize("kind", KINDS)
def test_simulator_matches_onnxruntime(converted: dict[str, Any], kind: str) -> None:
    report = read_report(converted[kind][0])
    for name, g in report["precisions"]["fp16"].items():
        for output, s in g["outputs"].items():
            assert s["cos_min"] > 0.99, f"fp16 {name}.{output}: {s}"
    for name, g in report["precisions"]["w8a8"].items():
        for output, s in g["outputs"].items():
            assert s["cos_min"] > W8A8_MIN_COS, f"w8a8 {name}.{output}: {s}"
        # int8 I/O: the board runner must pass floats with want_float / let the runtime convert.
        assert set(g["io_dtypes"].values()) == {"int8"}
    assert report["precisions"]["fp16"]["decoder"]["outputs"]["logits"]["argmax_agree"] >= 0.75


def test_accuracy_analysis_names_layers(converted: dict[str, Any]) -> None:
    report = read_report(converted["recurrent"][0])
    for precision, graphs in report["precisions"].items():
        for name, g in graphs.items():
            worst = g["worst_layers"]
            assert 0 < len(worst) <= cr.N_WORST_LAYERS, f"{precision} {name}"
            assert all(isinstance(w["layer"], str) and 0 <= w["single_cos"] <= 1.0001 for w in worst)
            assert [w["single_cos"] for w in worst] == sorted(w["single_cos"] for w in worst)


def test_errors_are_one_clear_line(rknn_python: Path, fixtures: dict[str, fx.Fixture], tmp_path: Path) -> None:
    fixture = fixtures["recurrent"]
    args = ["--onnx_dir", str(fixture.onnx_dir), "--calib", str(fixture.calib), "--out", str(tmp_path)]
    proc = run_converter(rknn_python, *args, "--precision", "w4a16", "--target", "rk3588")
    assert proc.returncode == 2 and "w4a16 needs one of ['rk3576', 'rv1126b']" in proc.stderr
    proc = subprocess.run([sys.executable, str(CONVERTER), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "run `bash deploy/setup_rknn_env.sh`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


SIMULATED_DECODE = """
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
import convert_rknn as cr

onnx_dir, calib, work = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
with np.load(calib) as npz:
    src, mask = npz["encoder/src_embeds"][0], npz["encoder/src_mask_bias"][0]
    toks = npz["decoder/tok_embeds"][:3]
sessions = {g: cr.ort_session(onnx_dir / f"{g}.onnx") for g in cr.GRAPHS}
cache = {"cache_k": np.zeros([2, 4, 16, 16], np.float32), "cache_v": np.zeros([2, 4, 16, 16], np.float32)}
cosines = []
with cr.SimulatedModel(onnx_dir, cr.BuildOptions("fp16"), None, work) as model:
    enc = model.run("encoder", {"src_embeds": src, "src_mask_bias": mask})["enc_out"]
    sim_cache, ref_cache = dict(cache), dict(cache)
    for t, tok in enumerate(toks):  # feed each step's cache back, as the greedy loop will
        bias = np.full([1, 16], -1e4, np.float32)
        bias[:, 16 - t - 1:] = 0.0
        feeds = {"tok_embeds": tok, "enc_out": enc, "src_mask_bias": mask, "cache_mask_bias": bias}
        sim = model.run("decoder", {**feeds, **sim_cache})
        ref = dict(zip(["logits", "new_cache_k", "new_cache_v"], sessions["decoder"].run(None, {**feeds, **ref_cache})))
        cosines.append(cr.cosine(sim["logits"], ref["logits"]))
        assert sim["logits"].shape == (1, 500) and sim["new_cache_k"].shape == (2, 4, 16, 16)
        sim_cache = {"cache_k": sim["new_cache_k"], "cache_v": sim["new_cache_v"]}
        ref_cache = {"cache_k": ref["new_cache_k"], "cache_v": ref["new_cache_v"]}
one_shot = cr.simulate("fp16", onnx_dir, None, {"encoder": [{"src_embeds": src, "src_mask_bias": mask}]})
cosines.append(cr.cosine(one_shot["encoder"][0]["enc_out"], enc))
print(json.dumps({"cosines": cosines}))
"""


def test_simulated_model_drives_decoder_steps(rknn_python: Path, fixtures: dict[str, fx.Fixture],
                                              tmp_path: Path) -> None:
    fixture = fixtures["transformer"]
    proc = subprocess.run([str(rknn_python), "-c", SIMULATED_DECODE, str(CONVERTER.parent), str(fixture.onnx_dir),
                           str(fixture.calib), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cosines = json.loads(proc.stdout.strip().splitlines()[-1])["cosines"]
    assert len(cosines) == 4 and min(cosines) > 0.99  # 3 decoder steps, then simulate() on the encoder
