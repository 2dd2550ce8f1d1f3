#!/usr/bin/env bash
# Installs adadelta_ext and what it needs on a fresh machine, from the repo root:
#   bash tools/install.sh [EXTRA ...]      e.g. `bash tools/install.sh test demo`
# torch is installed only if it is not importable, as $TORCH_SPEC (default
# torch==2.13.0: on this project's machines a bare `torch` pulls GBs of CUDA
# wheels). The extension builds against that torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if ! "$python" -c "import torch" 2>/dev/null; then
  "$python" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
"$python" -m pip install ninja "setuptools>=64" wheel
extras=$(IFS=,; echo "$*")
"$python" -m pip install --no-build-isolation -e ".${extras:+[$extras]}"
