"""Time and peak extra memory of the fused, chunked KD loss against the plain full-logits loss (and
Liger-Kernel's LigerFusedLinearJSDLoss when it is installed), forward + backward.

    python -m bench.kd_loss                  # CPU shapes (a few minutes), or GPU shapes when CUDA is there
    python -m bench.kd_loss --shapes gpu     # vocabulary 151,936 at 4,096 and 8,192 tokens, bf16
    python -m bench.kd_loss --json bench/results/kd_loss-cpu.json

Each (method, shape) runs in its own subprocess, so peak memory is its own: on GPU the allocator's peak
above the inputs, on CPU the growth of peak RSS above the inputs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.results_io import write_results

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    tokens: int
    vocab: int
    student_width: int
    teacher_width: int


SHAPES = {
    # CPU: the student's trimmed vocabulary sizes (tiny/balanced presets) at a realistic micro-batch
    "cpu": [Shape(2048, 8000, 128, 512), Shape(2048, 32000, 256, 1024), Shape(4096, 32000, 256, 1024)],
    # GPU: Qwen's full vocabulary, as in the measurements (student width 512, teacher 2048)
    "gpu": [Shape(4096, 151936, 512, 2048), Shape(8192, 151936, 512, 2048), Shape(8192, 32000, 512, 2048)],
}
METHODS = ("plain", "fused", "liger")


def make_inputs(shape: Shape, device: str, dtype):
    import torch
    gen = torch.Generator(device=device).manual_seed(0)
    s_hidden = torch.randn(shape.tokens, shape.student_width, device=device, generator=gen, dtype=dtype)
    s_weight = torch.randn(shape.vocab, shape.student_width, device=device, generator=gen, dtype=dtype) * 0.05
    t_hidden = torch.randn(shape.tokens, shape.teacher_width, device=device, generator=gen, dtype=dtype)
    t_weight = torch.randn(shape.vocab, shape.teacher_width, device=device, generator=gen, dtype=dtype) * 0.05
    labels = torch.randint(0, shape.vocab, (shape.tokens,), device=device, generator=gen)
    return s_hidden.requires_grad_(), s_weight.requires_grad_(), t_hidden, t_weight, labels


def loss_function(method: str):
    """method -> f(s_hidden, s_weight, t_hidden, t_weight, labels) returning a scalar loss (JSD, beta 0.5)."""
    from config import DistillConfig
    from kd_loss import fused_distill_loss, plain_distill_loss
    cfg = DistillConfig(kd_loss="jsd", alpha=0.5, temperature=1.0, beta=0.5)
    if method == "plain":
        return lambda sh, sw, th, tw, y: plain_distill_loss(sh @ sw.T, th @ tw.T, y, cfg).total
    if method == "fused":
        return lambda sh, sw, th, tw, y: fused_distill_loss(sh, sw, th, tw, y, cfg).total
    from liger_kernel.transformers import LigerFusedLinearJSDLoss
    liger = LigerFusedLinearJSDLoss(jsd_beta=0.5, temperature=1.0)
    return lambda sh, sw, th, tw, y: liger(sh, sw, th, tw, y)


def measure(method: str, shape: Shape, device: str, repeats: int) -> dict:
    """One (method, shape) in this process: median ms of forward+backward and peak extra memory in MiB."""
    import torch
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_num_threads(torch.get_num_threads())
    inputs = make_inputs(shape, device, dtype)
    loss = loss_function(method)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def once():
        for tensor in inputs[:2]:
            tensor.grad = None
        loss(*inputs).backward()
        sync()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    once()  # warm-up; its peak counts too, it is the same work
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append((time.perf_counter() - start) * 1000)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"method": method, **asdict(shape), "device": device, "dtype": str(dtype).replace("torch.", ""),
            "ms": round(statistics.median(times), 2), "extra_mib": round((peak - base) / 2 ** 20, 1)}


def run_isolated(method: str, shape: Shape, device: str, repeats: int) -> dict | None:
    cmd = [sys.executable, "-m", "bench.kd_loss", "--_one", json.dumps([method, asdict(shape), device, repeats])]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"  {method} {shape}: skipped ({reason})", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| tokens | vocab | width s/t | method | ms (fwd+bwd) | extra MiB | vs plain: time / memory |",
             "|---:|---:|---|---|---:|---:|---|"]
    plain = {(r["tokens"], r["vocab"]): r for r in rows if r["method"] == "plain"}
    for r in rows:
        base = plain.get((r["tokens"], r["vocab"]))
        ratio = (f"{r['ms'] / base['ms']:.2f}x / {r['extra_mib'] / max(base['extra_mib'], 1e-9):.2f}x"
                 if base and r is not base else "")
        lines.append(f"| {r['tokens']} | {r['vocab']} | {r['student_width']}/{r['teacher_width']} | {r['method']} | "
                     f"{r['ms']:.1f} | {r['extra_mib']:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                        help="shape set (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of plain,fused,liger (liger is skipped when not installed)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions after one warm-up (median)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default: bench/results/kd_loss-<shapes>.json)")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        method, shape, device, repeats = json.loads(args._one)
        print(json.dumps(measure(method, Shape(**shape), device, repeats)))
        return

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.shapes or ("gpu" if device == "cuda" else "cpu")
    rows = []
    for shape in SHAPES[shapes]:
        for method in args.methods.split(","):
            row = run_isolated(method, shape, device, args.repeats)
            if row:
                rows.append(row)
                print(f"  {method:6s} {shape.tokens:5d} x {shape.vocab:6d}: {row['ms']:8.1f} ms "
                      f"{row['extra_mib']:8.0f} MiB", file=sys.stderr)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(table(rows))
    write_results(f"kd_loss-{shapes}", args.json,
                  {"machine": machine, "torch": torch.__version__, "rows": rows})

if __name__ == "__main__":
    main()
