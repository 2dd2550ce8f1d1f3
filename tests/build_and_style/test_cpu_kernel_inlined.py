"""The CPU kernel's per-element math (csrc/adadelta_math.h) is inlined into the kernel's loop.

GCC kept adadelta_update out of line, one call per SIMD vector with the vectors passed through
memory: the 10M float32 step took 1.14-1.34x as long as torch.compile's kernel for the same math
(benchmarks/NOTES.md, entry 11). ADADELTA_HOST_DEVICE forces the inlining; this reads the built
library's symbol table for any out-of-line copy.
"""

from __future__ import annotations

import shutil
import subprocess

import adadelta_ext._C
import pytest

# Functions of adadelta_math.h that take vectors: none may be left as a symbol of its own.
MATH_FUNCTIONS = ("adadelta_update", "adadelta_update_kahan", "adadelta_state_update", "rounded_addcmul")


def symbols() -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm: the library's symbols cannot be read")
    result = subprocess.run([nm, "--demangle", adadelta_ext._C.__file__], capture_output=True, text=True)
    if result.returncode != 0 or "update_range<" not in result.stdout:
        # A stripped library: nothing to read, rather than nothing out of line.
        pytest.skip(f"the library's symbol table is not readable: {result.stderr.strip()}")
    return result.stdout.splitlines()


def test_the_per_element_math_has_no_out_of_line_copy():
    out_of_line = [
        line for line in symbols() if any(f"adadelta_ext::{name}<" in line for name in MATH_FUNCTIONS)
    ]
    assert out_of_line == []
