#!/usr/bin/env bash
# The project's demo: the tutorial's MNIST run with the hand-written step,
# torch.optim.Adadelta and FusedAdadelta, on MNIST digits shipped offline.
# Extra arguments go to the demo (see `python -m examples.mnist --help`, from the repo root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh demo
exec "${PYTHON:-python3}" -m examples.mnist "$@"
