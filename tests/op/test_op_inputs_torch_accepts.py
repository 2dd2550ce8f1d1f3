"""adadelta_ext.fused_adadelta_ called directly with what torch.optim.Adadelta steps with, and the op
once refused: it steps as torch does.

- grads behind a lazy bit: the negative bit (`x.conj().imag`), the conjugate bit (`x.conj()`; torch
  refuses it for complex params, with view_as_real's error, the op reads its values), or a
  ZeroTensor (`torch._efficientzerotensor`), read as their values, from the check op too;
- options outside the ranges torch.optim.Adadelta's __init__ checks, which torch steps with when
  a param_groups edit or an LRScheduler sets them (a negative lr);
- a grad that shares memory with a tensor the op writes (`p.grad = p.detach()`, a grad that is a
  view of another param), without grad_scale: read as it was before the step, as torch's foreach
  path reads every grad before it writes any param;
- an entry repeated whole (a param listed twice in a group, with its grad and state): stepped twice,
  in list order, as torch's for-loop steps it.

(tests/optimizer/test_inputs_torch_accepts.py makes the same comparisons through FusedAdadelta.)
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import (
    DEVICES,
    OP_OPTIONS,
    TORCH_TOLERANCES,
    assert_unchanged,
    lazily_conjugated,
    lazily_negated,
    op_lists,
    snapshot,
)
from torch.optim.adadelta import adadelta as torch_adadelta

import adadelta_ext
from adadelta_ext._ops import check_fused_adadelta


def zero_tensor_like(tensor: torch.Tensor) -> torch.Tensor:
    """A ZeroTensor: zeros without memory, as some backward formulas return."""
    return torch._efficientzerotensor(tensor.shape, dtype=tensor.dtype, device=tensor.device)


# --------------------------------------------------------------------------------------------
# Grads behind a lazy bit (NOTE [Grads behind a lazy bit] in csrc/fused_adadelta.cpp).
# --------------------------------------------------------------------------------------------

# (how a grad of these values is made lazy, what the values are read as, the dtypes it applies to)
LAZY_GRADS = {
    "negative_bit": (lazily_negated, lambda g: g, [torch.float32, torch.bfloat16, torch.complex64]),
    "conjugate_bit": (lazily_conjugated, lambda g: g, [torch.complex64]),
    "both_bits": (lambda g: lazily_negated(g.conj_physical()).conj(), lambda g: g, [torch.complex64]),
    "zero_tensor": (zero_tensor_like, torch.zeros_like, [torch.float32, torch.complex64]),
}
LAZY_GRAD_CASES = [
    pytest.param(kind, dtype, id=f"{kind}-{str(dtype).removeprefix('torch.')}")
    for kind, (_, _, dtypes) in LAZY_GRADS.items()
    for dtype in dtypes
]


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize(("kind", "dtype"), LAZY_GRAD_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_grad_behind_a_lazy_bit_is_read_as_its_values(device, kind, dtype, tensor_lr):
    """Both overloads, and the check op, take the second of two grads behind the bit (torch's
    fallbacks refused it in the op's mutable grads list, and resolved it for the check op), and
    step bit for bit as with a grad holding the same values, leaving the grad as it was."""
    make_lazy, read_as, _ = LAZY_GRADS[kind]
    plain = op_lists([(3, 2), (5,)], dtype, device=device)
    if dtype.is_complex:
        plain["grads"] = [g * (0.6 - 0.8j) for g in plain["grads"]]  # an imaginary part to conjugate
    lazy = snapshot(plain)
    lazy["grads"][1] = make_lazy(plain["grads"][1])
    plain["grads"][1] = read_as(plain["grads"][1])
    grads_before = snapshot(lazy["grads"])
    options = dict(OP_OPTIONS, lr=torch.tensor(0.5, device=device) if tensor_lr else 0.5)

    check_fused_adadelta(*lazy.values(), **options)
    adadelta_ext.fused_adadelta_(*lazy.values(), **options)
    adadelta_ext.fused_adadelta_(*plain.values(), **options)

    assert_unchanged(lazy.pop("grads"), grads_before)
    del plain["grads"]
    torch.testing.assert_close(lazy, plain, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Options outside torch.optim.Adadelta's __init__ ranges.
# --------------------------------------------------------------------------------------------

OUTSIDE_INIT_RANGES = {
    "negative_lr": {"lr": -0.5},
    "negative_weight_decay": {"weight_decay": -0.3},
    "rho_above_one": {"rho": 1.5},
    "negative_rho": {"rho": -0.5},
    "negative_eps": {"eps": -0.5},
}


@pytest.mark.parametrize("options", list(OUTSIDE_INIT_RANGES.values()), ids=list(OUTSIDE_INIT_RANGES))
@pytest.mark.parametrize("device", DEVICES)
def test_options_outside_torchs_init_ranges_step_as_torch_steps(device, options):
    """Each value as torch's functional adadelta (the one torch.optim.Adadelta.step calls) takes it,
    NaN where torch's is NaN (rho outside [0, 1] or a negative eps can make square_avg + eps or
    acc_delta + eps negative: 5% to 80% of these params' elements). In float64: there square_avg +
    eps, which such values can cancel to near zero, keeps enough digits for assert_close's tolerance,
    on the CPU too."""
    options = {**OP_OPTIONS, **options}
    ours = op_lists([(64,), (3, 5)], torch.float64, device=device, step=3.0)
    theirs = snapshot(ours)
    adadelta_ext.fused_adadelta_(*ours.values(), **options)
    torch_adadelta(*theirs.values(), foreach=device == "cuda", **options)
    torch.testing.assert_close(ours, theirs, equal_nan=True, **TORCH_TOLERANCES[device])


# --------------------------------------------------------------------------------------------
# Grads sharing memory with a written tensor (NOTE [Grads read through a copy]).
# --------------------------------------------------------------------------------------------


def grad_is_its_own_param(lists):
    lists["grads"][0] = lists["params"][0]


def grad_is_a_row_of_another_param(lists):
    # Contiguous: on the CPU the kernel runs from flat records, which must point at the copy.
    lists["grads"][1] = lists["params"][0][1]


def grad_is_a_column_of_another_param(lists):
    # Strided: the kernel reads it through a contiguous copy of the copy (FlatTensorLists).
    lists["grads"][1] = lists["params"][0][:, 1]


def grad_is_its_own_square_avg(lists):
    lists["grads"][0] = lists["square_avgs"][0]


def grad_is_a_step(lists):
    # The step is incremented before the kernel runs; a 0-d param's grad of one element.
    lists["grads"][2] = lists["state_steps"][0]


SHARED_GRADS = {
    "its_own_param": grad_is_its_own_param,
    "a_row_of_another_param": grad_is_a_row_of_another_param,
    "a_column_of_another_param": grad_is_a_column_of_another_param,
    "its_own_square_avg": grad_is_its_own_square_avg,
    "a_step": grad_is_a_step,
}


def lists_with_a_shared_grad(device, dtype, share):
    """(lists, the same values in tensors of their own): params of shapes (4, 4), (4,) and ()."""
    step_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shared = op_lists([(4, 4), (4,), ()], dtype, device=device, step_dtype=step_dtype, step=2.0)
    share(shared)
    return shared, snapshot(shared)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("share", list(SHARED_GRADS), ids=list(SHARED_GRADS))
@pytest.mark.parametrize("device", DEVICES)
def test_a_grad_sharing_memory_with_a_written_tensor_is_read_as_it_was_before_the_step(device, share, dtype):
    """Bit for bit what the same values give in tensors of their own. (It was refused: "params[0]
    and grads[1] share memory".) A bfloat16 param's grad can be float32, as its step is."""
    shared, separate = lists_with_a_shared_grad(device, dtype, SHARED_GRADS[share])
    adadelta_ext.fused_adadelta_(*shared.values(), **OP_OPTIONS)
    adadelta_ext.fused_adadelta_(*separate.values(), **OP_OPTIONS)
    del shared["grads"], separate["grads"]
    torch.testing.assert_close(shared, separate, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_a_remembered_call_reads_the_same_grads_through_copies(device):
    """NOTE [Shared-memory checks, remembered]: the second, identical call repeats the first's
    outcome without checking, and the grads it reads through copies are part of that outcome."""
    shared, separate = lists_with_a_shared_grad(device, torch.float32, grad_is_a_row_of_another_param)
    for _ in range(2):
        separate["grads"][1].copy_(shared["grads"][1])
        adadelta_ext.fused_adadelta_(*shared.values(), **OP_OPTIONS)
        adadelta_ext.fused_adadelta_(*separate.values(), **OP_OPTIONS)
    del shared["grads"], separate["grads"]
    torch.testing.assert_close(shared, separate, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Entries repeated whole (NOTE [Repeated entries]).
# --------------------------------------------------------------------------------------------

# How the repeat holds entry 0's tensors: the same tensors, or other tensors equal to them (other
# TensorImpls with the same data, sizes, strides and dtype).
REPEATS = {"the_same_tensors": lambda t: t, "equal_views": lambda t: t.view(t.shape)}
ROUNDINGS = ["nearest", "kahan_sum", "stochastic_round"]


def rounding_options(rounding: str, params: list[torch.Tensor]) -> dict:
    """The op's options with compensations or seeds (bfloat16 params) for `rounding`."""
    if rounding == "kahan_sum":
        return dict(OP_OPTIONS, compensations=[torch.full_like(p, 2e-3) for p in params])
    if rounding == "stochastic_round":
        return dict(OP_OPTIONS, stochastic_round_seeds=[7 + i for i in range(len(params))])
    return dict(OP_OPTIONS)


def entry(lists: dict, options: dict, i: int) -> tuple[dict, dict]:
    """Entry i alone, as a call of its own takes it."""
    per_param = ("compensations", "stochastic_round_seeds")
    return {name: [tensors[i]] for name, tensors in lists.items()}, {
        name: [value[i]] if name in per_param else value for name, value in options.items()
    }


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("repeat", list(REPEATS), ids=list(REPEATS))
@pytest.mark.parametrize("device", DEVICES)
def test_an_entry_repeated_whole_is_stepped_twice_in_list_order(device, repeat, rounding):
    """Entries [0, 1, 0] step as three calls, on entry 0, 1, then 0 again, bit for bit: the step
    counter goes up by two, the second update starts from the first's results. (It was refused:
    "acc_deltas[0] and acc_deltas[2] share memory", say.)"""
    dtype = torch.float32 if rounding == "nearest" else torch.bfloat16
    lists = op_lists([(3, 2), (4,)], dtype, device=device, step=3.0)
    separate = snapshot(lists)
    options, separate_options = (rounding_options(rounding, t["params"]) for t in (lists, separate))
    for name, tensors in [*lists.items(), *options.items()]:
        if isinstance(tensors, list):
            tensors.append(REPEATS[repeat](tensors[0]) if name != "stochastic_round_seeds" else tensors[0])

    adadelta_ext.fused_adadelta_(*lists.values(), **options)
    for i in (0, 1, 0):
        one, one_options = entry(separate, separate_options, i)
        adadelta_ext.fused_adadelta_(*one.values(), **one_options)

    assert lists["state_steps"][0].item() == 5.0
    expected = {name: [*tensors, tensors[0]] for name, tensors in separate.items()}
    torch.testing.assert_close(lists, expected, rtol=0, atol=0)
    if rounding == "kahan_sum":
        torch.testing.assert_close(
            options["compensations"][0], separate_options["compensations"][0], rtol=0, atol=0
        )
