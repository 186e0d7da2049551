#!/usr/bin/env bash
# Open TensorBoard on a run (or a folder of runs):  bash scripts/tensorboard.sh runs/quickstart [PORT]
# PORT defaults to 6006; HOST=127.0.0.1 serves this machine only (default: every interface).
# Prints its resolved command first.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs}
PORT=${2:-6006}
if [ -n "${HOST:-}" ]; then bind=(--host "$HOST"); else bind=(--bind_all); fi
cmd=(.venv/bin/tensorboard --logdir "$RUN" --port "$PORT" "${bind[@]}")
printf 'tensorboard:'
printf ' %q' "${cmd[@]}"
printf '\n'
exec "${cmd[@]}"
