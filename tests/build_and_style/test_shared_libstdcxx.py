"""The extension loads the shared libstdc++, the one torch's libraries load.

A private copy linked in statically disagrees with the shared one on locale state: every number
formatted into an error message comes out empty (here, on Debian) or crashes the process (the GPU
image, whose Python was built with a toolchain that links libstdc++ statically by default; see
tests/gpu-results/). setup.py names the library, which undoes -static-libstdc++, and refuses a
build that still holds a copy (the GPU image's toolchain links one in regardless); the refusal
tests' messages, numbers and all, are the behaviour this protects.
"""

from __future__ import annotations

import shutil
import subprocess

import adadelta_ext._C
import pytest

COMPILER = shutil.which("c++") or shutil.which("g++")
SOURCE = """
#include <sstream>
#include <string>
std::string formatted(unsigned long number) { std::ostringstream out; out << number; return out.str(); }
"""


@pytest.fixture
def readable(setup_py):
    """setup_py.libstdcxx_is_shared, where this machine can read a shared object's libraries."""
    if setup_py.libstdcxx_is_shared(adadelta_ext._C.__file__) is None:
        pytest.skip("not Linux, or no readelf: which libraries a shared object loads cannot be read")
    return setup_py.libstdcxx_is_shared


def link(tmp_path, name: str, flags: list[str]) -> str:
    if COMPILER is None:
        pytest.skip("no C++ compiler")
    source, shared_object = tmp_path / "formatted.cpp", tmp_path / name
    source.write_text(SOURCE)
    subprocess.run([COMPILER, "-shared", "-fPIC", str(source), "-o", str(shared_object), *flags], check=True)
    return str(shared_object)


def test_the_built_extension_loads_the_shared_libstdcxx(readable):
    assert readable(adadelta_ext._C.__file__)


def test_a_static_copy_is_recognized(readable, tmp_path):
    assert readable(link(tmp_path, "default.so", []))
    assert not readable(link(tmp_path, "static.so", ["-static-libstdc++"]))


def test_a_toolchain_that_links_it_statically_links_the_shared_one_with_setups_flags(
    readable, setup_py, tmp_path
):
    assert readable(link(tmp_path, "fixed.so", ["-static-libstdc++", *setup_py.SHARED_LIBSTDCXX_FLAGS]))
