"""The package builds and installs as users get it: an sdist, a wheel built from that sdist, and the
sdist installed into a fresh virtual environment, where FusedAdadelta steps like torch.optim.Adadelta.

Slow: the extension is compiled twice (for the wheel, and in the venv) and torch is installed into
the venv; about 1.5 minutes in all on a 2-core machine. Deselect with `-m "not slow"`.
The build works on a copy of the repository holding only what git tracks or would track
(tracked and new, not ignored, files), never build/ or an in-place built .so.

`python -m build --no-isolation` builds the sdist and then the wheel from the unpacked sdist,
so a file the build reads but the sdist lacks fails here (a stricter check than `--sdist --wheel`,
which builds both from the source tree). The virtual environment is a plain one (no system site
packages): torch comes from `pip install $TORCH_SPEC` (default torch==2.13.0, which this
project's machines install from a local wheel), and the sdist is built there with
--no-build-isolation against that torch, as tools/install.sh installs the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VERSION = "0.1.0"
BUILD_TIMEOUT_S = 1200


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def clean_environment() -> dict[str, str]:
    """This process's environment without PYTHONPATH, so nothing imports the source tree by accident."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.fail("the packaging test copies the files git tracks: it needs git and a git checkout")
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO).stdout
    copy = tmp_path_factory.mktemp("source") / "adadelta_ext"
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    assert not (copy / "build").exists()
    assert not list(copy.rglob("*.so")), "an in-place build must not reach the copy"
    return copy


@pytest.fixture(scope="module")
def distributions(source_copy) -> dict[str, Path]:
    version = subprocess.run(
        [sys.executable, "-m", "build", "--version"],
        cwd=source_copy,
        capture_output=True,
        text=True,
        check=False,
    )
    if version.returncode != 0:
        pytest.fail("the packaging test needs the `build` package (pip install build)")
    out_dir = source_copy.parent / "dist"
    run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out_dir)],
        cwd=source_copy,
        env=clean_environment(),
    )
    sdists, wheels = list(out_dir.glob("*.tar.gz")), list(out_dir.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out_dir.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0]}


def test_sdist_holds_every_file_the_build_reads(source_copy, distributions):
    """All of csrc/ (sources and the .h/.cuh headers, the CUDA files too), setup.py, pyproject.toml,
    README.md, the Python package with its py.typed marker, and every file of tests/ (the suite runs
    from an sdist); no binary."""
    root = f"adadelta_ext-{VERSION}/"
    with tarfile.open(distributions["sdist"]) as sdist:
        names = {name.removeprefix(root) for name in sdist.getnames()}
    expected = {str(p.relative_to(source_copy)) for p in (source_copy / "csrc").rglob("*") if p.is_file()}
    expected |= {str(p.relative_to(source_copy)) for p in (source_copy / "adadelta_ext").rglob("*.py")}
    expected |= {str(p.relative_to(source_copy)) for p in (source_copy / "tests").rglob("*.py")}
    expected |= {"setup.py", "pyproject.toml", "README.md", "adadelta_ext/py.typed"}
    assert any(name.endswith((".h", ".cuh")) for name in expected), "the headers are part of the check"
    assert sorted(expected - names) == []
    assert [name for name in names if name.endswith((".so", ".o", ".pyc"))] == []


def test_wheel_holds_the_compiled_extension_and_the_typing_marker(distributions):
    with zipfile.ZipFile(distributions["wheel"]) as wheel:
        names = wheel.namelist()
    assert [name for name in names if name.startswith("adadelta_ext/_C.") and name.endswith(".so")], names
    assert "adadelta_ext/py.typed" in names
    assert {"adadelta_ext/__init__.py", "adadelta_ext/optimizer.py", "adadelta_ext/_ops.py"} <= set(names)


# Run in the fresh environment, from a directory outside the source: FusedAdadelta against
# torch.optim.Adadelta on a few params for a few steps (float32 default tolerance, as in
# tests/optimizer/test_parity_with_torch.py).
INSTALLED_CHECK = """
import json, pathlib, sys
import torch
import adadelta_ext
generator = torch.Generator().manual_seed(0)
ours = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in [(7,), (3, 5), ()]]
theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
fused = adadelta_ext.FusedAdadelta(ours, lr=0.5, weight_decay=0.1)
reference = torch.optim.Adadelta(theirs, lr=0.5, weight_decay=0.1)
for _ in range(5):
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=generator)
        b.grad = a.grad.clone()
    fused.step()
    reference.step()
torch.testing.assert_close(ours, theirs)
print(json.dumps({
    "package_file": adadelta_ext.__file__,
    "prefix": sys.prefix,
    "backends": adadelta_ext.backends(),
    "steps": [fused.state[p]["step"].item() for p in ours],
}))
"""


def test_sdist_installs_into_a_fresh_venv_and_steps_an_optimizer(distributions, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    environment = clean_environment()
    torch_spec = environment.get("TORCH_SPEC", "torch==2.13.0")
    run(
        [python, "-m", "pip", "install", torch_spec, "setuptools>=64", "wheel", "ninja"],
        cwd=tmp_path,
        env=environment,
    )
    run(
        [python, "-m", "pip", "install", "--no-build-isolation", str(distributions["sdist"])],
        cwd=tmp_path,
        env=environment,
    )

    result = json.loads(
        run([python, "-c", INSTALLED_CHECK], cwd=tmp_path, env=environment).stdout.splitlines()[-1]
    )

    assert Path(result["prefix"]) == venv
    assert Path(result["package_file"]).is_relative_to(venv), "the installed package must be the one imported"
    assert "cpu" in result["backends"]
    assert result["steps"] == [5.0, 5.0, 5.0]
