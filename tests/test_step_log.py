"""step_log.py: MFU against each card's own peak."""

import step_log


def test_mfu_uses_each_cards_own_peak_and_none_for_an_unknown_card():
    peaks = {name: step_log.peak_flops(name) for name in (
        "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA H20", "NVIDIA A100-SXM4-80GB",
        "NVIDIA A10", "NVIDIA A10G", "NVIDIA L40S", "NVIDIA GeForce RTX 3090")}
    assert peaks == {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
                     "NVIDIA H20": 148e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A10": 125e12,
                     "NVIDIA A10G": None, "NVIDIA L40S": 362e12, "NVIDIA GeForce RTX 3090": None}
    assert step_log.peak_flops(step_log.gpu_name(on_gpu=False)) is None
