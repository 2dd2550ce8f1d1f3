"""differentiable=True: as torch.optim.Adadelta, the step is differentiable (gradients flow from the
updated param and state back to the param, grad and state before it, e.g. for meta-learning). It
runs torch's own unfused step (README, "differentiable=True"), so the values and gradients are
torch's, bit for bit; the options that only the fused kernel has are refused with it.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from adadelta_ext import FusedAdadelta

OPTIONS = {
    "defaults": {},
    "weight_decay_and_lr": {"lr": 0.9, "weight_decay": 0.1},
    "maximize": {"maximize": True, "rho": 0.5},
}


def stepped(optimizer_class, kwargs, param, grad, square_avg, acc_delta):
    """The param and state after one differentiable step from the given ones (torch's
    TestDifferentiableOptimizer pattern: non-leaf copies, state set before the step)."""
    param = param.clone()
    param.grad = grad
    optimizer = optimizer_class([param], differentiable=True, **kwargs)
    optimizer.state[param].update(
        {
            "step": torch.tensor(10.0, dtype=torch.float64),
            "square_avg": square_avg.clone(),
            "acc_delta": acc_delta.clone(),
        }
    )
    optimizer.step()
    state = optimizer.state[param]
    return param, state["square_avg"], state["acc_delta"]


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(10, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(4))


@pytest.mark.parametrize("kwargs", OPTIONS.values(), ids=OPTIONS.keys())
def test_the_step_passes_gradcheck(kwargs):
    assert gradcheck(lambda *tensors: stepped(FusedAdadelta, kwargs, *tensors), inputs())


@pytest.mark.parametrize("kwargs", OPTIONS.values(), ids=OPTIONS.keys())
def test_values_and_gradients_are_torchs(kwargs):
    results = []
    for optimizer_class in (FusedAdadelta, torch.optim.Adadelta):
        tensors = inputs()
        outputs = stepped(optimizer_class, kwargs, *tensors)
        gradients = torch.autograd.grad(sum(output.sum() for output in outputs), tensors)
        results.append((outputs, gradients))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("option", ["fp32_state", "kahan_sum", "stochastic_round"])
def test_options_of_the_fused_kernel_are_refused_with_it(option):
    with pytest.raises(ValueError, match="differentiable=True .* no fp32_state, kahan_sum or stochastic"):
        FusedAdadelta([torch.nn.Parameter(torch.zeros(3))], differentiable=True, **{option: True})


def test_grad_scaler_is_refused_and_nothing_changes():
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    optimizer = FusedAdadelta([param], differentiable=True)
    optimizer.grad_scale = torch.tensor(2.0)  # as GradScaler sets it
    with pytest.raises(RuntimeError, match="differentiable=True.*GradScaler"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.ones(3)) and not optimizer.state
