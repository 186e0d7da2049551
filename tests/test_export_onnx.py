"""deploy/export_onnx.py, inference/backends.py, deploy/host_cost.py: static graphs that follow docs/CONTRACTS.md
and match torch.

Tiny students of both decoder kinds are built in tmp from the tiny teacher's tokenizer (conftest) and exported with
the real command line; onnxruntime must reproduce model.generate exactly.
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoTokenizer

import corpus
import data
import vocabulary
from deploy import convert_rknn as cr
from deploy import export_onnx
from deploy.contract import DeployMeta, Dist, EmbedTables
from inference import backends
from model import StudentConfig, StudentForTranslation

REPO = Path(__file__).resolve().parents[1]
KINDS = ("transformer", "recurrent")
SRC_LEN, TGT_LEN, VOCAB = 24, 12, 400
N_PARITY, N_CALIB, N_EVAL = 12, 6, 3


def make_student(folder: Path, teacher_dir: Path, pairs: list[corpus.Pair], kind: str, seed: int = 0) -> Path:
    """A randomly initialised student folder as train_ds.py exports one: weights, tokenizer, vocabulary map.

    Its matrices are drawn wider than the model's own init (as conftest's student_folder): at that init every step
    re-emits one token whatever the source, and a decode that never varies would prove little about the loops that
    run it."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher_vocab = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]
    vocab = vocabulary.build_vocab_map(tokenizer, [p.zh for p in pairs] + [p.en for p in pairs], VOCAB, teacher_vocab)
    builder = data.ExampleBuilder(tokenizer, vocab, SRC_LEN, TGT_LEN)
    config = StudentConfig(vocab_size=vocab.size, d_model=32, n_heads=2, encoder_layers=1, decoder_layers=2,
                           ffn_dim=64, decoder=kind, max_source_len=SRC_LEN, max_target_len=TGT_LEN,
                           pad_token_id=builder.pad_id, bos_token_id=builder.bos_id, eos_token_id=builder.eos_id)
    torch.manual_seed(seed)
    student = StudentForTranslation(config)
    with torch.no_grad():
        for name, weight in student.named_parameters():
            if weight.dim() == 2 and "embed" not in name:
                weight.normal_(std=0.5)
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vocab.save(folder)
    return folder


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def export_args(student: Path, out: Path, corpus: Path) -> list[str]:
    return ["--model", str(student), "--out", str(out), "--calib", str(corpus / "valid.jsonl"),
            "--test", str(corpus / "test.jsonl"), "--n_parity", str(N_PARITY), "--n_calib", str(N_CALIB),
            "--n_eval", str(N_EVAL)]


def io_shapes(path: Path) -> dict[str, list[int]]:
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}


# --------------------------------------------------------------------------- the graphs


@pytest.mark.parametrize("kind", KINDS)
def test_graphs_follow_the_contract(exported: dict[str, Dist], kind: str) -> None:
    D, H, hd = 32, 2, 16
    cross = {"cross_k_0": [1, H, SRC_LEN, hd], "cross_v_0": [1, H, SRC_LEN, hd],
             "cross_k_1": [1, H, SRC_LEN, hd], "cross_v_1": [1, H, SRC_LEN, hd]}
    if kind == "recurrent":
        carried = {"state_0": [1, D], "state_1": [1, D]}
        outputs = {"logits": [1, VOCAB], "new_state_0": [1, D], "new_state_1": [1, D]}
    else:
        cache, step = [1, H, TGT_LEN - 1, hd], [1, H, 1, hd]
        carried = {"self_mask": [1, TGT_LEN], "self_k_0": cache, "self_v_0": cache, "self_k_1": cache,
                   "self_v_1": cache}
        outputs = {"logits": [1, VOCAB], "step_k_0": step, "step_v_0": step, "step_k_1": step, "step_v_1": step}
    contract = {"encoder": ({"src_embeds": [1, SRC_LEN, D], "src_mask": [1, SRC_LEN]}, cross),
                "decoder": ({"tok_embeds": [1, 1, D], "src_mask": [1, SRC_LEN], **cross, **carried}, outputs)}
    for name, (inputs, outs) in contract.items():
        model = onnx.load(str(exported[kind].onnx / f"{name}.onnx"))
        found = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim])
                 for v in [*model.graph.input, *model.graph.output]]
        assert found == [*inputs.items(), *outs.items()]  # names, order and static shapes
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
        assert not export_onnx.all_op_types(model.graph) & export_onnx.FORBIDDEN_OPS
        assert export_onnx.scalar_index_gathers(model) == []


def test_scalar_index_gather_fails_the_export_clearly(tmp_path: Path) -> None:
    """What `cache[layer]` exports as: RV1126B takes Gather with rank-1 indices only."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    index = onnx.helper.make_node("Constant", [], ["i"], value=onnx.helper.make_tensor("i", onnx.TensorProto.INT64,
                                                                                           [], [1]))
    graph = onnx.helper.make_graph([index, onnx.helper.make_node("Gather", ["x", "i"], ["y"], name="pick")], "g",
                                   [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              str(tmp_path / "gather.onnx"))
    with pytest.raises(export_onnx.ExportError, match=r"scalar-index Gather nodes \(pick\)"):
        export_onnx.check_graph(tmp_path / "gather.onnx", {"x": [2, 4]}, {"y": [4]})


def test_forbidden_op_fails_the_export_clearly(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Neg", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "bad.onnx"))
    with pytest.raises(export_onnx.ExportError, match="bad.onnx contains Neg, which rknn-toolkit2 cannot convert"):
        export_onnx.check_graph(tmp_path / "bad.onnx", {"x": [1, 4]}, {"y": [1, 4]})


def test_wrong_io_fails_the_export_clearly(exported: dict[str, Dist]) -> None:
    path = exported["recurrent"].onnx / "encoder.onnx"
    with pytest.raises(export_onnx.ExportError, match="docs/CONTRACTS.md expects"):
        export_onnx.check_graph(path, {"src_embeds": [1, 8, 32]}, {"cross_k_0": [1, 2, 8, 16]})


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", KINDS)
def test_onnxruntime_matches_torch(exported: dict[str, Dist], kind: str) -> None:
    parity = json.loads(exported[kind].parity.read_text())
    fp32, int8 = parity["onnx"], parity["onnx-int8"]
    assert parity["sentences"] == N_PARITY
    assert fp32["greedy_identical"] == fp32["greedy_total"] == N_PARITY and fp32["first_mismatches"] == []
    assert fp32["max_abs_diff_logits"] < 1e-4 and fp32["max_abs_diff_encoder"] < 1e-4
    assert fp32["max_abs_logit"] > 0.1  # the diffs are small relative to real logits, not to zeros
    # int8 is approximate: it runs and stays close, greedy output need not be identical.
    assert int8["greedy_total"] == N_PARITY and 0 < int8["max_abs_diff_logits"] < 0.5 * int8["max_abs_logit"]


@pytest.mark.parametrize("kind", KINDS)
def test_backend_greedy_equals_generate_on_fresh_sentences(exported: dict[str, Dist],
                                                           students: dict[str, Path], small_corpus: Path,
                                                           kind: str) -> None:
    """The backend loop on the int8 and fp32 folders, driven from outside the exporter."""
    student, builder = export_onnx.load_student(students[kind])
    requests, _ = export_onnx.requests_from(corpus.read_pairs(small_corpus / "valid.jsonl"),
                                            small_corpus / "valid.jsonl", builder, SRC_LEN, 6, ["zh-en", "en-zh"])
    expected = [export_onnx.torch_greedy(student, r) for r in requests]
    decoder = backends.open_decoder(exported[kind].root, "onnx")
    assert decoder.decode([r.source_ids for r in requests], [r.direction for r in requests]) == expected
    int8 = backends.open_decoder(exported[kind].root, "onnx-int8")
    hyps = int8.decode([r.source_ids for r in requests], [r.direction for r in requests])
    assert len(hyps) == 6 and all(len(h) <= TGT_LEN and all(0 <= t < VOCAB for t in h) for h in hyps)


# --------------------------------------------------------------------------- embed.bin and meta.json


def test_embed_bin_layout(exported: dict[str, Dist], students: dict[str, Path]) -> None:
    blob = exported["transformer"].embed.read_bytes()
    magic, vocab, width, n_dir, n_pos = struct.unpack_from("<8s4I", blob)
    assert (magic, vocab, width, n_dir, n_pos) == (b"RKEMB1\0\0", VOCAB, 32, 2, max(SRC_LEN, TGT_LEN) + 1)
    floats = np.frombuffer(blob, "<f4", offset=24)
    assert floats.size == (vocab + n_dir + n_pos) * width
    student = StudentForTranslation.from_pretrained(students["transformer"]).eval()
    token, direction, position = np.split(floats.reshape(-1, width), [vocab, vocab + n_dir])
    with torch.no_grad():
        np.testing.assert_array_equal(token, (student.embed.weight * math.sqrt(width)).numpy())
        np.testing.assert_array_equal(direction, student.direction_embed.weight.numpy())
        np.testing.assert_array_equal(position, student.positions.numpy())
        # The CPU-side sum is the model's input_embeds, bit for bit.
        ids = torch.tensor([[5, 17, 3]])
        expected = student.input_embeds(ids, torch.tensor([1]), start=4).numpy()
    tables = EmbedTables.load(exported["transformer"].embed)
    np.testing.assert_array_equal(tables.rows([5, 17, 3], 1, 4), expected)


def test_meta_json(exported: dict[str, Dist], students: dict[str, Path]) -> None:
    for kind, dist in exported.items():
        meta = DeployMeta.load(dist.meta)
        config = json.loads((students[kind] / "config.json").read_text())
        assert (meta.decoder, meta.S, meta.Tc, meta.D, meta.L, meta.H, meta.V) == (
            kind, SRC_LEN, TGT_LEN, 32, 2, 2, VOCAB)
        assert (meta.pad_id, meta.bos_id, meta.eos_id) == (config["pad_token_id"], config["bos_token_id"],
                                                           config["eos_token_id"])
        assert meta.directions == ["zh-en", "en-zh"] and meta.parameters > 10_000


def test_tokenizer_and_vocab_map_are_copied(exported: dict[str, Dist], students: dict[str, Path]) -> None:
    dist = exported["recurrent"]
    assert json.loads((dist.tokenizer / "vocab_map.json").read_text()) == json.loads(
        (students["recurrent"] / "vocab_map.json").read_text())
    assert AutoTokenizer.from_pretrained(dist.tokenizer)("打开文件").input_ids == AutoTokenizer.from_pretrained(
        students["recurrent"])("打开文件").input_ids


# --------------------------------------------------------------------------- calibration rows


@pytest.mark.parametrize("kind", KINDS)
def test_calib_and_eval_npz_load_in_the_converter(exported: dict[str, Dist], kind: str) -> None:
    dist = exported[kind]
    for path, sentences in ((dist.calib, N_CALIB), (dist.eval, N_EVAL)):
        enc = cr.load_samples(path, "encoder", cr.GraphIO.from_onnx(dist.onnx / "encoder.onnx"))
        dec = cr.load_samples(path, "decoder", cr.GraphIO.from_onnx(dist.onnx / "decoder.onnx"))
        assert len(enc) == sentences
        assert sentences < len(dec) <= sentences * export_onnx.DECODER_ROWS_PER_SENTENCE
        with np.load(path) as npz:
            for key in npz.files:
                assert npz[key].dtype == np.float32 and np.isfinite(npz[key]).all(), key
                if key.endswith("mask"):
                    assert set(np.unique(npz[key])) <= {0.0, 1.0}, key
            real = npz["encoder/src_mask"][:, 0].sum(axis=1)
            assert (real >= 1).all() and (real <= SRC_LEN).all()


def test_transformer_calib_rows_carry_real_caches(exported: dict[str, Dist]) -> None:
    """Rows come from the greedy loop: the self mask covers the last t+1 positions (the cache's last t and the step's
    own), and exactly the cache's last t positions are filled (the runner's shifting cache), the first row of each
    sentence being step 0."""
    with np.load(exported["transformer"].calib) as npz:
        masks, keys = npz["decoder/self_mask"][:, 0], npz["decoder/self_k_1"]
    steps = masks.sum(axis=1).astype(int) - 1
    assert steps[0] == 0 and steps.max() > 0
    for t, mask, cache in zip(steps, masks, keys):
        assert (mask[TGT_LEN - t - 1:] == 1).all() and (mask[:TGT_LEN - t - 1] == 0).all()
        filled = np.abs(cache).sum(axis=(0, 1, 3)) > 0  # per cache position
        assert list(filled) == [False] * (TGT_LEN - 1 - t) + [True] * t


def test_recurrent_calib_rows_carry_real_states(exported: dict[str, Dist]) -> None:
    with np.load(exported["recurrent"].calib) as npz:
        states = np.concatenate([npz["decoder/state_0"], npz["decoder/state_1"]], axis=1)
    norms = np.linalg.norm(states.reshape(len(states), -1), axis=1)
    assert norms[0] == 0 and (norms > 0).sum() >= len(states) - N_CALIB  # only step-0 rows start from zero


# --------------------------------------------------------------------------- the command lines around it


def test_host_cost_reports_time_and_memory(exported: dict[str, Dist], tmp_path: Path) -> None:
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps({"sources": [[5, 6, 7], [8, 9]], "directions": [0, 1]}))
    done = run_module("deploy.host_cost", "--dist", str(exported["recurrent"].root), "--backend", "onnx-int8",
                      "--requests", str(requests), timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n"] == 2 and result["threads"] == 1 and len(result["hypotheses"]) == 2
    assert 10 < result["peak_rss_mb"] < 400 and result["ms_per_sentence"] > 0  # numpy + onnxruntime only


def test_evaluate_runs_on_a_deploy_folder(exported: dict[str, Dist], small_corpus: Path) -> None:
    done = run_module("inference.evaluate", "--model", str(exported["transformer"].root), "--backend", "onnx",
                      "--test", str(small_corpus / "test.jsonl"), "--limit", "4", "--direction", "en-zh", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["n"] == 4 and result["direction"] == "en-zh" and 0 <= result["bleu"] <= 100
    unknown = run_module("inference.evaluate", "--model", str(exported["transformer"].root), "--backend", "tflite")
    assert unknown.returncode == 2 and "unknown backend 'tflite'" in unknown.stderr


def test_export_refuses_a_longer_source_than_the_model(students: dict[str, Path], small_corpus: Path,
                                                       tmp_path: Path) -> None:
    done = run_module("deploy.export_onnx", *export_args(students["recurrent"], tmp_path / "onnx", small_corpus),
                      "--max_source_len", str(SRC_LEN + 1))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(f"--max_source_len {SRC_LEN + 1}: must be 1..{SRC_LEN} "
                                                         "(the model's max_source_len)")


def test_shorter_source_length_exports_and_matches(students: dict[str, Path], small_corpus: Path,
                                                   tmp_path: Path) -> None:
    done = run_module("deploy.export_onnx", *export_args(students["transformer"], tmp_path / "onnx", small_corpus),
                      "--max_source_len", "16")
    assert done.returncode == 0, done.stderr[-2000:]
    parity = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert parity["onnx"]["greedy_identical"] == parity["sentences"] > 0
    assert io_shapes(tmp_path / "onnx" / "encoder.onnx")["src_embeds"] == [1, 16, 32]
