#!/usr/bin/env bash
# Create the rknn-toolkit2 virtualenv that deploy/convert_rknn.py runs in.
#
# Usage: bash deploy/setup_rknn_env.sh [VENV_DIR]
#   VENV_DIR  where to create it (default: <repo>/.venv-rknn)
#   PYTHON    env var, the interpreter to build it from (default: python3); must be 3.11 or 3.12: numpy 1.26.4
#             has no wheels past 3.12 and convert_rknn.py uses contextlib.chdir (3.11+). Tested with 3.11.
#
# Why a separate venv: rknn-toolkit2 2.5.0 pins numpy<=1.26.4, onnx<=1.18.0, protobuf<=4.25.4 and torch<=2.4.0,
# which clash with the training venv. We install the wheel with --no-deps and pick versions that work together
# (checked on x86: config/load_onnx/build/export_rknn/init_runtime/inference all run). torch is pinned to 2.13.0
# exactly because that CPU wheel is on local disk; any other spec pulls a multi-GB CUDA build from the index.
#
# Idempotent: a stamp file in VENV_DIR marks a finished install; re-running then only prints where it is.
# A half-finished venv (no stamp) is reused and the install steps are re-run over it.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-${REPO_ROOT}/.venv-rknn}"
PYTHON="${PYTHON:-python3}"
STAMP="${VENV_DIR}/.rknn-setup-done"

RKNN_WHEEL_SPEC="rknn-toolkit2==2.5.0"
DEPS=(
  "numpy==1.26.4"
  "onnx==1.18.0"
  "onnxruntime==1.20.1"
  "protobuf==4.25.4"
  # The toolkit imports pkg_resources (gone from setuptools 81); torch 2.13 needs setuptools>=77.0.3.
  "setuptools>=77.0.3,<81"
  "psutil"
  "ruamel.yaml"
  "scipy"
  "tqdm"
  "opencv-python-headless"
  "fast-histogram"
  "torch==2.13.0"
)

verify() {
  # One line either way: the caller greps for it, a person reads it.
  if "${VENV_DIR}/bin/python" -c "from rknn.api import RKNN" >/dev/null 2>"${VENV_DIR}/verify.log"; then
    echo "rknn env OK: ${VENV_DIR} (python: ${VENV_DIR}/bin/python)"
  else
    echo "rknn env BROKEN: 'from rknn.api import RKNN' failed in ${VENV_DIR}; see ${VENV_DIR}/verify.log," \
         "then delete ${VENV_DIR} and re-run bash deploy/setup_rknn_env.sh" >&2
    return 1
  fi
}

if [[ -f "${STAMP}" ]]; then
  echo "rknn env already set up: ${VENV_DIR} (python: ${VENV_DIR}/bin/python; delete it to rebuild)"
  exit 0
fi

if ! "${PYTHON}" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then
  echo "setup_rknn_env: '${PYTHON}' is missing or not Python 3.11/3.12; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

echo "setup_rknn_env: creating ${VENV_DIR} with $("${PYTHON}" --version 2>&1)"
"${PYTHON}" -m venv "${VENV_DIR}"
PIP=("${VENV_DIR}/bin/python" -m pip install --disable-pip-version-check --quiet)

echo "setup_rknn_env: installing ${RKNN_WHEEL_SPEC} and its dependencies (a minute or two)"
# The wheel's own requirements are unsatisfiable next to a modern torch; its runtime needs are in DEPS.
"${PIP[@]}" --no-deps "${RKNN_WHEEL_SPEC}" || {
  echo "setup_rknn_env: could not install ${RKNN_WHEEL_SPEC} from the package index (network or Python version?)" >&2
  exit 1
}
echo "setup_rknn_env: pip will say rknn-toolkit2's torch/opencv pins are unmet; that is expected and harmless"
"${PIP[@]}" "${DEPS[@]}" || {
  echo "setup_rknn_env: installing the toolkit's dependencies failed; check the pip output above" >&2
  exit 1
}

verify
"${VENV_DIR}/bin/python" -c "import importlib.metadata as m; print(m.version('rknn-toolkit2'))" > "${STAMP}"
