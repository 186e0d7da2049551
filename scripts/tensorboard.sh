#!/usr/bin/env bash
# Open TensorBoard on a run (or a folder of runs):  bash scripts/tensorboard.sh runs/quickstart [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs}
PORT=${2:-6006}
exec .venv/bin/tensorboard --logdir "$RUN" --port "$PORT" --bind_all
