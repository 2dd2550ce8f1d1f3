#!/usr/bin/env bash
# The project's test command: installs what the tests need, builds the extension, runs the whole suite.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh test demo
exec "${PYTHON:-python3}" -m pytest -q -rs "$@"
