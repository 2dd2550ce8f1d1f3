"""How a step is timed: the device's clock, cold memory for every step, and the two ceilings
(the step's own access pattern, and a copy)."""

from __future__ import annotations

import itertools
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# A step whose tensors, all copies together, span this many last-level caches
# reaches each step with none of its bytes still cached from an earlier step.
COLD_CACHE_FACTOR = 4
# Copies in the scratch buffer start on this boundary, as torch's CUDA allocator aligns every tensor.
ALIGNMENT = 512
# The step-pattern ceiling's four arrays sit in the four quarters of the scratch buffer, array k
# shifted k times this many bytes into its quarter. Exactly a quarter (512 MiB) apart, the four
# streams share every address bit below 512 MiB, so they collide in the same cache sets and in the
# CPU's store-to-load alias checks: 6.5 GB/s on the 2-core EPYC instead of about 30 this way.
STEP_PATTERN_STAGGER = 4096 + 1024 + 64
# The arrays' length is a multiple of this many elements: no tail loop behind the vectorized one.
STEP_PATTERN_MULTIPLE = 64


@dataclass(frozen=True)
class RunPlan:
    """How many times to step: `warmup` steps, whose median sizes the rest, then enough
    timed steps to fill `budget_s`, at least `min_runs` and at most `max_runs`."""

    warmup: int
    min_runs: int
    max_runs: int
    budget_s: float


FULL = RunPlan(warmup=5, min_runs=10, max_runs=200, budget_s=2.0)
QUICK = RunPlan(warmup=2, min_runs=5, max_runs=20, budget_s=0.25)


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = {}
    for cache in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        if (cache / "type").read_text().strip() != "Instruction":
            size = (cache / "size").read_text().strip()  # e.g. "491520K"
            sizes[int((cache / "level").read_text())] = (
                int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]]
            )
    return sizes[max(sizes)]


def scratch_buffer(device: torch.device, cache_bytes: int) -> Tensor:
    """Bytes for the copies that keep steps cold and for the copy ceiling, allocated and
    touched once: fresh memory per measurement would cost a page fault per 4 KiB."""
    return torch.zeros(max(COLD_CACHE_FACTOR * cache_bytes, 2 << 30), dtype=torch.uint8, device=device)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _view_like(scratch: Tensor, offset: int, tensor: Tensor) -> Tensor:
    return scratch[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)


class Rotation:
    """Copies of the tensors a step moves, swapped in under the same tensor objects.

    The copies fill `scratch` (at least 4 caches), so together with the original they
    span more than 4 caches, or there is only the original, already that large.
    The optimizer (or compiled graph) keeps stepping the same Python tensors;
    `advance()` repoints their storage at the next copy, so consecutive steps
    touch different memory and nothing recompiles.
    """

    def __init__(self, tensors: list[Tensor], scratch: Tensor) -> None:
        self.tensors = tensors
        offsets = list(itertools.accumulate((_aligned(t.nbytes) for t in tensors), initial=0))
        footprint = offsets.pop()
        copies = scratch.numel() // footprint
        if copies:
            # The first copy tensor by tensor, then doubling what is written: a few large
            # copies rather than one per tensor and copy, which crawl on a busy machine.
            for tensor, offset in zip(tensors, offsets, strict=True):
                _view_like(scratch, offset, tensor).copy_(tensor)
            written = footprint
            while written < copies * footprint:
                chunk = min(written, copies * footprint - written)
                scratch[written : written + chunk].copy_(scratch[:chunk])
                written += chunk
        self.copies = [[t.detach() for t in tensors]] + [
            [
                _view_like(scratch, k * footprint + offset, t)
                for t, offset in zip(tensors, offsets, strict=True)
            ]
            for k in range(copies)
        ]
        self.position = 0

    def advance(self) -> None:
        self.position = (self.position + 1) % len(self.copies)
        with torch.no_grad():
            for tensor, storage in zip(self.tensors, self.copies[self.position], strict=True):
                tensor.set_(storage)

    def check(self, step: Callable[[], object]) -> None:
        """Raises unless a step after advance() updates the copy moved to and not the one left.

        A step that kept stepping the old storage (say, a compiled graph holding it)
        would be timed on one copy, in cache.
        """
        if len(self.copies) == 1:
            return
        left = self.copies[self.position][0]
        left_before = left.clone()
        self.advance()
        entered_before = self.tensors[0].clone()
        step()
        if not torch.equal(left, left_before) or torch.equal(self.tensors[0], entered_before):
            raise RuntimeError("the step does not follow Rotation.advance(): it would be timed in cache")


def time_calls(
    fn: Callable[[], object], count: int, device: torch.device, before_each: Callable[[], None]
) -> list[float]:
    """Seconds each of `count` calls of `fn` takes; `before_each` runs untimed before each call."""
    if device.type == "cuda":
        events = []
        for _ in range(count):
            before_each()
            # Each step starts on an idle GPU, so its time includes launching its kernels.
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()  # on the current stream, where fn launches its work
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(count):
        before_each()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(
    fn: Callable[[], object], device: torch.device, plan: RunPlan, before_each: Callable[[], None]
) -> list[float]:
    """The timed runs of `fn` after a warm-up that also sizes how many runs fit the budget."""
    warmup = time_calls(fn, plan.warmup, device, before_each)
    runs = round(plan.budget_s / statistics.median(warmup))
    return time_calls(fn, min(max(runs, plan.min_runs), plan.max_runs), device, before_each)


def copy_bandwidth(scratch: Tensor, plan: RunPlan) -> dict:
    """The reference bandwidth: `dst.copy_(src)` with src and dst the two halves of `scratch`."""
    src, dst = scratch.view(torch.float32).chunk(2)
    times = measure(lambda: dst.copy_(src), scratch.device, plan, before_each=lambda: None)
    moved = src.nbytes + dst.nbytes  # read src, write dst
    median = statistics.median(times)
    return {
        "buffer_bytes": src.nbytes,
        "bytes_moved": moved,
        "times_s": times,
        "median_s": median,
        "gb_per_s": moved / median / 1e9,
    }


def _step_pattern(param: Tensor, grad: Tensor, square_avg: Tensor, acc_delta: Tensor) -> None:
    """The step's memory traffic and nothing else: four arrays read, three of them written in place."""
    param.add_(grad)
    square_avg.add_(grad)
    acc_delta.add_(grad)


def step_pattern_arrays(scratch: Tensor) -> list[Tensor]:
    """Four float32 arrays of one length, one in each quarter of `scratch` (staggered, see above)."""
    floats = scratch.view(torch.float32)
    quarter = floats.numel() // 4
    stagger = STEP_PATTERN_STAGGER // 4
    length = (quarter - 3 * stagger) // STEP_PATTERN_MULTIPLE * STEP_PATTERN_MULTIPLE
    return [floats[k * (quarter + stagger) : k * (quarter + stagger) + length] for k in range(4)]


def _kernels(source: str) -> list[str]:
    """The names of the kernels inductor defined in one generated module's source."""
    return re.findall(r"^(\w+) = async_compile\.(?:cpp_pybinding|cpp|triton)\(", source, re.MULTILINE)


def step_pattern_bandwidth(scratch: Tensor, plan: RunPlan) -> dict:
    """The ceiling a step can reach: its own access pattern, in one pass.

    `p += g; s += g; a += g` over four float32 arrays that fill `scratch` (each larger than
    the last-level cache, together more than 4 of them, so nothing stays cached between
    passes), compiled by inductor into a single kernel: 4 reads and 3 writes per element
    (28 bytes), each array's lines read before they are written, as in an in-place step.
    Raises unless inductor made exactly one kernel. On CPU, `loops` counts the `for` loops
    in its C++ source: one is one pass (None on CUDA, where a pointwise triton kernel is one
    pass by construction).
    """
    # Imported here: torch._inductor is heavy, and only this measurement needs it.
    from torch._inductor.utils import run_and_get_code

    arrays = step_pattern_arrays(scratch)
    compiled = torch.compile(_step_pattern, fullgraph=True, dynamic=False)
    # The first call compiles (after a dynamo reset) and hands back the generated module(s).
    _, sources = run_and_get_code(compiled, *arrays)
    kernels = [name for source in sources for name in _kernels(source)]
    loops = None
    if scratch.device.type == "cpu":  # the module is Python around C++; only the C++ has `for(`
        loops = sum(len(re.findall(r"\bfor\s*\(", source)) for source in sources)
    if len(kernels) != 1:
        raise RuntimeError(
            f"the step-pattern ceiling compiled to {len(kernels)} kernels ({kernels}), not one fused pass;"
            " see TORCH_LOGS=output_code"
        )
    times = measure(lambda: compiled(*arrays), scratch.device, plan, before_each=lambda: None)
    # param, grad, square_avg and acc_delta read; param, square_avg and acc_delta written
    moved = 7 * arrays[0].nbytes
    median = statistics.median(times)
    return {
        "array_bytes": arrays[0].nbytes,
        "bytes_moved": moved,
        "kernels": kernels,
        "loops": loops,
        "times_s": times,
        "median_s": median,
        "gb_per_s": moved / median / 1e9,
    }
