"""engine.py: each rank's device, and the trained model's ZeRO stage."""

import torch

import config as config_lib
import engine


class EightGPUNode:
    """What DeepSpeed's CUDA accelerator answers on a node with 8 GPUs (the part bind_device uses), for a machine
    that has none: every rank there sees all 8 devices until it binds its own."""

    def __init__(self):
        self.bound: list[int] = []

    def device_name(self, index=None) -> str:
        return "cuda" if index is None else f"cuda:{index}"

    def set_device(self, index: int) -> None:
        self.bound.append(index)


def test_each_rank_of_a_node_binds_its_own_gpu_and_a_cpu_rank_binds_nothing():
    from deepspeed.accelerator import get_accelerator
    node = EightGPUNode()
    assert [engine.bind_device(node, local_rank) for local_rank in range(8)] == \
        [torch.device(f"cuda:{r}") for r in range(8)]
    assert node.bound == list(range(8))
    assert engine.bind_device(get_accelerator(), 5) == torch.device("cpu")  # this machine's real accelerator


def test_student_zero_stage_follows_the_device():
    cfg = config_lib.Config()
    assert [engine.resolve_ds_config(cfg, stage, on_gpu) for stage, on_gpu in
            (("distill", False), ("sft", False), ("distill", True), ("sft", True))] == \
        ["ds_configs/zero3.json", "ds_configs/zero3.json", "ds_configs/zero2.json", "ds_configs/zero3.json"]
    cfg.train.ds_config = "ds_configs/zero3_offload.json"
    assert engine.resolve_ds_config(cfg, "distill", True) == "ds_configs/zero3_offload.json"
