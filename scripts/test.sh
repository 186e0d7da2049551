#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: sets up .venv (and .venv-rknn on demand), then pytest.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k data    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cmd=(.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@")
printf 'test:'
printf ' %q' "${cmd[@]}"
printf '\n'
exec "${cmd[@]}"
