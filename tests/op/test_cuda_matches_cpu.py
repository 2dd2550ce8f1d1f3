"""On a GPU: the CUDA op against the CPU op, where the kernel's indexing could go
wrong (16-byte vectors, ragged tails, 65536-element chunks, misaligned data,
launches split at 64 tensors, zero-element tensors), and its scalars read on
the device (tensor lr, grad_scale, found_inf), also inside a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import requires_cuda

from adadelta_ext import fused_adadelta_

DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
PAIR_IDS = [f"{str(p).removeprefix('torch.')}-{str(s).removeprefix('torch.')}" for p, s in DTYPE_PAIRS]
# Around the 2 to 8 element vectors and the 65536-element chunks.
SIZES = [0, 1, 7, 9, 4099, 65535, 65536, 65537, 3 * 65536 + 5]
OPTIONS = {"lr": 0.5, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.01, "maximize": False}


def make_lists(pairs, sizes, offset, seed=0):
    """CUDA lists and their CPU twins; offset 1 misaligns every CUDA data pointer."""
    generator = torch.Generator().manual_seed(seed)

    def random_tensor(size, dtype, low, high):
        values = torch.empty(size + offset, dtype=torch.float64).uniform_(low, high, generator=generator)
        return values.to("cuda", dtype)[offset:]

    lists = ([], [], [], [], [])
    for index, ((param_dtype, state_dtype), size) in enumerate(zip(pairs, sizes, strict=True)):
        # acc_delta near square_avg makes every update of order lr: a missed or
        # repeated update cannot hide inside the tolerance.
        step_dtype = torch.float64 if index % 2 else torch.float32
        for values, made in zip(
            lists,
            (
                random_tensor(size, param_dtype, -1, 1),
                random_tensor(size, param_dtype, -1, 1),
                random_tensor(size, state_dtype, 0.1, 1),
                random_tensor(size, state_dtype, 0.1, 1),
                torch.full((), 3.0, dtype=step_dtype, device="cuda"),
            ),
            strict=True,
        ):
            values.append(made)
    twins = tuple([t.cpu() for t in values] for values in lists)
    return lists, twins


def assert_lists_match(cuda_lists, cpu_lists):
    for cuda_values, cpu_values in zip(cuda_lists, cpu_lists, strict=True):
        for index, (cuda_tensor, cpu_tensor) in enumerate(zip(cuda_values, cpu_values, strict=True)):
            torch.testing.assert_close(
                cuda_tensor.cpu(), cpu_tensor, msg=lambda m, i=index: f"tensor {i}: {m}"
            )


def run_both(cuda_lists, cpu_lists, **options):
    for device, lists in (("cuda", cuda_lists), ("cpu", cpu_lists)):
        scalars = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in {**OPTIONS, **options}.items()
        }
        fused_adadelta_(*lists, **scalars)
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=PAIR_IDS)
def test_cuda_kernel_matches_cpu_op(pair, offset):
    cuda_lists, cpu_lists = make_lists([pair] * len(SIZES), SIZES, offset)
    grads_before = [grad.clone() for grad in cuda_lists[1]]
    run_both(cuda_lists, cpu_lists)
    assert_lists_match(cuda_lists, cpu_lists)
    for grad, before in zip(cuda_lists[1], grads_before, strict=True):
        assert torch.equal(grad, before), "grads are written only when unscaled"
    for step in cuda_lists[4]:
        assert step.item() == 4.0


@requires_cuda
@pytest.mark.parametrize("scalar_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=PAIR_IDS)
def test_cuda_kernel_unscales_grads_with_tensor_lr(pair, scalar_dtype):
    # The kernel reads float32 and float64 scalars; others are converted first.
    cuda_lists, cpu_lists = make_lists([pair] * len(SIZES), SIZES, offset=0, seed=1)
    run_both(
        cuda_lists,
        cpu_lists,
        lr=torch.tensor(0.25, dtype=scalar_dtype),
        grad_scale=torch.tensor(512.0, dtype=scalar_dtype),
        found_inf=torch.tensor(0.0, dtype=scalar_dtype),
        maximize=True,
    )
    assert_lists_match(cuda_lists, cpu_lists)


@requires_cuda
def test_cuda_kernel_splits_launches_over_mixed_dtypes():
    # 420 tensors, 70 of each dtype pair, interleaved: over the 64 one launch holds.
    pairs = [DTYPE_PAIRS[index % len(DTYPE_PAIRS)] for index in range(420)]
    sizes = [(index * 7919) % 20000 for index in range(420)]
    cuda_lists, cpu_lists = make_lists(pairs, sizes, offset=0, seed=2)
    run_both(cuda_lists, cpu_lists, grad_scale=torch.tensor(64.0))
    assert_lists_match(cuda_lists, cpu_lists)
    assert all(step.item() == 4.0 for step in cuda_lists[4])


@requires_cuda
@pytest.mark.parametrize("found_inf_value", [1.0, float("nan")], ids=["one", "nan"])
def test_cuda_kernel_found_inf_changes_nothing(found_inf_value):
    cuda_lists, _ = make_lists(DTYPE_PAIRS, [65537] * len(DTYPE_PAIRS), offset=0, seed=3)
    before = [[tensor.clone() for tensor in values] for values in cuda_lists]
    fused_adadelta_(
        *cuda_lists,
        **{**OPTIONS, "grad_scale": torch.tensor(8.0, device="cuda")},
        found_inf=torch.tensor(found_inf_value, device="cuda"),
    )
    torch.cuda.synchronize()
    for values, originals in zip(cuda_lists, before, strict=True):
        for tensor, original in zip(values, originals, strict=True):
            assert tensor.reshape(-1).view(torch.uint8).equal(original.reshape(-1).view(torch.uint8))


@requires_cuda
def test_cuda_kernel_is_captured_by_a_cuda_graph():
    cuda_lists, _ = make_lists(DTYPE_PAIRS, [4099] * len(DTYPE_PAIRS), offset=0, seed=4)
    eager_lists = tuple([tensor.clone() for tensor in values] for values in cuda_lists)
    lr = torch.tensor(0.3, device="cuda")
    grad_scale = torch.tensor(4.0, device="cuda")
    found_inf = torch.tensor(0.0, device="cuda")
    scalars = {**OPTIONS, "lr": lr, "grad_scale": grad_scale, "found_inf": found_inf}

    # Loads the six kernels before capture, which must not load modules.
    fused_adadelta_(*make_lists(DTYPE_PAIRS, [1] * len(DTYPE_PAIRS), offset=0)[0], **OPTIONS)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_adadelta_(*cuda_lists, **scalars)
    # Capture runs nothing: two replays are two steps, reading lr on the device.
    graph.replay()
    lr.fill_(0.1)
    graph.replay()
    for step_lr in (0.3, 0.1):
        fused_adadelta_(*eager_lists, **{**scalars, "lr": torch.tensor(step_lr, device="cuda")})
    torch.cuda.synchronize()
    for values, eager_values in zip(cuda_lists, eager_lists, strict=True):
        for tensor, eager in zip(values, eager_values, strict=True):
            assert torch.equal(tensor, eager)
