"""Builds adadelta_ext._C: the op schema and its CPU kernel always, the CUDA
kernel too where torch has CUDA and nvcc is found.

ADADELTA_EXT_CUDA=1 forces the CUDA build (and fails without CUDA), =0 skips it.
TORCH_CUDA_ARCH_LIST ("7.5;8.6+PTX") picks the GPU architectures, as for torch's own extensions.
ADADELTA_EXT_SANITIZE=1 builds with ASan and UBSan, CPU only (tools/sanitize.sh).
Build with `pip install --no-build-isolation -e .` so the installed torch is used.
"""

import os
import platform
import re
import shutil
import subprocess

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# The CPU kernel is compiled once per instruction set, as ATen compiles its own,
# and picked at run time; -march=native would make a build that crashes elsewhere.
# -ffp-contract=off: no a*b+c fused into an FMA where the instruction set has
# one, so every build rounds alike and gives bit-identical results.
#
# Adding an instruction set: add an entry here, named as ATen names the
# capability (at::get_cpu_capability(): "AVX2", "AVX512", "SVE256", ...), in
# ascending order, with the compiler flags that enable it. Nothing else: the
# build registers itself under that name, the op runs it when torch runs its own
# kernels with that capability, and the tests compare it with the others.
CPU_KERNEL_SOURCE = "csrc/cpu/adadelta_cpu_kernel.cpp"
CPU_KERNEL_COMMON_FLAGS = ["-ffp-contract=off"]
CPU_KERNEL_FLAGS = {"DEFAULT": []}
if platform.machine() in ("x86_64", "AMD64"):
    CPU_KERNEL_FLAGS["AVX2"] = ["-mavx2", "-mfma", "-mf16c"]
    CPU_KERNEL_FLAGS["AVX512"] = [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
    ]


# The sanitized build. -O1 -fno-omit-frame-pointer -g: ASan's advice, fast enough and with whole
# stacks and line numbers. -fno-sanitize-recover=all: UBSan aborts at a finding instead of
# printing it and going on, so the run fails.
# -fno-sanitize=vptr: torch's classes are not built for it (their RTTI comes from libraries that
# Python loads privately), so its dynamic-type checks on them are prone to false reports.
SANITIZE = os.environ.get("ADADELTA_EXT_SANITIZE") == "1"
# -fno-wrapv: Python's own CFLAGS make signed overflow defined (-fwrapv), hiding it from UBSan.
SANITIZE_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-sanitize=vptr",
    "-fno-wrapv",
]


def build_cuda() -> bool:
    if SANITIZE:  # ASan does not cover device code: a sanitized build is CPU only
        return False
    forced = os.environ.get("ADADELTA_EXT_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None


# The extension must use the libstdc++ that torch's libraries use: the shared one. A toolchain
# that links it statically by default (the GPU image's Python was built with one, /opt/gcc) puts a
# private copy in the extension, whose locale state disagrees with the shared copy's: every number
# formatted into an error message then comes out empty or crashes the process. Naming the library
# links the shared one where the copy comes from -static-libstdc++; /opt/gcc still linked its own
# (tests/gpu-results/2026-11-26-h200.md), and the check after linking refuses such a build.
SHARED_LIBSTDCXX_FLAGS = ["-lstdc++"] if platform.system() == "Linux" else []


def libstdcxx_is_shared(shared_object: str) -> bool | None:
    """Whether shared_object loads libstdc++ as a shared library; None where that cannot be read
    (not Linux, or no readelf)."""
    readelf = shutil.which("readelf")
    if platform.system() != "Linux" or readelf is None:
        return None
    dynamic = subprocess.run(
        [readelf, "--dynamic", shared_object], capture_output=True, text=True, check=True
    )
    return "[libstdc++.so" in dynamic.stdout


class BuildExtensionPerIsa(BuildExtension):
    """Compiles CPU_KERNEL_SOURCE once per entry of CPU_KERNEL_FLAGS, links all of them, and checks
    that the result loads the shared libstdc++."""

    def build_extension(self, ext):
        cxx_flags = (
            ext.extra_compile_args["cxx"]
            if isinstance(ext.extra_compile_args, dict)
            else ext.extra_compile_args
        )
        for rank, (isa, isa_flags) in enumerate(CPU_KERNEL_FLAGS.items()):
            ext.extra_objects += self.compiler.compile(
                [CPU_KERNEL_SOURCE],
                output_dir=os.path.join(self.build_temp, isa),
                macros=[
                    ("CPU_CAPABILITY", isa),
                    (f"CPU_CAPABILITY_{isa}", None),
                    ("ADADELTA_CPU_ISA_RANK", str(rank)),
                ],
                include_dirs=ext.include_dirs,
                extra_postargs=cxx_flags + CPU_KERNEL_COMMON_FLAGS + isa_flags,
            )
        super().build_extension(ext)
        built = self.get_ext_fullpath(ext.name)
        if libstdcxx_is_shared(built) is False:
            raise RuntimeError(
                f"{built} holds its own copy of libstdc++, linked statically by "
                f"{self.compiler.linker_so[0]}, beside the shared one torch loads: numbers in its "
                "error messages would come out empty or crash the process. Build with a compiler "
                "that links libstdc++ dynamically, e.g. CC=gcc CXX=g++ LDSHARED='gcc -shared' "
                "LDCXXSHARED='g++ -shared' pip install --no-build-isolation ."
            )


# The CUDA kernel is built for the GPUs torch runs on: those TORCH_CUDA_ARCH_LIST names when set
# (torch's own variable, in its format: "7.5;8.6+PTX"), else those this torch was built for. Each
# gets machine code, and the newest PTX too, which the driver compiles for newer GPUs. Where
# neither names any (a CPU torch; an older torch where no GPU is visible), A100 (sm_80) and
# H100 (sm_90), with sm_90's PTX.
FALLBACK_CUDA_ARCHS = ["8.0", "9.0+PTX"]


def requested_cuda_archs() -> list[str]:
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").split()
    return listed or torch.cuda.get_arch_list() or FALLBACK_CUDA_ARCHS


def nvcc_gpu_names() -> set[str]:
    """What the nvcc BuildExtension compiles with can build: sm_75, ..., compute_75, ..."""
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"
    listings = [
        subprocess.run([nvcc, option], capture_output=True, text=True, check=True).stdout
        for option in ("--list-gpu-code", "--list-gpu-arch")
    ]
    return set(" ".join(listings).split())


def cuda_arch_flags(archs: list[str], nvcc_builds: set[str]) -> list[str]:
    """nvcc's -gencode flags: machine code for each of archs, PTX for those marked so and the newest.

    archs as TORCH_CUDA_ARCH_LIST writes them ("8.6", "8.6+PTX") or torch.cuda.get_arch_list()
    ("sm_86", "compute_86"); a variant such as 9.0a builds as its base, as the kernel uses no
    architecture-specific instruction. Those this nvcc cannot build are dropped: a torch built
    with CUDA 12 lists sm_50 to sm_70, which CUDA 13 no longer builds.
    """
    machine_code, ptx = set(), set()
    for arch in archs:
        if numbered := re.fullmatch(r"(\d+)\.(\d)[af]?(\+PTX)?", arch):
            number = int(numbered[1] + numbered[2])
            machine_code.add(number)
            if numbered[3]:
                ptx.add(number)
        elif named := re.fullmatch(r"(sm|compute)_(\d+)[af]?", arch):
            (machine_code if named[1] == "sm" else ptx).add(int(named[2]))
        else:
            raise ValueError(
                f"unknown CUDA architecture {arch!r}: TORCH_CUDA_ARCH_LIST takes numbered ones, "
                "as in '7.5;8.6+PTX' (names such as 'Ampere', and 'native', are not supported)"
            )
    machine_code = sorted(number for number in machine_code if f"sm_{number}" in nvcc_builds)
    if not machine_code:
        raise ValueError(f"nvcc builds none of the CUDA architectures {archs}")
    ptx = sorted(number for number in ptx | {machine_code[-1]} if f"compute_{number}" in nvcc_builds)
    return [f"-gencode=arch=compute_{number},code=sm_{number}" for number in machine_code] + [
        f"-gencode=arch=compute_{number},code=compute_{number}" for number in ptx
    ]


def extension():
    sources = [
        "csrc/fused_adadelta.cpp",
        "csrc/fused_adadelta_inputs.cpp",
        "csrc/gathered_step.cpp",
        "csrc/cpu/fused_adadelta_cpu.cpp",
    ]
    # BuildExtensionPerIsa compiles the per-ISA kernels with these too.
    cxx_flags = ["-O1", "-fno-omit-frame-pointer", "-g", *SANITIZE_FLAGS] if SANITIZE else ["-O3"]
    link_flags = SHARED_LIBSTDCXX_FLAGS + (["-fsanitize=address,undefined"] if SANITIZE else [])
    if torch.backends.openmp.is_available():
        # at::parallel_for is a header template: its OpenMP pragmas run in
        # parallel only when this extension is compiled with OpenMP too.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if not build_cuda():
        return CppExtension(
            "adadelta_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    sources += ["csrc/cuda/fused_adadelta_cuda.cpp", "csrc/cuda/adadelta_cuda_launch.cu"]
    # No --use_fast_math: it changes sqrt and division and breaks parity with torch.
    # -gencode flags of our own: BuildExtension then adds none from TORCH_CUDA_ARCH_LIST.
    nvcc_flags = ["-O3", "-lineinfo", *cuda_arch_flags(requested_cuda_archs(), nvcc_gpu_names())]
    return CUDAExtension(
        "adadelta_ext._C",
        sources,
        extra_compile_args={"cxx": cxx_flags + ["-DADADELTA_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


# pip runs this file as __main__ (setuptools' build backend too): the tests import it for the
# functions above without building.
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["adadelta_ext", "adadelta_ext.*"]),
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtensionPerIsa},
    )
