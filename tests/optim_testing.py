"""What the test files share: the devices under test, the op's five lists, a model and its training
steps, twin optimizers, checkpoints through torch.save, and the "nothing changed" assertion.

Importable from every folder under tests/ (tests/conftest.py puts tests/ on sys.path).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence

import pytest
import torch
from torch import nn

# Every test parametrized over DEVICES runs on CUDA too when a GPU is present, and shows as
# skipped (with the reason, see conftest.py) where there is none. `pytest -m cuda` selects it.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# fp32_state (float32 square_avg/acc_delta) exists for float16/bfloat16 params only.
DTYPES_AND_STATE = [
    pytest.param(
        dtype,
        fp32_state,
        id=f"{str(dtype).removeprefix('torch.')}-{'fp32_state' if fp32_state else 'param_dtype_state'}",
    )
    for dtype in FLOAT_DTYPES
    for fp32_state in ((False, True) if dtype in (torch.float16, torch.bfloat16) else (False,))
]


# float32/float64 results against torch.optim.Adadelta's, per device: bit for bit on CUDA, where the
# kernel makes torch's roundings in torch's order (csrc/adadelta_math.h); assert_close's defaults on
# the CPU, where torch's float32 sqrt is MKL's, not correctly rounded (about 16% of its results are
# 1 ulp off), so that bit-identity is impossible there.
TORCH_TOLERANCES = {"cpu": {}, "cuda": {"rtol": 0, "atol": 0}}

# The op's scalar options (adadelta_ext.fused_adadelta_), for tests that call it directly.
OP_OPTIONS = {"lr": 0.5, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.01, "maximize": False}


def per_tensor(value, count: int) -> list:
    """`value` for each of `count` tensors: a list is taken as one entry per tensor."""
    return list(value) if isinstance(value, list) else [value] * count


def op_lists(
    shapes: Sequence[tuple[int, ...]] = ((16,),),
    dtype: torch.dtype | list[torch.dtype] = torch.float32,
    *,
    grad_dtype: torch.dtype | list[torch.dtype] | None = None,
    state_dtype: torch.dtype | list[torch.dtype] | None = None,
    step_dtype: torch.dtype | list[torch.dtype] = torch.float32,
    step: float = 0.0,
    device: str | torch.device = "cpu",
    misaligned: bool = False,
    seed: int = 0,
) -> dict[str, list[torch.Tensor]]:
    """The five lists adadelta_ext.fused_adadelta_ takes, as torch names them, one entry per shape:
    `fused_adadelta_(*op_lists(...).values(), **OP_OPTIONS)`.

    dtype, grad_dtype (default: the param's), state_dtype (square_avg and acc_delta; default: the
    param's) and step_dtype are one dtype for every entry or a list of one per entry. Values are
    drawn in float64 on the CPU, then rounded and moved, so that the same seed gives the same values
    on every device: params and grads uniform in [-1, 1), square_avgs and acc_deltas in [0.1, 1)
    (acc_delta near square_avg makes every update of order lr: a missed or repeated update cannot
    hide inside a tolerance). `misaligned` starts every tensor one element into its storage.
    """
    count = len(shapes)
    dtypes = per_tensor(dtype, count)
    grad_dtypes = [g or d for g, d in zip(per_tensor(grad_dtype, count), dtypes, strict=True)]
    state_dtypes = [s or d for s, d in zip(per_tensor(state_dtype, count), dtypes, strict=True)]
    generator = torch.Generator().manual_seed(seed)
    offset = 1 if misaligned else 0

    def draw(shape, dtype, low, high):
        numel = torch.Size(shape).numel()
        values = torch.empty(numel + offset, dtype=torch.float64).uniform_(low, high, generator=generator)
        return values.to(device, dtype)[offset:].view(shape)

    return {
        "params": [draw(s, d, -1, 1) for s, d in zip(shapes, dtypes, strict=True)],
        "grads": [draw(s, d, -1, 1) for s, d in zip(shapes, grad_dtypes, strict=True)],
        "square_avgs": [draw(s, d, 0.1, 1) for s, d in zip(shapes, state_dtypes, strict=True)],
        "acc_deltas": [draw(s, d, 0.1, 1) for s, d in zip(shapes, state_dtypes, strict=True)],
        "state_steps": [torch.tensor(step, dtype=d, device=device) for d in per_tensor(step_dtype, count)],
    }


def lazily_negated(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of `tensor`'s values whose memory holds them negated, read through the negative bit
    (as `x.conj().imag` is)."""
    return torch._neg_view(tensor.neg())


def lazily_conjugated(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor of `tensor`'s values whose memory holds their conjugates, read through the
    conjugate bit (as `x.conj()` is)."""
    return tensor.conj_physical().conj()


def small_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model with 2-D weights, 1-D biases and a 4-D conv kernel."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    ).to(device=device, dtype=dtype)


def model_input(model: nn.Module, batch: int = 4) -> torch.Tensor:
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 2, 6, 6, generator=generator).to(device=param.device, dtype=param.dtype)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """`steps` full training steps on fixed data: forward, backward, optimizer.step()."""
    inputs = model_input(model)
    for _ in range(steps):
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


def twin_models(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model, copy.deepcopy(model)


def save_and_load(state_dict: dict) -> dict:
    """A state dict through torch.save/torch.load, so that no tensor is shared with the original."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The per-param state of `optimizer.state_dict()`, keyed by the param's index."""
    return optimizer.state_dict()["state"]


# --------------------------------------------------------------------------------------------
# Snapshots: a refused step (or a skipped one) must leave every byte as it was.
# --------------------------------------------------------------------------------------------


def snapshot(tree):
    """A copy of a nest of dicts, lists and tuples of tensors, every tensor cloned."""
    if isinstance(tree, dict):
        return {key: snapshot(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [snapshot(value) for value in tree]
    return tree.clone()


def optimizer_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """Copies of every param, every grad and every state tensor, keyed by the param's position."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return snapshot(
        {
            "params": {index: p.detach() for index, p in enumerate(params)},
            "grads": {index: p.grad for index, p in enumerate(params) if p.grad is not None},
            "state": {index: optimizer.state[p] for index, p in enumerate(params) if p in optimizer.state},
        }
    )


def assert_unchanged(tree, before, path: str = "") -> None:
    """Bit for bit: the same keys, lengths, dtypes, shapes and bytes as the snapshot `before`
    (stricter than equality: -0.0 is not 0.0, and a NaN keeps its payload). A tensor with the
    negative or conjugate bit is compared by its values, as its snapshot (a clone) holds them."""
    if isinstance(before, dict):
        assert tree.keys() == before.keys(), f"{path}: entries were created or removed"
        for key in before:
            assert_unchanged(tree[key], before[key], f"{path}[{key!r}]")
    elif isinstance(before, list):
        assert len(tree) == len(before), f"{path}: entries were created or removed"
        for index, (value, saved) in enumerate(zip(tree, before, strict=True)):
            assert_unchanged(value, saved, f"{path}[{index}]")
    elif before.is_sparse:
        assert_unchanged([tree._indices(), tree._values()], [before._indices(), before._values()], path)
    else:
        assert (tree.dtype, tree.shape) == (before.dtype, before.shape), path
        assert torch.equal(
            tree.detach().resolve_conj().resolve_neg().contiguous().view(-1).view(torch.uint8),
            before.contiguous().view(-1).view(torch.uint8),
        ), f"{path} changed"
