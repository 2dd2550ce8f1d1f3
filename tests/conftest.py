"""What every test folder shares: the helper module on sys.path, and the `cuda` marker's skip.

No folder under tests/ is a package (no __init__.py: tests/examples/ must not shadow the top-level
`examples` package), so pytest puts each test file's own folder first on sys.path, and
tests/optim_testing.py would not be importable from tests/op/ or tests/optimizer/. This conftest,
which pytest loads before any test below it, puts tests/ itself on sys.path: every test file
imports its shared helpers with `from optim_testing import ...`, under any --import-mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_runtest_setup(item: pytest.Item) -> None:
    # `pytest.mark.cuda` (declared in pyproject.toml) marks every test that needs a GPU, so that
    # `pytest -m cuda` selects exactly those; here they show as skipped, with the reason.
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
