"""The CUDA sources compile on any machine with nvcc (a GPU is not needed).

These tests are CI's proof that csrc/cuda builds: the kernel with nvcc for A100
and H100 (sm_80, sm_90), in both argument layouts (32 KB and 4 KB), and the
device code a pre-Volta architecture gets; the ATen glue with the host compiler
against this torch's headers. They skip only where nvcc is not found. The
architectures setup.py picks for a build are checked here too, without
compiling.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNEL_SOURCE = CUDA_DIR / "adadelta_cuda_launch.cu"
GLUE_SOURCE = CUDA_DIR / "fused_adadelta_cuda.cpp"
TORCH_FREE_SOURCES = ["adadelta_cuda_kernel.cuh", "adadelta_cuda_launch.cu", "adadelta_cuda_launch.h"]

# As setup.py's CUDA build compiles the kernel: torch's own nvcc flags (they turn
# off __half's implicit conversions), setup.py's, one architecture at a time.
NVCC_FLAGS = [*cpp_extension.COMMON_NVCC_FLAGS, "-O3", "-lineinfo"]
ARCHITECTURES = ["80", "90"]
# torch >= 2.4 (pyproject's floor) builds extensions as C++17, recent torch as C++20.
STANDARDS = ["c++17", "c++20"]

# The kernel's template instances: one per (param, grad, state) dtype triple the op accepts:
# float32; float64 with float64 or float32 grads; float16 and bfloat16, each with grads and
# state of their own dtype or float32, and each of those three ways (round to nearest, Kahan
# summation, stochastic rounding). Each in two argument layouts where nvcc is CUDA 12.1 or
# newer (see NOTE [Two argument layouts] in adadelta_cuda_kernel.cuh).
KERNEL_INSTANCES = 3 + 8 * 3
# Beside them, increment_steps_kernel (4 KB of arguments at most): stochastic rounding's counts.
UPDATE_KERNEL = "multi_tensor_adadelta_kernel"

SMALL_ARGUMENTS, LARGE_ARGUMENTS = 4096, 32764  # bytes

# What CUDA 13.0's nvcc builds (`nvcc --list-gpu-code`, `--list-gpu-arch`): no sm_50 to sm_72.
CUDA_13_BUILDS = {
    f"{kind}_{number}"
    for kind in ("sm", "compute")
    for number in (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)
}
# torch.cuda.get_arch_list() of a torch built with CUDA 12: machine code down to sm_50.
TORCH_CUDA_12_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None and cpp_extension.CUDA_HOME is not None:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    if nvcc is None:
        pytest.skip(
            "nvcc not found (neither on PATH nor under CUDA_HOME): the CUDA sources cannot be compiled here"
        )
    return nvcc


def cuda_include_dirs(nvcc: str) -> list[str]:
    """The include directories nvcc itself compiles with (it may be a wrapper script)."""
    dry_run = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True
    )
    found = re.search(r'^#\$ INCLUDES="(.*)"', dry_run.stdout + dry_run.stderr, flags=re.MULTILINE)
    assert found, f"nvcc --dryrun names no include directory:\n{dry_run.stdout}{dry_run.stderr}"
    return re.findall(r'-I"?([^"\s]+)', found.group(1))


def compile_failure(command: list[str], result: subprocess.CompletedProcess) -> str:
    return f"{' '.join(command)}\nexited {result.returncode}:\n{result.stdout}{result.stderr}"


def nvcc_version(nvcc: str) -> tuple[int, int]:
    result = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    found = re.search(r"release (\d+)\.(\d+)", result.stdout)
    assert found, f"nvcc --version names no release:\n{result.stdout}{result.stderr}"
    return int(found.group(1)), int(found.group(2))


def compile_kernel(nvcc: str, arch: str, standard: str, tmp_path: Path, *defines: str) -> tuple[str, str]:
    """The kernel's translation unit compiled for sm_<arch>: ptxas's report and the PTX."""
    command = [
        nvcc,
        f"-std={standard}",
        *NVCC_FLAGS,
        *defines,
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
        "--keep",  # leaves the PTX in tmp_path
        "--keep-dir",
        str(tmp_path),
        "-c",
        str(KERNEL_SOURCE),
        "-o",
        str(tmp_path / "adadelta_cuda_launch.o"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, compile_failure(command, result)
    [ptx_file] = tmp_path.glob("*.ptx")
    return result.stderr, ptx_file.read_text()


def ptx_kernels(ptx: str) -> dict[str, str]:
    """Each kernel entry's PTX, by name."""
    kernels = re.split(r"^\.visible \.entry ", ptx, flags=re.MULTILINE)[1:]
    return {kernel.split("(", 1)[0]: kernel for kernel in kernels}


def argument_bytes(kernel: str) -> int:
    """The bytes of a kernel's parameters: its two, the metadata and the scalars, are byte arrays."""
    parameters = kernel.split("(", 1)[1].split(")", 1)[0]
    sizes = re.findall(r"\.param\s+\.align\s+\d+\s+\.b8\s+\w+\[(\d+)\]", parameters)
    assert len(sizes) == 2, parameters
    return sum(map(int, sizes))


def test_kernel_sources_include_no_torch_header():
    # nvcc compiles them alone, against no torch: the glue is the only ATen code.
    for name in TORCH_FREE_SOURCES:
        text = (CUDA_DIR / name).read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), f"{name} includes a torch header"


@pytest.mark.parametrize("standard", STANDARDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kernel_compiles_without_spills(arch, standard, tmp_path):
    nvcc = find_nvcc()
    ptxas_report, ptx = compile_kernel(nvcc, arch, standard, tmp_path)

    # ptxas -v reports each kernel's stack frame and spills: local memory in a
    # bandwidth-bound kernel costs as much as the tensors' own traffic.
    frames = re.findall(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_report
    )
    assert len(frames) >= KERNEL_INSTANCES, ptxas_report
    assert all(frame == ("0", "0", "0") for frame in frames), ptxas_report

    # Every instance in the 4 KB layout, and from CUDA 12.1 in the 32 KB one too.
    kernels = {name: kernel for name, kernel in ptx_kernels(ptx).items() if UPDATE_KERNEL in name}
    assert len(ptx_kernels(ptx)) == len(kernels) + 1, list(ptx_kernels(ptx))
    sizes = sorted(argument_bytes(kernel) for kernel in kernels.values())
    small = [size for size in sizes if size <= SMALL_ARGUMENTS]
    large = [size for size in sizes if SMALL_ARGUMENTS < size <= LARGE_ARGUMENTS]
    assert len(small) == KERNEL_INSTANCES, sizes
    assert len(large) == (KERNEL_INSTANCES if nvcc_version(nvcc) >= (12, 1) else 0), sizes
    assert len(kernels) == len(small) + len(large), sizes

    # Every kernel has its 16-byte path: a 128-bit load and store per tensor.
    for name, kernel in kernels.items():
        loads = re.findall(r"ld\.global(?:\.nc)?\.v(?:4\.[bfsu]32|2\.[bfsu]64)", kernel)
        stores = re.findall(r"st\.global\.v(?:4\.[bfsu]32|2\.[bfsu]64)", kernel)
        # param, grad, square_avg and acc_delta; grad is stored when unscaled.
        assert len(loads) >= 4 and len(stores) >= 4, (
            f"{name}: {len(loads)} 16-byte loads, {len(stores)} stores"
        )


def test_pre_volta_device_code_has_the_4KB_kernels_only(tmp_path):
    """Where 32 KB of kernel arguments cannot be had (before sm_70), ptxas rejects a kernel with
    more, so the 32 KB kernels are only declared there. This nvcc builds nothing before sm_75, so
    sm_75 stands in, with the architecture the 32 KB kernels need raised past it."""
    nvcc = find_nvcc()
    ptxas_report, ptx = compile_kernel(
        nvcc, "75", "c++17", tmp_path, "-DADADELTA_EXT_LARGE_ARGUMENTS_MIN_ARCH=800"
    )
    sizes = [argument_bytes(kernel) for kernel in ptx_kernels(ptx).values()]
    assert len(sizes) == KERNEL_INSTANCES + 1 and all(size <= SMALL_ARGUMENTS for size in sizes), sizes
    assert "warning" not in ptxas_report.lower(), ptxas_report


def test_glue_compiles(tmp_path):
    """fused_adadelta_cuda.cpp through the host compiler's full front end (-fsyntax-only).

    The CPU torch wheel ships the c10/cuda headers but not the one CMake generates,
    c10/cuda/impl/cuda_cmake_macros.h. Where it is missing, c10's own switch
    C10_CUDA_NO_CMAKE_CONFIGURE_FILE (which its ROCm build uses) skips it: that
    header only defines C10_CUDA_BUILD_SHARED_LIBS, read for Windows DLL exports,
    and TORCH_CUDA_VERSION_*, read by no torch header (checked in torch 2.13).
    Everything else is real: the glue's own code against this torch's ATen,
    c10/cuda and torch/library.h, and the CUDA toolkit's headers that nvcc uses,
    as C++20 (as torch 2.13 builds extensions; the glue also compiles as C++17).
    """
    nvcc = find_nvcc()
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no host C++ compiler (c++ or $CXX) found")
    torch_includes = cpp_extension.include_paths()
    command = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DADADELTA_WITH_CUDA"]
    if not any((Path(path) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for path in torch_includes):
        command.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    # -isystem: warnings in torch's and CUDA's own headers are not the glue's.
    for path in [*torch_includes, *cuda_include_dirs(nvcc)]:
        command += ["-isystem", path]
    command.append(str(GLUE_SOURCE))
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, compile_failure(command, result)


def machine_code(number: int) -> str:
    return f"-gencode=arch=compute_{number},code=sm_{number}"


def ptx(number: int) -> str:
    return f"-gencode=arch=compute_{number},code=compute_{number}"


def selected_arch_flags(setup_py, monkeypatch, arch_list_env, torch_archs, nvcc_builds=CUDA_13_BUILDS):
    """The -gencode flags setup.py picks with this TORCH_CUDA_ARCH_LIST, torch and nvcc."""
    if arch_list_env is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list_env)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: torch_archs)
    return setup_py.cuda_arch_flags(setup_py.requested_cuda_archs(), nvcc_builds)


@pytest.mark.parametrize("arch_list_env", ["7.5;8.6+PTX", "7.5 8.6", " 7.5 ;8.6+PTX "])
def test_arch_list_env_comes_first(setup_py, monkeypatch, arch_list_env):
    flags = selected_arch_flags(setup_py, monkeypatch, arch_list_env, TORCH_CUDA_12_ARCHS)
    assert flags == [machine_code(75), machine_code(86), ptx(86)]


def test_torch_archs_and_newest_ptx(setup_py, monkeypatch):
    flags = selected_arch_flags(setup_py, monkeypatch, None, TORCH_CUDA_12_ARCHS)
    assert flags == [*map(machine_code, [75, 80, 86, 90, 100, 120]), ptx(120)]


def test_archs_nvcc_cannot_build_are_dropped(setup_py, monkeypatch):
    cuda_12_0_builds = {
        f"{kind}_{number}" for kind in ("sm", "compute") for number in (50, 60, 70, 75, 80, 86, 90)
    }
    flags = selected_arch_flags(setup_py, monkeypatch, "6.0;10.0;12.0+PTX", [], cuda_12_0_builds)
    assert flags == [machine_code(60), ptx(60)]
    flags = selected_arch_flags(setup_py, monkeypatch, None, TORCH_CUDA_12_ARCHS, cuda_12_0_builds)
    assert flags == [*map(machine_code, [50, 60, 70, 75, 80, 86, 90]), ptx(90)]


def test_fallback_without_any_arch(setup_py, monkeypatch):
    """A CPU torch lists none: A100 and H100, with sm_90's PTX."""
    flags = selected_arch_flags(setup_py, monkeypatch, "", [])
    assert flags == [machine_code(80), machine_code(90), ptx(90)]


@pytest.mark.parametrize("arch_list_env", ["Ampere", "8.6;native", "8.6+ptx", "86"])
def test_unknown_arch_is_an_error(setup_py, monkeypatch, arch_list_env):
    with pytest.raises(ValueError, match="unknown CUDA architecture"):
        selected_arch_flags(setup_py, monkeypatch, arch_list_env, [])


def test_no_buildable_arch_is_an_error(setup_py, monkeypatch):
    with pytest.raises(ValueError, match="nvcc builds none"):
        selected_arch_flags(setup_py, monkeypatch, "5.0;6.1+PTX", [])


def test_build_extension_adds_no_arch_flags(setup_py, monkeypatch):
    """torch's BuildExtension adds TORCH_CUDA_ARCH_LIST's flags of its own unless -gencode is given."""
    flags = selected_arch_flags(setup_py, monkeypatch, "7.5;8.6+PTX", [])
    assert cpp_extension._get_cuda_arch_flags(["-O3"])  # it would add them
    assert cpp_extension._get_cuda_arch_flags(["-O3", *flags]) == []


def test_local_nvcc_builds_the_archs_picked(setup_py, monkeypatch, tmp_path):
    """This nvcc's own listing read, and the flags picked from a CUDA 12 torch's list accepted."""
    nvcc = find_nvcc()
    nvcc_builds = setup_py.nvcc_gpu_names()
    assert {"sm_80", "sm_90", "compute_90"} <= nvcc_builds
    assert all(re.fullmatch(r"(sm|compute)_\d+[a-z]?", name) for name in nvcc_builds), nvcc_builds
    flags = selected_arch_flags(setup_py, monkeypatch, None, TORCH_CUDA_12_ARCHS, nvcc_builds)
    command = [nvcc, "--dryrun", *flags, "-x", "cu", "-c", os.devnull, "-o", os.devnull]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, compile_failure(command, result)
