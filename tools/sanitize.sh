#!/usr/bin/env bash
# The op-level tests under AddressSanitizer and UndefinedBehaviorSanitizer, from the repo root:
#   bash tools/sanitize.sh [PYTEST_ARG ...]
# Builds the extension with ADADELTA_EXT_SANITIZE=1 (see setup.py) out of place, in
# build/sanitize/ (the in-place adadelta_ext/_C*.so is left alone), copies the package
# there with that library, and runs SANITIZE_TESTS against that copy, once per CPU
# kernel instruction set. Any sanitizer report fails the run. Needs what
# `bash tools/test.sh` installs (CI runs that first).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

# The op-level tests (files or folders); one not in this checkout is skipped with a note.
SANITIZE_TESTS=${SANITIZE_TESTS:-"tests/op"}

OUT=$PWD/build/sanitize
SITE=$OUT/site

tests=()
for path in $SANITIZE_TESTS; do
  if [[ -e $path ]]; then tests+=("$path"); else echo "sanitize: $path is not in this checkout, skipped"; fi
done
if ((${#tests[@]} == 0)); then
  echo "sanitize: none of SANITIZE_TESTS exists: $SANITIZE_TESTS" >&2
  exit 1
fi

# The sanitizer runtimes of the compiler that built the library; ASan must be loaded first.
runtimes=()
for lib in libasan.so libubsan.so; do
  runtime=$(gcc -print-file-name="$lib")
  [[ -f $runtime ]] || { echo "sanitize: gcc has no $lib" >&2; exit 1; }
  runtimes+=("$runtime")
done

# --force: distutils does not see header changes; ninja still rebuilds only what changed.
# The compiler's output (thousands of lines of warnings from torch's headers) goes to a log.
mkdir -p "$OUT"
echo "sanitize: building into $OUT (log: $OUT/build.log)"
if ! ADADELTA_EXT_SANITIZE=1 "$python" setup.py -q build_ext --force \
  --build-lib "$OUT/ext" --build-temp "$OUT/tmp" >"$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"
  echo "sanitize: FAILED, the build failed (log: $OUT/build.log)" >&2
  exit 1
fi

# The package's .py files and the sanitized library, importable from $SITE.
rm -rf "$SITE"
mkdir -p "$SITE"
tar --exclude='*.so' --exclude=__pycache__ -cf - adadelta_ext | tar -C "$SITE" -xf -
cp "$OUT"/ext/adadelta_ext/_C*.so "$SITE/adadelta_ext/"

# A pytest plugin that fails the run unless the tests import this copy: the repo root (first on
# sys.path with `python -m`) and the editable install's finder both lead to the normal build.
cat >"$SITE/sanitized_build_check.py" <<'PYTHON'
import os

import pytest


def pytest_configure(config):
    import adadelta_ext._C

    path = os.path.realpath(adadelta_ext._C.__file__)
    print(f"adadelta_ext._C.__file__: {path}")
    if not path.startswith(os.path.realpath(os.environ["SANITIZE_SITE"]) + os.sep):
        raise pytest.UsageError(f"the tests import {path}, not the sanitized build")
PYTHON

# ADADELTA_EXT_SANITIZE=1 in the tests: the emulated CUDA kernel (tests/cuda_emulation.py) is
# built with the sanitizers too.
# The tests run once per CPU kernel build this CPU can run (without it, only the best would):
# ATEN_CPU_CAPABILITY picks ATen's, which the kernel follows. The builds it can run are what
# adadelta_ext.cpu_kernel_isas() says, asked of the normal build (tools/test.sh installs it).
isas=$(env -u ATEN_CPU_CAPABILITY "$python" -c \
  'import adadelta_ext; print(" ".join(isa.lower() for isa in adadelta_ext.cpu_kernel_isas()))')
echo "sanitize: the tests run with ATEN_CPU_CAPABILITY=${isas// /, }"

# detect_leaks=0: CPython frees little at exit, by design. halt_on_error: UBSan stops at its first
# finding (setup.py also compiles with no recovery). --capture=sys: a report goes to the real
# stderr, where pytest's fd capture would lose it when the process dies. (log_path is no help:
# UBSan ignores it with ASan loaded.) The log is searched too, for a subprocess's report.
failed=()
reported=()
for isa in $isas; do
  log=$OUT/pytest-$isa.log
  echo "== sanitize: ATEN_CPU_CAPABILITY=$isa pytest ${tests[*]} $*" | tee "$log"
  ATEN_CPU_CAPABILITY=$isa SANITIZE_SITE=$SITE PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} ADADELTA_EXT_SANITIZE=1 \
    LD_PRELOAD="${runtimes[*]}" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$python" -m pytest -q -rs -p no:cacheprovider -p sanitized_build_check -o pythonpath="$SITE" \
    --capture=sys "${tests[@]}" "$@" 2>&1 | tee -a "$log" || failed+=("$isa")
  if grep -qE 'ERROR: AddressSanitizer|runtime error:|SUMMARY: [A-Za-z]+Sanitizer' "$log"; then
    reported+=("$isa")
  fi
done

if ((${#failed[@]} + ${#reported[@]})); then
  echo "sanitize: FAILED: pytest with ATEN_CPU_CAPABILITY=${failed[*]:-(none)} failed;" \
    "sanitizer reports with ${reported[*]:-(none)} (logs: $OUT/pytest-*.log)" >&2
  exit 1
fi
echo "sanitize: passed (ATEN_CPU_CAPABILITY=${isas// /, })"
