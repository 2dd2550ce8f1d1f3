"""adadelta_ext.fused_adadelta_ called directly with what torch.optim.Adadelta steps with, and the op
once refused: it steps as torch does.

- grads behind a lazy bit: the negative bit (`x.conj().imag`), the conjugate bit (`x.conj()`; torch
  refuses it for complex params, with view_as_real's error, the op reads its values), or a
  ZeroTensor (`torch._efficientzerotensor`), read as their values, from the check op too;
- options outside the ranges torch.optim.Adadelta's __init__ checks, which torch steps with when
  a param_groups edit or an LRScheduler sets them (a negative lr).

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
