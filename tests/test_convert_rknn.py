"""deploy/convert_rknn.py: ONNX -> .rknn for rv1126b, checked in the RKNN simulator against onnxruntime.

Runs in the main venv. The converter itself runs in .venv-rknn as a subprocess (that venv is created on first use by
deploy/setup_rknn_env.sh, which takes a minute or two); its pure helpers need only numpy and are tested in-process.
The graphs are the real exports of tiny students of both decoder kinds (conftest's `exported`), so the toolkit's
report on them is what a user's model gets: no op falls back to the CPU on rv1126b.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deploy import convert_rknn as cr  # numpy only at import time, so the main venv can import it too
from deploy.contract import DeployMeta, Dist, contract_io

REPO = Path(__file__).resolve().parents[1]
KINDS = ("recurrent", "transformer")

# Regression floor for w8a8 on the tiny random students. Measured (rknn-toolkit2 2.5.0, rv1126b, normal algorithm,
# calibration rows of 6 sentences, 3 held-out ones): worst per-sample cosine 0.993 encoder outputs, 0.93 transformer
# logits, 0.984 recurrent logits (exSDPAttention loses the most in int8; with -1e4 mask biases in the graphs, 0.46 and
# 0.49: model.STATIC_MASK_BIAS).
W8A8_MIN_COS = 0.9


def run_converter(python: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-m", "deploy.convert_rknn", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


@pytest.fixture(scope="session")
def converted(rknn_python: Path, exported: dict[str, Dist],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """w8a8 + fp16 conversions of both students. The recurrent one forces accuracy_analysis (threshold above 1)."""
    results = {}
    for kind, dist in exported.items():
        out = tmp_path_factory.mktemp(f"rknn_{kind}")
        extra = ["--analysis_cos_thresh", "1.01"] if kind == "recurrent" else []
        proc = run_converter(rknn_python, "--onnx_dir", str(dist.onnx), "--calib", str(dist.calib),
                             "--eval", str(dist.eval), "--precision", "w8a8", "--precision", "fp16",
                             "--target", "rv1126b", "--out", str(out), *extra)
        assert proc.returncode == 0, f"converter failed for {kind}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        results[kind] = (out, proc)
    return results


# --- converter helpers, in-process ------------------------------------------------------------------------------

def test_parse_precisions_splits_commas_and_dedupes() -> None:
    assert cr.parse_precisions(["w8a8,fp16", "hybrid", "fp16"]) == ["w8a8", "fp16", "hybrid"]


def test_build_options_reject_w4a16_off_rv1126b_and_rk3576() -> None:
    cr.BuildOptions("w4a16", "rk3576")
    with pytest.raises(cr.ConvertError, match="w4a16 needs"):
        cr.BuildOptions("w4a16", "rk3588")
    with pytest.raises(cr.ConvertError, match="unknown precision"):
        cr.BuildOptions("int4")


def test_load_samples_and_dataset_file(exported: dict[str, Dist], tmp_path: Path) -> None:
    dist = exported["transformer"]
    io = cr.GraphIO.from_onnx(dist.onnx / "decoder.onnx")
    samples = cr.load_samples(dist.calib, "decoder", io)
    assert len(samples) > 6 and [s.shape for s in samples[0]] == [tuple(sh) for sh in io.shapes]
    lines = cr.write_dataset(samples[:3], io, tmp_path).read_text().splitlines()
    assert len(lines) == 3
    paths = lines[1].split(" ")
    assert len(paths) == len(io.inputs)
    # Cache arrays stay NCHW: the toolkit rejects NHWC calibration files for a 4-D input.
    index = io.inputs.index("self_k_1")
    np.testing.assert_array_equal(np.load(paths[index]), samples[1][index])


def test_load_samples_names_the_missing_array(exported: dict[str, Dist]) -> None:
    io = cr.GraphIO.from_onnx(exported["recurrent"].onnx / "decoder.onnx")
    with pytest.raises(cr.ConvertError, match="decoder/state_0"):
        cr.load_samples(exported["transformer"].calib, "decoder", io)


def test_parse_build_log_finds_cpu_ops_dtypes_and_io_dtypes() -> None:
    text = textwrap.dedent("""\
        W build: The default input dtype of 'state' is changed from 'float32' to 'int8' in rknn model
        D RKNN: [06:51:00.549] 0    InputOperator  INT8  CPU  \\  (2,1,64)  0/0/0  0  InputOperator:state
        D RKNN: [06:51:00.549] 56   Conv           INT8  NPU  (1,64,1,1)  (1,500,1,1)  9000/1024/9000  0%  Conv:/head/p
        D RKNN: [06:51:00.549] 57   Reshape        INT8  CPU  (1,500,1,1),(2)  (1,500)  0/0/0  1  Reshape:/head/Reshape
        D RKNN: [06:51:00.549] 58   exNorm         FLOAT16  NPU  (1,64,1,16)  (1,64,1,16)  0/0/0  2  exNorm:/n
        """)
    parsed = cr.parse_build_log(text)
    assert parsed == {"cpu_ops": ["Reshape:/head/Reshape"],
                      "placement": {"NPU": {"Conv": 1, "exNorm": 1}, "CPU": {"Reshape": 1}},
                      "layer_dtypes": {"Conv": {"INT8": 1}, "Reshape": {"INT8": 1}, "exNorm": {"FLOAT16": 1}},
                      "io_dtypes": {"state": "int8"}}


# The toolkit's .quantization.cfg as hybrid_quantization_step1 writes it (rknn-toolkit2 2.5.0, abridged).
STEP1_CFG = textwrap.dedent("""\
    custom_quantize_layers: {}
    quantize_parameters:
        src_mask:
            qtype: asym
            dtype: float32
            scale: []
            zero_point: []
        src_mask_int8:
            qtype: asym
            dtype: int8
            min:
            -   0.0
            max:
            -   1.0
            scale:
            -   0.00392156862745098
            zero_point:
            -   -128
        scaled_int8:
            dtype: int8
            scale:
            -   0.00784313725490196
            zero_point:
            -   0
    """)


def test_mask_quantization_reads_the_step1_cfg() -> None:
    assert cr.tensor_parameters(STEP1_CFG, "src_mask_int8") == (0.00392156862745098, -128)
    assert cr.tensor_parameters(STEP1_CFG, "src_mask") is None and cr.tensor_parameters(STEP1_CFG, "absent") is None
    masks = cr.mask_quantization(STEP1_CFG, {"src_mask": "src_mask_int8", "self_mask": "scaled_int8"},
                                 ["src_mask", "self_mask", "other_mask"])
    assert masks["src_mask"] == {"quantized": True, "scale": 0.00392156862745098, "zero_point": -128, "exact": True}
    # [-1, 1] around zero point 0: 1.0 comes back as 127/127.5
    assert masks["self_mask"]["exact"] is False and masks["other_mask"] == {"quantized": False, "exact": True}


def test_keep_float16_fills_custom_quantize_layers() -> None:
    edited = cr.keep_float16(STEP1_CFG, ["/l0/attn/MatMul_1_output_0_sdpa", "/l0/norm1/LayerNormalization#1"])
    assert edited.startswith("custom_quantize_layers:\n    /l0/attn/MatMul_1_output_0_sdpa: float16\n"
                             "    /l0/norm1/LayerNormalization#1: float16\nquantize_parameters:\n")
    assert cr.keep_float16(STEP1_CFG, []) == STEP1_CFG
    with pytest.raises(cr.ConvertError, match="no empty custom_quantize_layers"):
        cr.keep_float16(edited, ["x"])


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


def contract_outputs(dist: Dist) -> dict[str, list[str]]:
    io = contract_io(DeployMeta.load(dist.meta))
    return {graph: list(outputs) for graph, (_, outputs) in io.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_convert_writes_rknn_files_and_report(converted: dict[str, Any], exported: dict[str, Dist],
                                              kind: str) -> None:
    out, proc = converted[kind]
    report = read_report(out)
    assert report["target"] == "rv1126b" and report["toolkit_version"] and not report["eval_is_calib"]
    assert list(report["precisions"]) == ["w8a8", "fp16"]
    outputs = contract_outputs(exported[kind])
    for precision, graphs in report["precisions"].items():
        assert set(graphs) == {"encoder", "decoder"}
        for name, g in graphs.items():
            rknn = out / g["file"]
            assert rknn == out / precision / f"{name}.rknn" and rknn.stat().st_size == g["size_bytes"] > 10_000
            assert g["build_seconds"] > 0 and (out / g["log"]).is_file()
            assert list(g["outputs"]) == outputs[name]
    assert "precision" in proc.stdout and "w8a8" in proc.stdout  # the compact table


@pytest.mark.parametrize("kind", KINDS)
def test_no_op_falls_back_to_the_cpu_on_rv1126b(converted: dict[str, Any], kind: str) -> None:
    """The toolkit's own placement (its build log's layer table) of the exported graphs: every op on the NPU, at
    both precisions; attention fused into exSDPAttention and layer norms into exNorm."""
    report = read_report(converted[kind][0])
    for precision, graphs in report["precisions"].items():
        for name, g in graphs.items():
            assert g["cpu_ops"] == [] and set(g["placement"]) == {"NPU"}, f"{precision} {name}: {g['placement']}"
            assert g["placement"]["NPU"].get("exSDPAttention", 0) > 0 and g["placement"]["NPU"].get("exNorm", 0) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_simulator_matches_onnxruntime(converted: dict[str, Any], kind: str) -> None:
    report = read_report(converted[kind][0])
    for name, g in report["precisions"]["fp16"].items():
        for output, s in g["outputs"].items():
            assert s["cos_min"] > 0.99, f"fp16 {name}.{output}: {s}"
    for name, g in report["precisions"]["w8a8"].items():
        for output, s in g["outputs"].items():
            assert s["cos_min"] > W8A8_MIN_COS, f"w8a8 {name}.{output}: {s}"
        # int8 I/O: the board runner converts to and from the models' own types (deploy/runtime/tensor.c).
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


def test_errors_are_one_clear_line(rknn_python: Path, exported: dict[str, Dist], tmp_path: Path) -> None:
    dist = exported["recurrent"]
    args = ["--onnx_dir", str(dist.onnx), "--calib", str(dist.calib), "--out", str(tmp_path)]
    proc = run_converter(rknn_python, *args, "--precision", "w4a16", "--target", "rk3588")
    assert proc.returncode == 2 and "w4a16 needs one of ['rk3576', 'rv1126b']" in proc.stderr
    proc = run_converter(Path(sys.executable), *args, timeout=120)
    assert proc.returncode == 2 and "run `bash deploy/setup_rknn_env.sh`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


SIMULATED_DECODE = """
import json, sys
from pathlib import Path
from deploy import contract, rknn_sim_eval as sim  # the rknn-sim worker's own module and the loop it runs
from deploy.onnx_step_model import OnnxStepModel
cr = sim.cr

dist, work = contract.Dist(Path(sys.argv[1])), Path(sys.argv[2])
meta, tables = contract.DeployMeta.load(dist.meta), contract.EmbedTables.load(dist.embed)
onnx = OnnxStepModel(dist.onnx)
cosines = []


class Beside:
    # the simulator's steps carried by the greedy loop, onnxruntime run on the very same inputs
    def __init__(self, model):
        self.simulated = sim.SimulatorStepModel(model)

    def run_encoder(self, feeds):
        return self.simulated.run_encoder(feeds)

    def run_decoder(self, feeds):
        got = self.simulated.run_decoder(feeds)
        cosines.append(cr.cosine(got["logits"], onnx.run_decoder(feeds)["logits"]))
        return got


with cr.SimulatedModel(dist.onnx, cr.BuildOptions("fp16"), None, work) as model:
    contract.greedy(Beside(model), tables, meta, [5, 6, 7, 8, 9], 0)
source = contract.source_inputs(tables, meta, [5, 6, 7, 8, 9], 0)
one_shot = cr.simulate("fp16", dist.onnx, None, {"encoder": [source]})["encoder"][0]
cosines.append(cr.cosine(one_shot["cross_v_1"], onnx.run_encoder(source)["cross_v_1"]))
print(json.dumps({"cosines": cosines}))
"""


def test_simulated_model_drives_decoder_steps(rknn_python: Path, exported: dict[str, Dist],
                                              tmp_path: Path) -> None:
    """The rknn-sim backend's step model under the greedy loop (caches shifted step to step) stays with onnxruntime
    on the same inputs, every step; simulate() one-shot too."""
    proc = subprocess.run([str(rknn_python), "-c", SIMULATED_DECODE, str(exported["transformer"].root),
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cosines = json.loads(proc.stdout.strip().splitlines()[-1])["cosines"]
    assert len(cosines) >= 2 and min(cosines) > 0.99
