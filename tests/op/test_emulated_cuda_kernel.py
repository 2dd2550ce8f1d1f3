"""The CUDA kernel, executed without a GPU: csrc/cuda's launch and kernel compiled by the host
compiler against an emulated CUDA runtime (tests/cuda_emulation.py, tests/emulated_cuda/), run
against the CPU op. Both round every op explicitly and alike (csrc/adadelta_math.h), so the
assertion is bit-for-bit equality (NaN positions equal, every other bit pattern equal) for every
(param, grad, state) dtype instance, sizes around the 16-byte vectors and 4096-element chunks,
each pointer misaligned, more tensors than one launch holds in both argument layouts (32 KB where
the build, driver and GPU allow it, 4 KB elsewhere), tensor scalars of both dtypes, shared step
tensors, inf/NaN/subnormal inputs and any block and thread order. Every tensor sits between guard
elements that must be unchanged: the kernel stays in bounds (tools/sanitize.sh also runs this file
under AddressSanitizer and UBSan). The last test plants bugs in the kernel and checks that these
comparisons catch each.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_emulation import (
    HOPPER,
    INSTANCES,
    OLD_DRIVER,
    PASCAL,
    SIXTEEN_BIT_INSTANCES,
    EmulatedDevice,
    EmulatedKernel,
    EmulatedLaunchError,
    Launch,
)

from adadelta_ext import fused_adadelta_

CHUNK = 4096  # kChunkElements: one block's elements
SMALL_ARGUMENTS, LARGE_ARGUMENTS = 4096, 32764  # bytes, the two layouts' limits
TENSORS_PER_LAUNCH = {SMALL_ARGUMENTS: 75, LARGE_ARGUMENTS: 616}
# With kahan_sum or stochastic_round, each tensor's metadata takes 8 bytes more.
ROUNDED_TENSORS_PER_LAUNCH = {SMALL_ARGUMENTS: 65, LARGE_ARGUMENTS: 535}
# Around the 2 to 8 element vectors and the chunks; the last, 24 chunks and a ragged one. In one
# launch, so consecutive blocks cross from tensor to tensor at each of these sizes.
SIZES = [0, 1, 7, 8, 9, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 100_000]
ROLES = ("params", "grads", "square_avgs", "acc_deltas")
GUARD = 16  # elements of sentinel before and after each tensor
SENTINEL = -12345.0  # exact in every dtype
OPTIONS = {"lr": 0.5, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.01, "maximize": False}
# Options that take each branch of the update and each way scalars reach the kernel.
OPTION_CASES = {
    "defaults": {},
    "maximize_without_weight_decay": {"maximize": True, "weight_decay": 0.0, "rho": 0.95},
    "rho_zero": {"rho": 0.0, "lr": 1.0},  # 1 - rho == 1: the fused g*g of torch's addcmul
    "float32_tensor_lr_capturable": {"lr": torch.tensor(0.3), "round_lr_product": True},
    "float64_tensor_lr": {"lr": torch.tensor(0.3, dtype=torch.float64)},
    "float32_grad_scale": {"grad_scale": torch.tensor(1024.0), "found_inf": torch.tensor(0.0)},
    "float64_grad_scale_not_a_power_of_two": {
        "grad_scale": torch.tensor(3.0, dtype=torch.float64),
        "found_inf": torch.tensor(0.0, dtype=torch.float64),
    },
    "found_inf_skips_the_step": {"grad_scale": torch.tensor(8.0), "found_inf": torch.tensor(1.0)},
}
INSTANCE_IDS = ["-".join(str(d).removeprefix("torch.") for d in instance) for instance in INSTANCES]


@pytest.fixture(scope="module")
def kernel() -> EmulatedKernel:
    return EmulatedKernel()


@pytest.fixture(scope="module")
def kernel_of_cuda_12_0() -> EmulatedKernel:
    """Built as CUDA 12.0's toolkit would: its kernels can take 4 KB of arguments only."""
    return EmulatedKernel(cudart_version=12000)


# Where the launch must use each layout: (build, device, the layout's argument limit).
LAYOUT_CASES = {
    "32KB": ("kernel", HOPPER, LARGE_ARGUMENTS),
    "4KB_pre_volta_gpu": ("kernel", PASCAL, SMALL_ARGUMENTS),
    "4KB_cuda_12_0_driver": ("kernel", OLD_DRIVER, SMALL_ARGUMENTS),
    "4KB_cuda_12_0_build": ("kernel_of_cuda_12_0", HOPPER, SMALL_ARGUMENTS),
}


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """inf, NaN, zeros, subnormals and the extremes of `dtype`."""
    info = torch.finfo(dtype)
    values = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, info.max, -info.max, info.tiny]
    values += [info.tiny / 4, -info.tiny / 2, info.eps, 1e30 if dtype != torch.float16 else 6e4]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def guarded_lists(
    sizes,
    instances,
    *,
    misaligned=(),
    misaligned_every=1,
    special=False,
    shared_step=False,
    compensations=False,
    seed=0,
) -> tuple[dict[str, list[torch.Tensor]], list[tuple[torch.Tensor, int, int]]]:
    """op lists (one entry per size, instances[i % len] giving its dtypes), each tensor a view into a
    buffer of SENTINEL guards; the lists named in `misaligned` start one element later, in every
    `misaligned_every`-th param from the first. `special` scatters special_values into every tensor;
    `shared_step`: params 0 and 1 share a step tensor; `compensations` adds a list of them (kahan_sum).
    Returns the lists and (buffer, start, end) of every view, to check the guards with."""
    generator = torch.Generator().manual_seed(seed)
    roles = (*ROLES, "compensations") if compensations else ROLES
    lists = {role: [] for role in (*roles, "state_steps")}
    views = []
    for index, size in enumerate(sizes):
        param_dtype, grad_dtype, state_dtype = instances[index % len(instances)]
        dtypes = (param_dtype, grad_dtype, state_dtype, state_dtype, param_dtype)
        for role, dtype in zip(roles, dtypes[: len(roles)], strict=True):
            # A compensation holds what the param's rounding lost: under its spacing.
            low, high = {"params": (-1.0, 1.0), "grads": (-1.0, 1.0), "compensations": (-1e-3, 1e-3)}.get(
                role, (0.1, 1.0)
            )
            values = torch.empty(size, dtype=torch.float64).uniform_(low, high, generator=generator).to(dtype)
            if special and size > 0:
                spots = torch.randint(0, size, (len(special_values(dtype)),), generator=generator)
                values[spots] = special_values(dtype)
            start = GUARD + (1 if role in misaligned and index % misaligned_every == 0 else 0)
            buffer = torch.full((start + size + GUARD,), SENTINEL, dtype=dtype)
            buffer[start : start + size] = values
            lists[role].append(buffer[start : start + size])
            views.append((buffer, start, start + size))
        step_dtype = torch.float64 if index % 2 else torch.float32
        lists["state_steps"].append(torch.tensor(3.0, dtype=step_dtype))
    if shared_step:
        lists["state_steps"][1] = lists["state_steps"][0]
    return lists, views


def copy_lists(lists, views):
    """A copy of guarded_lists' output: the same values in new guarded buffers (steps shared alike)."""
    buffers = {}
    copied_views = []
    for buffer, start, end in views:
        copy = buffers.setdefault(id(buffer), buffer.clone())
        copied_views.append((copy, start, end))
    copied = {role: [] for role in lists}
    # guarded_lists made the views param by param, role by role.
    roles = [role for role in lists if role != "state_steps"]
    for view_index, (copy, start, end) in enumerate(copied_views):
        copied[roles[view_index % len(roles)]].append(copy[start:end])
    steps = {}
    copied["state_steps"] = [steps.setdefault(id(step), step.clone()) for step in lists["state_steps"]]
    return copied, copied_views


def bit_differences(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None if NaNs sit at the same places and every other element has the same bits."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return f"{actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
    nan = expected.isnan()
    if not torch.equal(actual.isnan(), nan):
        return f"NaN at {int((actual.isnan() != nan).sum())} other places"
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
    differ = (actual.view(bits) != expected.view(bits)) & ~nan
    if differ.any():
        first = int(differ.flatten().nonzero()[0])
        return (
            f"{int(differ.sum())} of {expected.numel()} elements differ, first at {first}: "
            f"{actual.flatten()[first].item()!r} vs {expected.flatten()[first].item()!r}"
        )
    return None


def op_arguments(lists) -> list[list[torch.Tensor]]:
    """The op's positional lists among `lists`."""
    return [lists[role] for role in (*ROLES, "state_steps")]


def mismatches(
    kernel,
    lists,
    views,
    options,
    *,
    order="forward",
    device: EmulatedDevice = HOPPER,
    launches: list[Launch] | None = None,
) -> list[str]:
    """Runs the emulated kernel on `lists` and the CPU op on a copy; every difference, named. The
    kernel's launches are appended to `launches`."""
    cpu_lists, cpu_views = copy_lists(lists, views)
    fused_adadelta_(*op_arguments(cpu_lists), compensations=cpu_lists.get("compensations"), **options)
    found = []
    try:
        made = kernel.fused_adadelta_(
            *op_arguments(lists),
            compensations=lists.get("compensations"),
            **options,
            order=order,
            device=device,
        )
    except EmulatedLaunchError as error:
        found.append(str(error))
        made = []
    if launches is not None:
        launches += made
    for role, tensors in lists.items():
        for index, (ours, cpus) in enumerate(zip(tensors, cpu_lists[role], strict=True)):
            difference = bit_differences(ours, cpus)
            if difference:
                found.append(f"{role}[{index}]: {difference}")
    for device, guarded in (("emulated CUDA", views), ("CPU", cpu_views)):
        for buffer, start, end in guarded:
            if not (torch.cat([buffer[:start], buffer[end:]]) == SENTINEL).all():
                found.append(f"{device}: a write outside a tensor of {end - start} elements")
    return found


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_16_bit_conversions_round_as_torch_does_for_every_pattern(kernel, dtype):
    """Every 16-bit pattern to float32, and to 16 bits from the float32 values that decide rounding:
    each pattern's value, the midpoints between neighbours (ties to even) and the float32 values
    next to each midpoint. torch rounds to nearest even as CUDA does; NaNs compare as NaN."""
    name = "half" if dtype == torch.float16 else "bfloat16"
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = patterns.view(dtype).float()
    assert bit_differences(kernel.convert(f"{name}_to_float", patterns), values) is None

    finite = values[values.isfinite()].unique()  # sorted
    midpoints = (finite[:-1].double() + finite[1:].double()).div(2).float()  # exact in float32
    inf = torch.tensor([float("inf")])
    probes = torch.cat(
        [values, midpoints, midpoints.nextafter(inf), midpoints.nextafter(-inf), torch.tensor([1e38, -1e38])]
    ).contiguous()
    emulated = kernel.convert(f"float_to_{name}", probes).view(dtype)
    assert bit_differences(emulated, probes.to(dtype)) is None


@pytest.mark.parametrize("option_case", OPTION_CASES.keys())
@pytest.mark.parametrize("instance", INSTANCES, ids=INSTANCE_IDS)
def test_kernel_matches_cpu_op_bit_for_bit(kernel, instance, option_case):
    """Every size, one dtype instance, each way of taking a step; launched in forward order."""
    lists, views = guarded_lists(SIZES, [instance])
    assert mismatches(kernel, lists, views, {**OPTIONS, **OPTION_CASES[option_case]}) == []


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
@pytest.mark.parametrize("misaligned", [(role,) for role in ROLES] + [ROLES], ids=lambda r: "+".join(r))
@pytest.mark.parametrize("instance", INSTANCES, ids=INSTANCE_IDS)
def test_misaligned_tensors_in_any_block_and_thread_order(kernel, instance, misaligned, order):
    """Each pointer one element off 16-byte alignment alone, and all four: the element-wise path."""
    lists, views = guarded_lists(SIZES, [instance], misaligned=misaligned, seed=1)
    assert mismatches(kernel, lists, views, OPTIONS, order=order) == []


@pytest.mark.parametrize("instance", INSTANCES, ids=INSTANCE_IDS)
def test_inf_nan_and_subnormal_inputs(kernel, instance):
    lists, views = guarded_lists(SIZES, [instance], special=True, seed=2)
    assert mismatches(kernel, lists, views, OPTIONS, order="shuffled") == []


def layout_problems(launches: list[Launch], argument_limit: int) -> list[str]:
    """What is wrong with the layout of `launches` where it should be that of `argument_limit`."""
    low = 0 if argument_limit == SMALL_ARGUMENTS else SMALL_ARGUMENTS
    return [
        f"launch {index}: {launch.argument_bytes} bytes of arguments, not in ({low}, {argument_limit}]"
        for index, launch in enumerate(launches)
        if not low < launch.argument_bytes <= argument_limit
    ]


@pytest.mark.parametrize("layout", LAYOUT_CASES.keys())
def test_a_thousand_small_tensors(request, layout):
    """1,000 tensors of 4,096 float32 elements (the benchmark's 1000x4096): two launches with 32 KB
    of arguments, 14 with 4 KB (75 tensors each), one block per tensor, in the layout the build,
    driver and GPU allow, bit for bit."""
    build, device, argument_limit = LAYOUT_CASES[layout]
    count = 1000
    lists, views = guarded_lists([CHUNK] * count, [INSTANCES[0]], seed=5)
    launches = []
    found = mismatches(request.getfixturevalue(build), lists, views, OPTIONS, order="shuffled", device=device)
    found += mismatches(
        request.getfixturevalue(build), lists, views, OPTIONS, device=device, launches=launches
    )
    assert found == []
    assert layout_problems(launches, argument_limit) == []
    assert len(launches) == math.ceil(count / TENSORS_PER_LAUNCH[argument_limit])
    assert sum(launch.blocks for launch in launches) == count


@pytest.mark.parametrize("layout", LAYOUT_CASES.keys())
def test_more_tensors_than_one_launch_holds(request, layout):
    """200 tensors of two instances, interleaved, of sizes up to 5000: one launch per instance with
    32 KB of arguments, two with 4 KB (the emulated launch fails above the limit, as the driver's)."""
    build, device, argument_limit = LAYOUT_CASES[layout]
    instances = [INSTANCES[0], INSTANCES[10]]
    sizes = [(index * 7919) % 5000 for index in range(200)]
    lists, views = guarded_lists(sizes, instances, seed=3)
    launches = []
    found = mismatches(
        request.getfixturevalue(build),
        lists,
        views,
        OPTIONS,
        order="shuffled",
        device=device,
        launches=launches,
    )
    assert found == []
    assert layout_problems(launches, argument_limit) == []
    assert len(launches) == (2 if argument_limit == LARGE_ARGUMENTS else 4)


@pytest.mark.parametrize("device", [HOPPER, PASCAL], ids=["32KB", "4KB"])
@pytest.mark.parametrize("instance", INSTANCES, ids=INSTANCE_IDS)
def test_blocks_cross_tensor_boundaries_at_chunk_and_vector_sizes(kernel, instance, device):
    """120 tensors a few elements either side of multiples of the chunk and of the vectors, in a
    random order, with grad and acc_delta misaligned in every other one: in one launch with 32 KB of
    arguments, in two with 4 KB. Consecutive blocks cross from tensor to tensor at every kind of
    size and alignment, and the 4 KB layout splits the list."""
    generator = torch.Generator().manual_seed(6)
    around = [
        multiple + offset for multiple in (0, 8, CHUNK, 2 * CHUNK) for offset in (-9, -8, -1, 0, 1, 7, 8, 9)
    ]
    sizes = [max(0, around[int(i)]) for i in torch.randint(0, len(around), (120,), generator=generator)]
    lists, views = guarded_lists(
        sizes, [instance], misaligned=("grads", "acc_deltas"), misaligned_every=2, seed=7
    )
    launches = []
    assert mismatches(kernel, lists, views, OPTIONS, order="shuffled", device=device, launches=launches) == []
    assert len(launches) == (1 if device == HOPPER else 2)


def test_params_sharing_a_step_tensor_each_add_one(kernel):
    lists, views = guarded_lists([5, 70_000, 3], [INSTANCES[0]], shared_step=True, seed=4)
    assert mismatches(kernel, lists, views, OPTIONS) == []
    assert lists["state_steps"][0].item() == 5.0


SIXTEEN_BIT_IDS = [INSTANCE_IDS[INSTANCES.index(instance)] for instance in SIXTEEN_BIT_INSTANCES]
ROUNDINGS = ("kahan_sum", "stochastic_round")
ROUNDING_OPTION_CASES = (
    "defaults",
    "float32_tensor_lr_capturable",
    "float32_grad_scale",
    "found_inf_skips_the_step",
)


def rounded(rounding: str, sizes, instances, *, seed: int, **layout):
    """guarded_lists for `rounding` (compensations for kahan_sum) and the op's keyword for it (seeds of
    every sign and magnitude for stochastic_round)."""
    lists, views = guarded_lists(sizes, instances, compensations=rounding == "kahan_sum", seed=seed, **layout)
    if rounding == "kahan_sum":
        return lists, views, {}
    generator = torch.Generator().manual_seed(seed)
    seeds = torch.randint(-(2**63), 2**63 - 1, (len(sizes),), generator=generator).tolist()
    return lists, views, {"stochastic_round_seeds": seeds}


@pytest.mark.parametrize("order", ["forward", "shuffled"])
@pytest.mark.parametrize("option_case", ROUNDING_OPTION_CASES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("instance", SIXTEEN_BIT_INSTANCES, ids=SIXTEEN_BIT_IDS)
def test_kahan_sum_and_stochastic_round_match_the_cpu_op(kernel, instance, rounding, option_case, order):
    """Every size, 16-bit dtype instance and rounding, with the compensations of every other param
    misaligned (the element-wise path), each way of taking a step, in any block order: bit for bit,
    steps included (under stochastic rounding a launch of their own increments them)."""
    lists, views, extra = rounded(
        rounding, SIZES, [instance], seed=8, misaligned=("compensations",), misaligned_every=2
    )
    options = {**OPTIONS, **OPTION_CASES[option_case], **extra}
    assert mismatches(kernel, lists, views, options, order=order) == []


def test_stochastic_round_keys_take_the_step_count_before_any_is_incremented(kernel):
    """Two params of many blocks share a step tensor, and counts no integer holds, in shuffled block
    order: every block's key takes its count as the step began (the CPU op's), then each adds one."""
    lists, views, extra = rounded(
        "stochastic_round", [70_000, 70_000, 9, 9, 9], [INSTANCES[8]], seed=9, shared_step=True
    )
    for index, count in zip((2, 3, 4), (-1.0, float("nan"), 2.5), strict=True):
        lists["state_steps"][index].fill_(count)
    assert mismatches(kernel, lists, views, {**OPTIONS, **extra}, order="shuffled") == []
    assert lists["state_steps"][0].item() == 5.0


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("layout", LAYOUT_CASES.keys())
def test_a_thousand_small_rounded_tensors(request, layout, rounding):
    """1,000 bfloat16 tensors with either option: their metadata is 8 bytes a tensor larger, so a
    launch holds 535 tensors with 32 KB of arguments, 65 with 4 KB; stochastic rounding adds one
    launch of a block per 448 step counters."""
    build, device, argument_limit = LAYOUT_CASES[layout]
    count = 1000
    lists, views, extra = rounded(rounding, [64] * count, [INSTANCES[7]], seed=10)
    launches = []
    found = mismatches(
        request.getfixturevalue(build), lists, views, {**OPTIONS, **extra}, device=device, launches=launches
    )
    assert found == []
    # The step counters' launches come last, of one block each.
    increments = 0 if rounding == "kahan_sum" else math.ceil(count / 448)
    updates = launches[: len(launches) - increments]
    assert len(updates) == math.ceil(count / ROUNDED_TENSORS_PER_LAUNCH[argument_limit])
    assert layout_problems(updates, argument_limit) == []
    assert [launch.blocks for launch in launches[len(updates) :]] == [1] * increments


# Bugs a kernel change could bring, each planted in a copy of the sources: (file, text, replacement).
PLANTED_BUGS = {
    "chunk_count_one_short": (
        "csrc/cuda/adadelta_cuda_launch.cu",
        "(tensor.numel + kChunkElements - 1) / kChunkElements",
        "(tensor.numel + kChunkElements - 2) / kChunkElements",
    ),
    "tensor_of_block_off_by_one": (
        "csrc/cuda/adadelta_cuda_kernel.cuh",
        "metadata.block_ends[middle] > block",
        "metadata.block_ends[middle] >= block",
    ),
    "vector_path_one_vector_too_far": (
        "csrc/cuda/adadelta_cuda_kernel.cuh",
        "elementwise_begin = chunk_size / kVectorElements * kVectorElements;",
        "elementwise_begin = (chunk_size + kVectorElements - 1) / kVectorElements * kVectorElements;",
    ),
    "fma_rounded_twice": (
        "csrc/cuda/adadelta_cuda_kernel.cuh",
        "return __fmaf_rn(a, b, c);",
        "return __fadd_rn(__fmul_rn(a, b), c);",
    ),
    "32KB_layout_on_a_pre_volta_gpu": (
        "csrc/cuda/adadelta_cuda_launch.cu",
        "compute_capability_major >= 7",
        "compute_capability_major >= 6",
    ),
    "32KB_layout_on_a_cuda_12_0_driver": (
        "csrc/cuda/adadelta_cuda_launch.cu",
        "driver_version >= 12010",
        "driver_version >= 12000",
    ),
    "32KB_layout_in_a_cuda_12_0_build": (
        "csrc/cuda/adadelta_cuda_launch.cu",
        "CUDART_VERSION >= 12010",
        "CUDART_VERSION >= 12000",
    ),
    "4KB_layout_everywhere": (
        "csrc/cuda/adadelta_cuda_launch.cu",
        "  if (large) {",
        "  if (false) {",
    ),
    "kahan_compensation_not_stored": (
        "csrc/cuda/adadelta_cuda_kernel.cuh",
        "    elements.store(chunk.compensation, compensation);",
        "",
    ),
    "stochastic_round_key_of_the_step_before": (
        "csrc/cuda/adadelta_cuda_kernel.cuh",
        "stochastic_round_step(count)",
        "stochastic_round_step(count - 1)",
    ),
    "steps_incremented_by_the_update_under_stochastic_rounding": (
        "csrc/cuda/adadelta_cuda_kernel.cuh",
        "kRounding != ParamRounding::kStochastic && chunk_index == 0",
        "chunk_index == 0",
    ),
}


# The toolkit version a mutant is built as, where not the default (CUDA 13.0).
MUTANT_CUDART_VERSIONS = {"32KB_layout_in_a_cuda_12_0_build": 12000}


def planted_bug_findings(bug: str) -> list[str]:
    """What the comparisons above (sizes, a misaligned case, 200 tensors on each device, each pure
    16-bit option) and the layout checks find in the kernel with the planted bug `bug`."""
    path, text, replacement = PLANTED_BUGS[bug]
    cudart_version = MUTANT_CUDART_VERSIONS.get(bug)
    mutant = EmulatedKernel({path: [(text, replacement)]}, cudart_version=cudart_version)
    many = ([(index * 7919) % 5000 for index in range(200)], [INSTANCES[0], INSTANCES[10]], ())
    cases = [
        ((SIZES, [INSTANCES[0]], ()), HOPPER),
        ((SIZES, [INSTANCES[7]], ROLES), HOPPER),
        (many, HOPPER),
        (many, PASCAL),
        (many, OLD_DRIVER),
    ]
    found = []
    for (sizes, instances, misaligned), device in cases:
        large = device == HOPPER and cudart_version is None
        launches = []
        lists, views = guarded_lists(sizes, instances, misaligned=misaligned)
        found += mismatches(mutant, lists, views, OPTIONS, device=device, launches=launches)
        found += layout_problems(launches, LARGE_ARGUMENTS if large else SMALL_ARGUMENTS)
    for rounding in ROUNDINGS:
        lists, views, extra = rounded(rounding, SIZES, [INSTANCES[7]], seed=11)
        found += mismatches(mutant, lists, views, {**OPTIONS, **extra}, order="shuffled")
    return found


@pytest.mark.parametrize("bug", PLANTED_BUGS.keys())
def test_a_planted_bug_is_caught(bug):
    assert planted_bug_findings(bug), f"the planted bug {bug!r} went unnoticed"


def test_processes_building_one_kernel_at_once_all_load_it(tmp_path):
    # pytest-xdist's workers on a fresh checkout build the same library at once. Built in one
    # directory, one process's library was renamed away or loaded half-written under another: the
    # errors of the 2026-11-26 H200 pass (tests/gpu-results/), three of four processes here.
    build = (
        "import pathlib, sys; sys.path.insert(0, sys.argv[1]); "
        "from cuda_emulation import EmulatedKernel; EmulatedKernel(build_root=pathlib.Path(sys.argv[2]))"
    )
    command = [sys.executable, "-c", build, str(Path(__file__).parents[1]), str(tmp_path)]
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [process.communicate()[1] for process in processes]
    failed = [error for process, error in zip(processes, errors, strict=True) if process.returncode != 0]
    assert not failed, f"{len(failed)} of 4 builds failed; the first:\n{failed[0][-3000:]}"
