"""Time the exported ONNX graphs of a DIST folder on the host CPU, in a process that loads nothing else.

    python -m deploy.host_cost --dist DIST --backend onnx --requests sources.json --threads 1

`--requests` is {"sources": [[student ids], ...], "directions": [0, 1, ...]}; it prints one JSON object with the
greedy hypotheses, ms per sentence and the process's peak RSS. Only numpy and onnxruntime are loaded (the deploy
package imports nothing at load time), so the RSS is what an ONNX-only host would see.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Sequence

from deploy.contract import ContractError, DeployMeta, Dist, EmbedTables, greedy
from deploy.onnx_step_model import OnnxStepModel


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec,
    so a child of a big parent would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux KiB; macOS has no /proc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, required=True, help="deploy output folder (holds onnx/, onnx-int8/)")
    parser.add_argument("--backend", default="onnx", choices=("onnx", "onnx-int8"),
                        help="which exported graphs to run (default: onnx)")
    parser.add_argument("--requests", type=Path, required=True,
                        help='JSON file {"sources": [[student ids], ...], "directions": [0 or 1, ...]}')
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads (default 1, like one core of the board; 0 = all)")
    args = parser.parse_args(argv)
    try:
        requests = json.loads(args.requests.read_text())
        dist = Dist(args.dist)
        meta, tables = DeployMeta.load(dist.meta), EmbedTables.load(dist.embed)
        model = OnnxStepModel(dist.graphs(args.backend), args.threads)
        start = time.perf_counter()
        hypotheses = [greedy(model, tables, meta, source, direction)
                      for source, direction in zip(requests["sources"], requests["directions"])]
        elapsed = time.perf_counter() - start
    except (ContractError, OSError, KeyError, ValueError) as exc:
        print(f"host_cost: {exc}", file=sys.stderr)
        return 2
    n = max(1, len(hypotheses))
    print(json.dumps({"backend": args.backend, "threads": args.threads, "n": len(hypotheses),
                      "ms_per_sentence": round(1000 * elapsed / n, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
                      "hypotheses": hypotheses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
