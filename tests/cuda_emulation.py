"""The CUDA kernel, run on the CPU: csrc/cuda's launch and kernel compiled by the host C++ compiler
against tests/emulated_cuda/'s CUDA headers (thread and block indices as loop variables, rounding
intrinsics as the host's IEEE operations, the launch a loop over blocks and threads in a chosen
order), so that CI, which has no GPU, executes the kernel's indexing and arithmetic.

`EmulatedKernel()` builds the library once per source and flags (under build/emulated_cuda/, or
`build_root`), safely from several processes at once, and loads it; `mutations` plants a bug in a
copy of the sources, to show the tests catch it, and `cudart_version` builds it as a toolkit of that
version would (CUDA 13.0 by default). Each call runs on an `EmulatedDevice`, whose driver version
and compute capability decide, as on a GPU, whether a launch may take 32 KB of arguments or 4 KB.
With ADADELTA_EXT_SANITIZE=1 (tools/sanitize.sh sets it, and preloads the runtimes) it is built with
AddressSanitizer and UBSan.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "emulated_cuda"
KERNEL_SOURCES = [
    "csrc/adadelta_math.h",
    "csrc/cuda/adadelta_cuda_kernel.cuh",
    "csrc/cuda/adadelta_cuda_launch.h",
]
LAUNCH_SOURCE = "csrc/cuda/adadelta_cuda_launch.cu"

FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas"]
SANITIZE_FLAGS = [
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
]

# (param, grad, state) dtypes, as fused_adadelta_cuda.cpp groups params.
INSTANCES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.float64),
    (torch.float64, torch.float32, torch.float64),
    (torch.float16, torch.float16, torch.float16),
    (torch.float16, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.float16),
    (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.float32),
]
SIXTEEN_BIT_INSTANCES = INSTANCES[3:]
# How a 16-bit param takes its result: round to nearest, kahan_sum, stochastic_round.
ROUNDINGS = ("nearest", "kahan", "stochastic")
# (dtypes, rounding), numbered as harness.cpp's kInstances.
KERNELS = [(dtypes, "nearest") for dtypes in INSTANCES] + [
    (dtypes, rounding) for rounding in ROUNDINGS[1:] for dtypes in SIXTEEN_BIT_INSTANCES
]
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}
CONVERSIONS = {"half_to_float": 0, "float_to_half": 1, "bfloat16_to_float": 2, "float_to_bfloat16": 3}


@dataclass(frozen=True)
class EmulatedDevice:
    """The GPU and driver a call runs on: a launch may take 32,764 bytes of arguments where the build's
    toolkit and the driver are CUDA 12.1 or newer and the GPU is Volta (7.x) or newer, else 4,096."""

    compute_capability_major: int = 9
    driver_version: int = 13000  # 1000 * major + 10 * minor, as cudaDriverGetVersion reports


HOPPER = EmulatedDevice()
PASCAL = EmulatedDevice(compute_capability_major=6)
# A CUDA 12.x build on a CUDA 12.0 (r525) driver, under minor version compatibility.
OLD_DRIVER = EmulatedDevice(driver_version=12000)


class Launch(NamedTuple):
    blocks: int
    argument_bytes: int


class EmulatedLaunchError(RuntimeError):
    """The launch function returned an error (a launch the emulated driver refused, for one)."""


def rewrite_launch(source: str) -> str:
    """`kernel<...><<<grid, block, shared, stream>>>(args)` as `emulated_launch(kernel<...>, grid, ...,
    args)`: the one change the host compiler needs."""
    rewritten, count = re.subn(
        r"(\w+(?:<[^<>;]*>)?)\s*<<<(.+?)>>>\s*\(", r"emulated_launch(\1, \2, ", source, flags=re.DOTALL
    )
    # The update kernel's and increment_steps_kernel's.
    assert count == 2, f"expected two kernel launches in {LAUNCH_SOURCE}, found {count}"
    return rewritten


class EmulatedKernel:
    """The emulated CUDA launch, with `mutations`: {path: [(old, new), ...]} applied to the sources."""

    def __init__(
        self,
        mutations: dict[str, list[tuple[str, str]]] | None = None,
        *,
        cudart_version: int | None = None,
        build_root: Path = ROOT / "build" / "emulated_cuda",
    ):
        sources = {path: (ROOT / path).read_text() for path in [*KERNEL_SOURCES, LAUNCH_SOURCE]}
        for path, changes in (mutations or {}).items():
            for old, new in changes:
                assert sources[path].count(old) == 1, f"the mutation's text occurs once in {path}: {old!r}"
                sources[path] = sources[path].replace(old, new)
        sources[LAUNCH_SOURCE] = rewrite_launch(sources[LAUNCH_SOURCE])
        sanitize = os.environ.get("ADADELTA_EXT_SANITIZE") == "1"
        flags = FLAGS + (SANITIZE_FLAGS if sanitize else [])
        if cudart_version is not None:
            flags.append(f"-DCUDART_VERSION={cudart_version}")
        emulation = {path.name: path.read_text() for path in sorted(EMULATION.iterdir())}
        digest = hashlib.sha256(repr((sources, emulation, flags)).encode()).hexdigest()[:16]
        library = build_root / digest / "libemulated_cuda.so"
        if not library.exists():
            self._build(library, sources, flags)
        self.lib = ctypes.CDLL(str(library))
        self.lib.emulated_fused_adadelta.restype = ctypes.c_int
        self.lib.emulated_launches_made.restype = ctypes.c_size_t

    @staticmethod
    def _build(library: Path, sources: dict[str, str], flags: list[str]) -> None:
        # pytest-xdist's workers may build one library at once (on a fresh machine, they do): each
        # builds in a directory of its own, and the finished library replaces any other atomically.
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            directory = Path(scratch)
            for path, text in sources.items():
                (directory / path).parent.mkdir(parents=True, exist_ok=True)
                (directory / path).write_text(text)
            built = directory / library.name
            command = [
                os.environ.get("CXX", "c++"),
                *flags,
                f"-I{EMULATION}",
                f'-DADADELTA_LAUNCH_SOURCE="{directory / LAUNCH_SOURCE}"',
                str(EMULATION / "harness.cpp"),
                "-o",
                str(built),
            ]
            # Not the compiler under the sanitizer runtimes tools/sanitize.sh preloads into the tests.
            environment = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
            result = subprocess.run(command, capture_output=True, text=True, env=environment)
            assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"
            os.replace(built, library)

    def fused_adadelta_(
        self,
        params,
        grads,
        square_avgs,
        acc_deltas,
        state_steps,
        *,
        lr,
        rho,
        eps,
        weight_decay,
        maximize,
        grad_scale=None,
        found_inf=None,
        round_lr_product=False,
        compensations=None,
        stochastic_round_seeds=None,
        order="forward",
        seed=0,
        device: EmulatedDevice = HOPPER,
    ) -> list[Launch]:
        """What fused_adadelta_ does on CUDA, on CPU tensors (contiguous, real, checked by the caller):
        one launch call per (param, grad, state) dtypes, as fused_adadelta_cuda.cpp makes, on `device`,
        then with stochastic rounding one for the step counters. Returns every kernel launch made;
        raises EmulatedLaunchError if a launch call fails."""
        self.lib.emulated_configure(
            ORDERS[order], seed, device.driver_version, device.compute_capability_major
        )
        # As the glue, the kernel reads float32 or float64 scalars; `readable` holds the copies.
        readable = [
            value if value is None or value.dtype in (torch.float32, torch.float64) else value.float()
            for value in (lr if isinstance(lr, torch.Tensor) else None, grad_scale, found_inf)
        ]
        scalars = []
        for value in readable:
            scalars += [None, 0] if value is None else [value.data_ptr(), int(value.dtype == torch.float64)]
        number_lr = 0.0 if isinstance(lr, torch.Tensor) else lr
        options = (ctypes.c_double * 4)(number_lr, rho, eps, weight_decay)
        rounding = "kahan" if compensations is not None else "nearest"
        rounding = "stochastic" if stochastic_round_seeds is not None else rounding
        groups: dict[int, list[int]] = {}
        for index, (param, grad, square_avg) in enumerate(zip(params, grads, square_avgs, strict=True)):
            dtypes = (param.dtype, grad.dtype, square_avg.dtype)
            groups.setdefault(KERNELS.index((dtypes, rounding)), []).append(index)
        for instance, indices in groups.items():
            tensors = [(params[i], grads[i], square_avgs[i], acc_deltas[i], state_steps[i]) for i in indices]
            assert all(t.is_contiguous() and t.device.type == "cpu" for row in tensors for t in row)
            pointers = (ctypes.c_void_p * (5 * len(indices)))(*[t.data_ptr() for row in tensors for t in row])
            step_is_double = (ctypes.c_ubyte * len(indices))(
                *[int(row[4].dtype == torch.float64) for row in tensors]
            )
            numels = (ctypes.c_int64 * len(indices))(*[row[0].numel() for row in tensors])
            group_compensations = None
            if compensations is not None:
                group_compensations = (ctypes.c_void_p * len(indices))(
                    *[compensations[i].data_ptr() for i in indices]
                )
            seeds = None
            if stochastic_round_seeds is not None:
                seeds = (ctypes.c_uint64 * len(indices))(*[stochastic_round_seeds[i] for i in indices])
            error = self.lib.emulated_fused_adadelta(
                instance,
                ctypes.c_size_t(len(indices)),
                pointers,
                step_is_double,
                numels,
                group_compensations,
                seeds,
                options,
                int(maximize),
                int(round_lr_product),
                *[ctypes.c_void_p(v) if i % 2 == 0 else ctypes.c_int(v) for i, v in enumerate(scalars)],
            )
            if error != 0:
                raise EmulatedLaunchError(f"the emulated launch returned cudaError_t {error}")
        if stochastic_round_seeds is not None:
            # After every group's update, group by group, as the glue does.
            found = readable[2]
            for indices in groups.values():
                steps = (ctypes.c_void_p * len(indices))(*[state_steps[i].data_ptr() for i in indices])
                step_is_double = (ctypes.c_ubyte * len(indices))(
                    *[int(state_steps[i].dtype == torch.float64) for i in indices]
                )
                error = self.lib.emulated_increment_steps(
                    ctypes.c_size_t(len(indices)),
                    steps,
                    step_is_double,
                    ctypes.c_void_p(None if found is None else found.data_ptr()),
                    ctypes.c_int(int(found is not None and found.dtype == torch.float64)),
                )
                if error != 0:
                    raise EmulatedLaunchError(f"the emulated step increment returned cudaError_t {error}")
        capacity = 4096
        grids = (ctypes.c_uint * capacity)()
        argument_bytes = (ctypes.c_size_t * capacity)()
        count = self.lib.emulated_launches_made(grids, argument_bytes, ctypes.c_size_t(capacity))
        assert count <= capacity, f"{count} launches"
        return [Launch(grids[i], argument_bytes[i]) for i in range(count)]

    def convert(self, kind: str, values: torch.Tensor) -> torch.Tensor:
        """The emulated __half/__nv_bfloat16 conversion `kind` (see CONVERSIONS) of a contiguous tensor:
        int16 bit patterns to float32, or float32 to int16 bit patterns."""
        to_float = kind.endswith("_to_float")
        assert values.dtype == (torch.int16 if to_float else torch.float32) and values.is_contiguous()
        out = torch.empty(values.shape, dtype=torch.float32 if to_float else torch.int16)
        self.lib.emulated_convert(
            CONVERSIONS[kind],
            ctypes.c_void_p(values.data_ptr()),
            ctypes.c_void_p(out.data_ptr()),
            ctypes.c_size_t(values.numel()),
        )
        return out
