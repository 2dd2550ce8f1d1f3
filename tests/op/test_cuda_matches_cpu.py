"""On a GPU: the CUDA op against the CPU op, where the kernel's indexing could go
wrong (16-byte vectors, ragged tails, 4096-element chunks, misaligned data,
launches split at 616 tensors (75 where only 4 KB of kernel arguments are allowed), zero-element
tensors), and its scalars read on
the device (tensor lr, grad_scale, found_inf), also inside a CUDA graph; kahan_sum and
stochastic_round on 16-bit params.

Bit for bit (rtol=0, atol=0), for every dtype pair, float16 and bfloat16 too:
both kernels compute in the same opmath type with the same correctly rounded
operations in the same order (csrc/adadelta_math.h), and round to the stored
dtype once, to nearest even. The inputs are finite (op_lists), so no NaN is
compared.
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import OP_OPTIONS, assert_unchanged, op_lists, snapshot

from adadelta_ext import fused_adadelta_

# Every test here runs the CUDA kernel.
pytestmark = pytest.mark.cuda

DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
PAIR_IDS = [f"{str(p).removeprefix('torch.')}-{str(s).removeprefix('torch.')}" for p, s in DTYPE_PAIRS]
# Around the 2 to 8 element vectors and the 4096-element chunks.
SIZES = [0, 1, 7, 9, 4095, 4096, 4097, 8191, 65537, 3 * 65536 + 5]


def cuda_and_cpu_lists(pairs, sizes, *, misaligned=False, seed=0):
    """op_lists on CUDA and the same values on the CPU, one entry per (param, state) dtype pair and
    size, at step 3 (float32 and float64 steps alternating); `misaligned`: every data pointer odd."""
    entries = {
        "shapes": [(size,) for size in sizes],
        "dtype": [param_dtype for param_dtype, _ in pairs],
        "state_dtype": [state_dtype for _, state_dtype in pairs],
        "step_dtype": [torch.float64 if index % 2 else torch.float32 for index in range(len(sizes))],
        "step": 3.0,
        "misaligned": misaligned,
        "seed": seed,
    }
    return op_lists(device="cuda", **entries), op_lists(device="cpu", **entries)


def assert_lists_match(cuda_lists, cpu_lists):
    """Every tensor of the five lists: the same dtype, shape and bits on CUDA as on the CPU."""
    for name, cuda_values in cuda_lists.items():
        for index, (cuda_tensor, cpu_tensor) in enumerate(zip(cuda_values, cpu_lists[name], strict=True)):
            torch.testing.assert_close(
                cuda_tensor.cpu(),
                cpu_tensor,
                rtol=0,
                atol=0,
                msg=lambda m, n=name, i=index: f"{n}[{i}]: {m}",
            )


def run_both(cuda_lists, cpu_lists, **options):
    for device, lists in (("cuda", cuda_lists), ("cpu", cpu_lists)):
        scalars = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in {**OP_OPTIONS, **options}.items()
        }
        fused_adadelta_(*lists.values(), **scalars)
    torch.cuda.synchronize()


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=PAIR_IDS)
def test_cuda_kernel_matches_cpu_op(pair, misaligned):
    cuda_lists, cpu_lists = cuda_and_cpu_lists([pair] * len(SIZES), SIZES, misaligned=misaligned)
    grads_before = snapshot(cuda_lists["grads"])
    run_both(cuda_lists, cpu_lists)
    assert_lists_match(cuda_lists, cpu_lists)
    assert_unchanged(cuda_lists["grads"], grads_before)  # grads are written only when unscaled
    for step in cuda_lists["state_steps"]:
        assert step.item() == 4.0


@pytest.mark.parametrize("round_lr_product", [False, True], ids=["fused_lr_step", "rounded_lr_product"])
@pytest.mark.parametrize("scalar_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=PAIR_IDS)
def test_cuda_kernel_unscales_grads_with_tensor_lr(pair, scalar_dtype, round_lr_product):
    # The kernel reads float32 and float64 scalars; others are converted first. round_lr_product:
    # param + update * (-lr) in two roundings, as torch.optim.Adadelta(capturable=True) applies a
    # tensor lr, rather than one fused multiply-add; lr is not a power of two, so that the product's
    # rounding shows (in about 0.3% of float32/float64 params).
    cuda_lists, cpu_lists = cuda_and_cpu_lists([pair] * len(SIZES), SIZES, seed=1)
    run_both(
        cuda_lists,
        cpu_lists,
        lr=torch.tensor(0.3, dtype=scalar_dtype),
        grad_scale=torch.tensor(512.0, dtype=scalar_dtype),
        found_inf=torch.tensor(0.0, dtype=scalar_dtype),
        maximize=True,
        round_lr_product=round_lr_product,
    )
    assert_lists_match(cuda_lists, cpu_lists)


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("rounding", ["kahan_sum", "stochastic_round"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS[2:], ids=PAIR_IDS[2:])
def test_cuda_kernel_rounds_16_bit_params_as_the_cpu_op(pair, rounding, misaligned):
    """kahan_sum's compensations and stochastic_round's bits (from seed, step and index alone) are
    the CPU op's, over two steps, and so are the step counts."""
    cuda_lists, cpu_lists = cuda_and_cpu_lists([pair] * len(SIZES), SIZES, misaligned=misaligned, seed=5)
    generator = torch.Generator().manual_seed(5)
    if rounding == "kahan_sum":
        compensations = [
            (torch.rand(p.shape, generator=generator) * 1e-3).to(p.dtype) for p in cpu_lists["params"]
        ]
        per_device = {
            "cuda": {"compensations": [c.cuda() for c in compensations]},
            "cpu": {"compensations": compensations},
        }
    else:
        seeds = torch.randint(-(2**63), 2**63 - 1, (len(SIZES),), generator=generator).tolist()
        per_device = {device: {"stochastic_round_seeds": seeds} for device in ("cuda", "cpu")}
    for _ in range(2):
        for device, lists in (("cuda", cuda_lists), ("cpu", cpu_lists)):
            fused_adadelta_(*lists.values(), **OP_OPTIONS, **per_device[device])
    torch.cuda.synchronize()
    assert_lists_match(cuda_lists, cpu_lists)
    if rounding == "kahan_sum":
        assert_lists_match(per_device["cuda"], per_device["cpu"])
    assert all(step.item() == 5.0 for step in cuda_lists["state_steps"])


def test_cuda_kernel_splits_launches_over_mixed_dtypes():
    # 4,200 tensors, 700 of each dtype pair, interleaved: over the 616 one launch holds.
    pairs = [DTYPE_PAIRS[index % len(DTYPE_PAIRS)] for index in range(4200)]
    sizes = [(index * 7919) % 20000 for index in range(4200)]
    cuda_lists, cpu_lists = cuda_and_cpu_lists(pairs, sizes, seed=2)
    run_both(cuda_lists, cpu_lists, grad_scale=torch.tensor(64.0))
    assert_lists_match(cuda_lists, cpu_lists)
    assert all(step.item() == 4.0 for step in cuda_lists["state_steps"])


@pytest.mark.parametrize("found_inf_value", [1.0, float("nan")], ids=["one", "nan"])
def test_cuda_kernel_found_inf_changes_nothing(found_inf_value):
    cuda_lists, _ = cuda_and_cpu_lists(DTYPE_PAIRS, [65537] * len(DTYPE_PAIRS), seed=3)
    before = snapshot(cuda_lists)
    fused_adadelta_(
        *cuda_lists.values(),
        **{**OP_OPTIONS, "grad_scale": torch.tensor(8.0, device="cuda")},
        found_inf=torch.tensor(found_inf_value, device="cuda"),
    )
    torch.cuda.synchronize()
    assert_unchanged(cuda_lists, before)


def test_cuda_kernel_is_captured_by_a_cuda_graph():
    cuda_lists, _ = cuda_and_cpu_lists(DTYPE_PAIRS, [4099] * len(DTYPE_PAIRS), seed=4)
    eager_lists = snapshot(cuda_lists)
    lr = torch.tensor(0.3, device="cuda")
    grad_scale = torch.tensor(4.0, device="cuda")
    found_inf = torch.tensor(0.0, device="cuda")
    scalars = {**OP_OPTIONS, "lr": lr, "grad_scale": grad_scale, "found_inf": found_inf}

    # Loads the six kernels before capture, which must not load modules.
    fused_adadelta_(*cuda_and_cpu_lists(DTYPE_PAIRS, [1] * len(DTYPE_PAIRS))[0].values(), **OP_OPTIONS)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_adadelta_(*cuda_lists.values(), **scalars)
    # Capture runs nothing: two replays are two steps, reading lr on the device.
    graph.replay()
    lr.fill_(0.1)
    graph.replay()
    for step_lr in (0.3, 0.1):
        fused_adadelta_(*eager_lists.values(), **{**scalars, "lr": torch.tensor(step_lr, device="cuda")})
    torch.cuda.synchronize()
    torch.testing.assert_close(cuda_lists, eager_lists, rtol=0, atol=0)
