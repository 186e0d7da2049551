#!/usr/bin/env bash
# Creates .venv with everything rk-distill needs (idempotent: a stamp holds the requirements' hash) and, as root,
# installs the Debian packages the board runner's build and tests use (cmake; qemu and the aarch64 sysroot and gcc
# for its tests: the board build itself uses zig from requirements.txt).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=""
  for tool in aarch64-linux-gnu-gcc qemu-aarch64 cmake; do command -v "$tool" >/dev/null || missing=1; done
  if [ -n "$missing" ]; then
    echo "setup: installing gcc-aarch64-linux-gnu qemu-user cmake (board runner build and tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user cmake >/dev/null
  fi
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
echo "setup: creating .venv and installing requirements.txt (a few minutes the first time)"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so nothing below can pull a CUDA build on a CPU machine
.venv/bin/python -m pip install -q "$(grep -E '^torch==' requirements.txt)"
.venv/bin/python -m pip install -q -r requirements.txt
echo "$want" > "$stamp"
echo "setup: .venv ready"
