"""The pure bfloat16 example, ``python -m examples.pure_16bit_training``, as a specification.

- The data is the standard library's ``*.py`` source, in sorted order, without
  test folders or installed packages; the same bytes every time.
- ``--quick`` runs the four runs (float32, bfloat16, bfloat16 + kahan_sum,
  bfloat16 + stochastic_round) in seconds and writes ``results.json``,
  ``loss_curves.png`` and ``report.md``; every loss is finite and every run learns.
- The memory measured from the optimizer's tensors: kahan_sum holds 2 bytes per
  element more than plain bfloat16, stochastic_round none, float32 more than bfloat16.
- A run is deterministic, stochastic rounding included: torch is seeded before each.

Nothing here checks which run wins: that is the committed report's to show, at full length.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from examples import pure_16bit_training as example

RUN_NAMES = ["float32", "bfloat16", "bfloat16 + kahan_sum", "bfloat16 + stochastic_round"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out_dir = tmp_path_factory.mktemp("pure-16bit-training")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        returned = example.main(["--quick", "--out-dir", str(out_dir)])
    return {
        "out_dir": out_dir,
        "printed": printed.getvalue(),
        "returned": returned,
        "results": json.loads((out_dir / "results.json").read_text()),
    }


def runs_by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {run["name"]: run for run in results["runs"]}


def test_stdlib_source_files_are_sorted_and_leave_out_tests_and_installed_packages() -> None:
    root = Path(os.__file__).parent
    files = example.stdlib_source_files()
    assert files, "the standard library has *.py files"
    relative = [path.relative_to(root) for path in files]
    assert [path.as_posix() for path in relative] == sorted(path.as_posix() for path in relative)
    assert not any(example.EXCLUDED_DIRS.intersection(path.parts[:-1]) for path in relative)


def test_corpus_is_the_same_bytes_every_time_and_split_as_asked() -> None:
    first = example.load_corpus(50_000, 0.2)
    second = example.load_corpus(50_000, 0.2)
    assert first.sha256 == second.sha256
    assert (len(first.train), len(first.val)) == (40_000, 10_000)
    assert int(first.train.min()) >= 0 and int(first.train.max()) < example.VOCAB


def test_quick_run_writes_results_plot_and_report(quick_run: dict[str, Any]) -> None:
    out_dir: Path = quick_run["out_dir"]
    results = quick_run["results"]
    assert quick_run["returned"] == results
    assert results["args"]["quick"] is True
    assert results["torch_version"] and results["platform"] and results["python_version"]
    assert [run["name"] for run in results["runs"]] == RUN_NAMES == list(example.RUNS)
    assert (out_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out_dir / "report.md").read_text()
    assert "python -m examples.pure_16bit_training --quick" in report
    assert "![loss curves](loss_curves.png)" in report
    assert all(f"| {name} |" in report for name in RUN_NAMES)
    assert all(f"| {name} |" in quick_run["printed"] for name in RUN_NAMES)


def test_every_loss_is_finite_and_every_run_learns(quick_run: dict[str, Any]) -> None:
    steps = quick_run["results"]["config"]["steps"]
    for run in quick_run["results"]["runs"]:
        name = run["name"]
        losses = [*run["logged_losses"], *run["eval_losses"], run["final_train_loss"], run["val_loss"]]
        assert all(math.isfinite(loss) for loss in losses), name
        assert run["logged_steps"][-1] == steps and run["eval_steps"][-1] == steps, name
        # Untrained, the loss is about ln(256) = 5.5 nats per byte.
        assert run["logged_losses"][-1] < run["logged_losses"][0] < math.log(256) + 1, name
        assert run["val_perplexity"] == pytest.approx(math.exp(run["val_loss"])), name
        assert 0 <= run["val_accuracy"] <= 1, name
        assert run["median_step_ms"] > 0 and run["median_iteration_ms"] >= run["median_step_ms"], name


def test_bytes_per_parameter_follow_the_optimizer_state(quick_run: dict[str, Any]) -> None:
    runs = runs_by_name(quick_run["results"])
    float32, plain = runs["float32"], runs["bfloat16"]
    kahan, stochastic = runs["bfloat16 + kahan_sum"], runs["bfloat16 + stochastic_round"]
    assert kahan["bytes_per_param"] == pytest.approx(plain["bytes_per_param"] + 2, abs=1e-9)
    assert stochastic["bytes_per_param"] == plain["bytes_per_param"]
    assert float32["bytes_per_param"] > plain["bytes_per_param"]
    # The compensation buffer is the extra: one bfloat16 per param element, as the param itself.
    assert kahan["memory_bytes"]["kahan_comp"] == kahan["memory_bytes"]["param"]
    assert set(kahan["memory_bytes"]) - set(plain["memory_bytes"]) == {"kahan_comp"}
    assert set(stochastic["memory_bytes"]) == set(plain["memory_bytes"])


def test_runs_are_deterministic_stochastic_rounding_included() -> None:
    corpus = example.load_corpus(50_000, 0.2)
    config = example.Config(
        steps=6, hidden=32, log_every=2, eval_every=3, curve_val_windows=64, val_windows=64
    )
    names = ["bfloat16", "bfloat16 + stochastic_round"]
    first = example.run_all(corpus, config, names, log=lambda _: None)
    second = example.run_all(corpus, config, names, log=lambda _: None)
    for a, b in zip(first, second, strict=True):
        assert (a.logged_losses, a.eval_losses, a.val_loss) == (b.logged_losses, b.eval_losses, b.val_loss)
