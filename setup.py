"""Builds adadelta_ext._C: the op schema and its CPU kernel always, the CUDA
kernel too where torch has CUDA and nvcc is found.

ADADELTA_EXT_CUDA=1 forces the CUDA build (and fails without CUDA), =0 skips it.
ADADELTA_EXT_SANITIZE=1 builds with ASan and UBSan, CPU only (tools/sanitize.sh).
Build with `pip install --no-build-isolation -e .` so the installed torch is used.
"""

import os
import platform
import shutil

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


class BuildExtensionPerIsa(BuildExtension):
    """Compiles CPU_KERNEL_SOURCE once per entry of CPU_KERNEL_FLAGS and links all of them."""

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


def extension():
    sources = ["csrc/fused_adadelta.cpp", "csrc/fused_adadelta_inputs.cpp", "csrc/cpu/fused_adadelta_cpu.cpp"]
    # BuildExtensionPerIsa compiles the per-ISA kernels with these too.
    cxx_flags = ["-O1", "-fno-omit-frame-pointer", "-g", *SANITIZE_FLAGS] if SANITIZE else ["-O3"]
    link_flags = ["-fsanitize=address,undefined"] if SANITIZE else []
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
    # Machine code for A100 (sm_80) and H100 (sm_90), and sm_90's PTX, which the
    # driver compiles for GPUs newer than both.
    nvcc_flags = (
        ["-O3", "-lineinfo"]
        + [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ("80", "90")]
        + ["-gencode=arch=compute_90,code=compute_90"]
    )
    return CUDAExtension(
        "adadelta_ext._C",
        sources,
        extra_compile_args={"cxx": cxx_flags + ["-DADADELTA_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(
    packages=find_packages(include=["adadelta_ext", "adadelta_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtensionPerIsa},
)
