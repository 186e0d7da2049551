import argparse
import json

import pytest

import config as cfg_lib


def parse(argv):
    parser = argparse.ArgumentParser()
    cfg_lib.add_arguments(parser)
    return cfg_lib.from_args(parser.parse_args(argv))


def test_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: bergamot\n  dropout: 0.2\ntrain:\n  lr: 0.002\n")
    cfg = parse(["--config", str(path), "--model.dropout", "0.3", "--max_steps", "7"])
    assert (cfg.model.preset, cfg.model.decoder, cfg.model.encoder_layers, cfg.model.ffn_dim) == \
        ("bergamot", "recurrent", 6, 1536)
    assert cfg.model.dropout == 0.3 and cfg.train.lr == 0.002 and cfg.train.max_steps == 7
    assert cfg.data.vocab_size == 32000


def test_json_file_and_lists(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": {"directions": ["en-zh"]}, "distill": {"kd_loss": "jsd"}}))
    cfg = parse(["--config", str(path), "--preset", "balanced"])
    assert cfg.data.directions == ["en-zh"] and cfg.distill.kd_loss == "jsd" and cfg.model.d_model == 320
    assert parse(["--data.directions", "zh-en,en-zh"]).data.directions == ["zh-en", "en-zh"]


def test_a_bare_switch_means_true():
    assert parse([]).distill.seq_kd is True
    assert parse(["--seq_kd", "false"]).distill.seq_kd is False
    assert parse(["--seq_kd", "false", "--seq_kd"]).distill.seq_kd is True
    assert parse(["--trust_remote_code", "--max_steps", "3"]).train.trust_remote_code is True


@pytest.mark.parametrize("argv, message", [
    (["--model.d_model", "8"], "model.d_model: 8 is out of range; allowed 16 to 2048"),
    (["--model.decoder", "lstm"], "model.decoder: 'lstm' is not allowed; choose one of transformer, recurrent"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--model.n_heads", "3"], "does not divide model.d_model=128"),
    (["--train.lr", "fast"], "train.lr: expected float, got 'fast'"),
    (["--data.directions", "zh-fr"], "data.directions"),
])
def test_bad_values_name_the_field(argv, message):
    with pytest.raises(cfg_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(argv)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {"width": 3}}))
    with pytest.raises(cfg_lib.ConfigError, match="unknown config key 'model.width'"):
        parse(["--config", str(path)])


def test_saved_config_round_trips(tmp_path):
    cfg = parse(["--preset", "performance", "--train.seed", "9"])
    cfg.save(tmp_path / "config.json")
    assert cfg_lib.from_json_file(tmp_path / "config.json") == cfg


def test_a_saved_config_with_a_section_since_removed_still_loads(tmp_path):
    """A run saved before config.py lost its deploy section (deploy/ takes its own flags) still loads, for export and
    as --config."""
    cfg = parse(["--preset", "bergamot"])
    saved = {**cfg.to_dict(), "deploy": {"target": "rv1126b", "precision": "auto", "opset": 17}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert cfg_lib.from_json_file(tmp_path / "config.json") == cfg
    # and as --config, the way scripts/convert_checkpoint.sh resumes a run
    assert parse(["--config", str(tmp_path / "config.json")]) == cfg


def test_every_field_has_help():
    parser = argparse.ArgumentParser()
    cfg_lib.add_arguments(parser)
    assert all(action.help for action in parser._actions)


def test_gpu_defaults_are_a_layer_under_the_preset_the_file_and_the_flags(tmp_path):
    parser = argparse.ArgumentParser()
    cfg_lib.add_arguments(parser)
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  tokens_per_batch: 2048\n")
    args = parser.parse_args(["--config", str(path), "--log_every", "7", "--preset", "balanced"])
    gpu, cpu = cfg_lib.from_args(args, on_gpu=True), cfg_lib.from_args(args)
    assert (gpu.data.tokens_per_batch, gpu.train.log_every, gpu.train.eval_every, gpu.distill.seq_kd_batch) == \
        (2048, 7, 1000, 256)
    assert (cpu.data.tokens_per_batch, cpu.train.log_every, cpu.train.eval_every, cpu.distill.seq_kd_batch) == \
        (2048, 7, 100, 64)
    assert gpu.model == cpu.model and gpu.model.d_model == 320
    assert "validate (loss, BLEU, chrF) every N steps (range 1 to 1e+09) [default: 100; on GPUs 1000]" in \
        " ".join(parser.format_help().split())
