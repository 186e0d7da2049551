"""deploy/contract.py: the Python side of the DIST folder, numpy only, and the greedy loop every backend runs.

The real exports are checked against it in tests/test_export_onnx.py and the board runner in tests/test_runtime.py;
here its pieces run on small hand-made shapes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy import contract

REPO = Path(__file__).resolve().parents[1]
PAD, BOS, EOS = 0, 1, 2


def small_meta(decoder: str) -> contract.DeployMeta:
    """S 4, Tc 3 (a cache of 2 positions), D 4, one layer, two heads, V 6."""
    return contract.DeployMeta(decoder, 4, 3, 4, 1, 2, 6, PAD, BOS, EOS, ["zh-en", "en-zh"], 5, 0)


def random_tables(meta: contract.DeployMeta) -> contract.EmbedTables:
    rng = np.random.default_rng(0)
    return contract.EmbedTables(*(rng.standard_normal((rows, meta.D), dtype=np.float32)
                                  for rows in (meta.V, len(meta.directions), meta.max_positions)))


class ScriptedStepModel:
    """Emits the scripted tokens, one a step; step t's key and value (or new state) are filled with t + 1, so where
    each one lands in the carried inputs shows how the loop carries them. Keeps every decoder call's inputs."""

    def __init__(self, meta: contract.DeployMeta, tokens: list[int]) -> None:
        self.meta, self.tokens = meta, tokens
        self.io = contract.contract_io(meta)
        self.decoder_feeds: list[contract.Feeds] = []

    def run_encoder(self, feeds: contract.Feeds) -> contract.Feeds:
        return {name: np.zeros(shape, np.float32) for name, shape in self.io["encoder"][1].items()}

    def run_decoder(self, feeds: contract.Feeds) -> contract.Feeds:
        step = len(self.decoder_feeds)
        self.decoder_feeds.append(feeds)
        outputs = {name: np.full(shape, step + 1.0, np.float32) for name, shape in self.io["decoder"][1].items()}
        outputs["logits"] = np.eye(self.meta.V, dtype=np.float32)[None, self.tokens[step]]
        return outputs


def test_the_contract_imports_numpy_alone() -> None:
    """The RKNN venv (no torch, no transformers) imports it, and so does deploy/host_cost.py's ONNX-only process."""
    code = "import sys, deploy.contract; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "numpy" in loaded
    assert not loaded & {"torch", "transformers", "onnxruntime", "tqdm", "inference", "data", "config"}


def test_embed_bin_round_trips_and_a_garbled_one_is_refused(tmp_path: Path) -> None:
    meta = small_meta("transformer")
    tables = random_tables(meta)
    path = tmp_path / "embed.bin"
    path.write_bytes(tables.to_bytes())
    assert path.read_bytes()[:contract.EMBED_HEADER.size] == contract.EMBED_HEADER.pack(
        contract.EMBED_MAGIC, meta.V, meta.D, len(meta.directions), meta.max_positions)
    loaded = contract.EmbedTables.load(path)
    for got, want in zip((loaded.token, loaded.direction, loaded.position),
                         (tables.token, tables.direction, tables.position)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.rows([3, 4], 1, 2),
                                  (tables.token[[3, 4]] + tables.direction[1] + tables.position[2:4])[None])
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(contract.ContractError, match="not an embed.bin"):
        contract.EmbedTables.load(path)
    with pytest.raises(contract.ContractError, match="export the model first"):
        contract.DeployMeta.load(tmp_path / "meta.json")


def test_meta_json_round_trips(tmp_path: Path) -> None:
    meta = small_meta("recurrent")
    meta.save(tmp_path / "meta.json")
    assert contract.DeployMeta.load(tmp_path / "meta.json") == meta


def test_greedy_shifts_the_transformer_cache_as_the_runner_does() -> None:
    meta = small_meta("transformer")
    tables = random_tables(meta)
    model = ScriptedStepModel(meta, [3, 4, EOS])
    assert contract.greedy(model, tables, meta, [3, 5], 1) == [3, 4]
    masks = [feeds["self_mask"][0].tolist() for feeds in model.decoder_feeds]
    assert masks == [[0, 0, 1], [0, 1, 1], [1, 1, 1]]
    caches = [feeds["self_k_0"][0, 0, :, 0].tolist() for feeds in model.decoder_feeds]
    assert caches == [[0, 0], [0, 1], [1, 2]]  # step t's key appended last, the oldest position dropped
    fed = [feeds["tok_embeds"] for feeds in model.decoder_feeds]
    for step, token in enumerate([BOS, 3, 4]):
        np.testing.assert_array_equal(fed[step], tables.rows([token], 1, step))


def test_greedy_replaces_the_recurrent_state_and_stops_at_tc() -> None:
    meta = small_meta("recurrent")
    model = ScriptedStepModel(meta, [3, 4, 5])
    assert contract.greedy(model, random_tables(meta), meta, [3], 0) == [3, 4, 5]  # Tc steps, no eos
    assert [float(feeds["state_0"][0, 0]) for feeds in model.decoder_feeds] == [0.0, 1.0, 2.0]


def test_a_source_longer_than_the_graphs_is_refused() -> None:
    meta = small_meta("recurrent")
    with pytest.raises(contract.ContractError, match="source has 5 tokens; the exported graphs take at most 4"):
        contract.source_inputs(random_tables(meta), meta, [3] * 5, 0)


def test_fidelity_sums_the_worker_checks() -> None:
    checks = [{"fp32": [3, 4, EOS], "argmax": [3, 4, EOS],
               "cosines": {"encoder": {"cross_k_0": [1.0]}, "decoder": {"logits": [1.0, 0.9, 0.8]}}},
              {"fp32": [5, EOS], "argmax": [4, EOS],
               "cosines": {"encoder": {"cross_k_0": [0.5]}, "decoder": {"logits": [0.7, 0.6]}}}]
    summary = contract.fidelity(checks)
    assert (summary["sentences"], summary["steps"], summary["agreeing_steps"]) == (2, 5, 4)
    assert summary["agreement"] == pytest.approx(0.8)
    assert summary["graphs"]["encoder"]["cosine"] == pytest.approx(0.75)
    assert summary["graphs"]["decoder"]["outputs"]["logits"] == {"mean": pytest.approx(0.8), "min": pytest.approx(0.6)}
    assert summary["disagreeing_sentences"] == 1 and summary["first_disagreements"] == [{"fp32": [5, EOS],
                                                                                         "argmax": [4, EOS]}]


def test_default_precision_is_the_deploy_choice_else_the_first_converted(tmp_path: Path) -> None:
    dist = contract.Dist(tmp_path)
    with pytest.raises(contract.ContractError, match="convert first"):
        contract.default_precision(dist)
    dist.rknn.mkdir()
    dist.rknn_report.write_text(json.dumps({"precisions": {"fp16": {}, "w8a8": {}}}))
    assert contract.default_precision(dist) == "fp16"
    dist.report.write_text(json.dumps({"choice": {"precision": "w8a8"}}))
    assert contract.default_precision(dist) == "w8a8"
