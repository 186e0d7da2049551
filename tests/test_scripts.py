"""The README's launch commands, run for real on two CPU ranks and driven by their variables:
scripts/run_teacher_sft.sh (it trains the shared sft_run in conftest.py), scripts/run_distill.sh on one node and
through a hostfile, scripts/tensorboard.sh, and quickstart's deploy/report stages with the deploy output in the run
folder. Each script prints its resolved command first; the checks read the run's own config.json and metrics.jsonl
to see that every variable reached train_ds.py.

The README's multi-node command (two ssh-reached workers) cannot start here, so its DRY_RUN=1 command is fed to
DeepSpeed's own runner code, which must turn it into one pdsh launch over both workers of the hostfile.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPT_VARIABLES, run_script, step_losses
from engine import free_port

# Two optimiser steps, one evaluation and one checkpoint: the whole run, as small as it gets.
TINY = ["--max_steps", "2", "--eval_every", "2", "--save_every", "2", "--log_every", "1",
        "--data.valid_subset", "4", "--data.vocab_size", "600"]


def printed_command(output: str, name: str) -> list[str]:
    """The one `NAME: cmd ...` line a script prints before it runs anything, split as the shell would."""
    lines = [line for line in output.splitlines() if line.startswith(f"{name}: ")]
    assert len(lines) == 1, output[-3000:]
    return shlex.split(lines[0][len(name) + 2:])


def split_at_script(cmd: list[str]) -> tuple[list[str], list[str]]:
    """(launcher flags, train_ds.py flags) of a `deepspeed ... train_ds.py ...` command."""
    assert cmd[0] == ".venv/bin/deepspeed", cmd
    at = cmd.index("train_ds.py")
    return cmd[1:at], cmd[at + 1:]


def flag(args: list[str], name: str) -> str:
    """The value after the last NAME in args (the one argparse keeps)."""
    at = len(args) - 1 - args[::-1].index(name)
    return args[at + 1]


def resolved_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_run_teacher_sft_sh(sft_run, run_root, tiny_teacher, small_corpus):
    cmd = printed_command((run_root / "sft.launch.log").read_text(), "run_teacher_sft")
    launcher, args = split_at_script(cmd)
    assert flag(launcher, "--num_gpus") == "2" and flag(launcher, "--master_port").isdigit()
    assert "--hostfile" not in launcher
    assert [flag(args, f) for f in ("--stage", "--teacher", "--data", "--out", "--grad_accum", "--lr")] == \
        ["sft", str(tiny_teacher), str(small_corpus), str(sft_run), "1", "3e-3"]
    cfg = resolved_config(sft_run)
    assert cfg["train"]["teacher"] == str(tiny_teacher) and cfg["data"]["path"] == str(small_corpus)
    assert (cfg["train"]["grad_accum"], cfg["train"]["lr"], cfg["train"]["micro_batch_size"]) == (1, 3e-3, 8)
    assert cfg["train"]["ds_config"] == "ds_configs/zero3.json"  # the script's DS_CONFIG default
    assert (sft_run / "final" / "config.json").is_file()


def test_run_distill_sh(sft_run, small_corpus, tmp_path):
    out = tmp_path / "distill"
    env = {"TEACHER": str(sft_run / "final"), "DATA": str(small_corpus), "PRESET": "tiny", "OUT": str(out),
           "NUM_GPUS": "2", "MASTER_PORT": str(free_port()), "MICRO_BATCH": "4", "LR": "2e-3",
           "KD_LOSS": "reverse_kl", "EPOCHS": "1"}
    result = run_script("run_distill.sh", env, *TINY)
    launcher, args = split_at_script(printed_command(result.stdout, "run_distill"))
    assert flag(launcher, "--master_port") == env["MASTER_PORT"] and flag(launcher, "--num_gpus") == "2"
    assert flag(args, "--preset") == "tiny" and flag(args, "--kd_loss") == "reverse_kl"
    cfg = resolved_config(out)
    assert cfg["model"]["preset"] == "tiny" and cfg["distill"]["kd_loss"] == "reverse_kl"
    assert (cfg["train"]["lr"], cfg["train"]["micro_batch_size"], cfg["train"]["max_steps"]) == (2e-3, 4, 2)
    assert cfg["train"]["teacher_ds_config"] == "ds_configs/teacher_zero3.json"
    assert sorted(step_losses(out)) == [1, 2]
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "vocab_map.json").is_file()


def test_run_distill_sh_through_a_localhost_hostfile(sft_run, small_corpus, tmp_path):
    """A hostfile of one `localhost slots=2` line takes DeepSpeed's hostfile path (the world comes from the file).
    DeepSpeed 0.19.8 would still ssh to localhost to check it and to look up the master's address, so the ssh
    check is skipped and the address given; with a single host it then starts the ranks locally, without pdsh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# this machine only\nlocalhost slots=2\n")
    out = tmp_path / "distill"
    env = {"HOSTFILE": str(hostfile), "NUM_NODES": "1", "MASTER_ADDR": "127.0.0.1", "LAUNCHER_ARGS": "--no_ssh_check",
           "MASTER_PORT": str(free_port()), "NUM_GPUS": "2", "TEACHER": str(sft_run / "final"),
           "DATA": str(small_corpus), "PRESET": "tiny", "OUT": str(out), "MICRO_BATCH": "4"}
    result = run_script("run_distill.sh", env, *TINY)
    launcher, _ = split_at_script(printed_command(result.stdout, "run_distill"))
    assert [flag(launcher, f) for f in ("--hostfile", "--num_nodes", "--master_addr", "--master_port")] == \
        [str(hostfile), "1", "127.0.0.1", env["MASTER_PORT"]]
    assert "--no_ssh_check" in launcher
    worlds = re.findall(r"--world_info=(\S+)", result.stdout + result.stderr)  # DeepSpeed logs `cmd = ...`
    assert worlds, result.stderr[-3000:]
    assert json.loads(base64.urlsafe_b64decode(worlds[0])) == {"localhost": [0, 1]}
    assert sorted(step_losses(out)) == [1, 2] and (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("script, env, expected", [
    ("run_teacher_sft.sh", {"TEACHER": "/models/Qwen1.5-1.8B", "DATA": "data/catalogs", "NUM_GPUS": "4"},
     {"--stage": "sft", "--teacher": "/models/Qwen1.5-1.8B", "--out": "runs/sft"}),
    ("run_distill.sh", {"TEACHER": "runs/sft/final", "PRESET": "balanced", "NUM_GPUS": "4"},
     {"--stage": "distill", "--teacher": "runs/sft/final", "--preset": "balanced", "--out": "runs/distill-balanced"}),
], ids=["sft", "distill"])
def test_readme_commands_resolve(script, env, expected):
    """The README's exact variable settings (a 4-GPU node that is not here) resolve to a command that
    train_ds.py's own parser accepts, with every flag in range."""
    import config as config_lib
    import engine
    result = run_script(script, {**env, "DRY_RUN": "1"}, timeout=30)
    name = script.removesuffix(".sh")
    assert result.stdout.startswith(f"{name}: ") and len(result.stdout.splitlines()) == 1
    launcher, args = split_at_script(printed_command(result.stdout, name))
    assert flag(launcher, "--num_gpus") == "4" and flag(launcher, "--master_port") == "29500"
    assert {key: flag(args, key) for key in expected} == expected
    _, cfg = config_lib.parse_run_args(args, "", engine.has_gpu)
    assert cfg.train.teacher == expected["--teacher"] and cfg.train.out == expected["--out"]
    if "--preset" in expected:
        assert cfg.model.preset == "balanced" and cfg.model.d_model == 320  # the README's table


def test_readme_multi_node_command_is_one_pdsh_launch_over_both_workers():
    """`TEACHER=runs/sft/final PRESET=balanced HOSTFILE=scripts/hostfile.example NUM_NODES=2 bash
    scripts/run_distill.sh`: this machine has neither pdsh nor the workers, so DRY_RUN=1 prints the command and
    DeepSpeed's runner code resolves it as `deepspeed` would."""
    from deepspeed.launcher import runner
    from deepspeed.launcher.multinode_runner import PDSHRunner
    result = run_script("run_distill.sh", {"TEACHER": "runs/sft/final", "PRESET": "balanced",
                                           "HOSTFILE": "scripts/hostfile.example", "NUM_NODES": "2", "NUM_GPUS": "8",
                                           "DRY_RUN": "1"}, timeout=30)
    cmd = printed_command(result.stdout, "run_distill")
    args = runner.parse_args(cmd[1:])
    assert (args.hostfile, args.num_nodes, args.num_gpus, args.user_script) == \
        ("scripts/hostfile.example", 2, 8, "train_ds.py")
    pool = runner.fetch_hostfile(str(ROOT / args.hostfile))
    active = runner.apply_num_nodes_and_gpus(runner.parse_inclusion_exclusion(pool, args.include, args.exclude),
                                             args.num_nodes, args.num_gpus)
    assert active == {"worker-1": list(range(8)), "worker-2": list(range(8))}
    args.master_addr = "10.0.0.1"  # DeepSpeed asks the first worker over ssh (`hostname -I`)
    pdsh, _, _ = PDSHRunner(args, runner.encode_world_info(active)).get_cmd({}, active)
    assert pdsh[:2] == ["pdsh", "-S"] and pdsh[pdsh.index("-w") + 1] == "worker-1,worker-2"
    assert "--node_rank=%n" in pdsh and "--master_addr=10.0.0.1" in pdsh and "--master_port=29500" in pdsh
    assert pdsh[pdsh.index("train_ds.py") + 1:] == cmd[cmd.index("train_ds.py") + 1:]
    assert flag(args.user_args, "--stage") == "distill" and flag(args.user_args, "--preset") == "balanced"


def test_tensorboard_sh_serves_the_run(sft_run, run_root, tmp_path):
    """`bash scripts/tensorboard.sh RUN PORT` answers over HTTP with the run's scalars, then is stopped."""
    port = free_port()
    log = tmp_path / "tensorboard.log"
    with log.open("w") as sink:
        server = subprocess.Popen(["bash", str(ROOT / "scripts" / "tensorboard.sh"), str(run_root), str(port)],
                                  stdout=sink, stderr=subprocess.STDOUT,
                                  env={k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES})
    try:
        runs, deadline = {}, time.monotonic() + 90
        while time.monotonic() < deadline and "sft/tb" not in runs:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    runs = json.loads(r.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        assert "sft/tb" in runs, (runs, log.read_text()[-3000:])
        assert {"loss/total", "lr", "eval/bleu"} <= set(runs["sft/tb"])
    finally:
        server.terminate()  # the script execs tensorboard, so this is the server itself
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    cmd = printed_command(log.read_text(), "tensorboard")
    assert cmd == [".venv/bin/tensorboard", "--logdir", str(run_root), "--port", str(port), "--bind_all"]


def test_quickstart_deploy_and_report_follow_the_run_folder(sft_run, tmp_path):
    """quickstart's deploy output is RUN/dist/rv1126b (DIST), and the report stage reads it from there: a finished
    deploy there is skipped by its marker, and the rendered report points at it."""
    run = tmp_path / "quickstart"
    run.mkdir()
    (run / "sft").symlink_to(sft_run, target_is_directory=True)
    dist = run / "dist" / "rv1126b"
    dist.mkdir(parents=True)
    (dist / "report.json").write_text(json.dumps({"choice": {"precision": "fp16"}, "sizes": {},
                                                  "quality": {"torch": {"zh-en": {"params": 1, "n": 100}}}}))
    deploy = run_script("quickstart.sh", {"RUN": str(run)}, "--only", "deploy", timeout=300)
    assert f"== deploy: done already ({dist}/report.json; --force to redo)" in deploy.stdout
    assert "+ " not in deploy.stderr  # nothing ran
    rendered = run_script("quickstart.sh", {"RUN": str(run)}, "--only", "report", timeout=300)
    assert shlex.split(next(line for line in rendered.stderr.splitlines() if line.startswith("+ "))[2:]) == \
        [".venv/bin/python", "-m", "inference.report", "--run", str(run), "--dist", str(dist)]
    assert f"Deployment details, with the precision that shipped and why: {dist / 'report.md'}" in (run / "report.md").read_text()
    assert f"Deployment bundle: {dist}" in rendered.stdout
