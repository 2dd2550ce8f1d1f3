"""What torch.optim.Adadelta steps with, and FusedAdadelta's op once refused: FusedAdadelta steps it
as torch does.

- hyperparameters outside the ranges torch.optim.Adadelta's __init__ checks, set afterwards
  through param_groups or an LRScheduler (torch checks them in __init__ only);

Tolerances (TORCH_TOLERANCES, as test_parity_with_torch.py's): bit for bit on CUDA, where the
kernel makes torch's roundings; assert_close's defaults on the CPU, where torch's float32 sqrt is
MKL's, not correctly rounded, so that bit-identity is impossible there. (What the op itself reads
such inputs as: tests/op/test_op_inputs_torch_accepts.py.)
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import DEVICES, TORCH_TOLERANCES, small_model, train_steps, twin_models

from adadelta_ext import FusedAdadelta


def assert_same_step(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, device: str) -> None:
    """Params and state of two optimizers over twin params, in order, as torch.optim.Adadelta keeps them."""

    def tensors(optimizer):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = [optimizer.state[p] for p in params]
        keys = ("step", "square_avg", "acc_delta")
        return [p.detach() for p in params], [[s[key] for key in keys] if s else [] for s in state]

    torch.testing.assert_close(tensors(ours), tensors(theirs), equal_nan=True, **TORCH_TOLERANCES[device])


def twin_optimizers(device, configure, **kwargs):
    """FusedAdadelta and torch.optim.Adadelta over twin small models, each passed to `configure`."""
    ours_model, theirs_model = twin_models(small_model(device))
    ours = FusedAdadelta(ours_model.parameters(), **kwargs)
    theirs = torch.optim.Adadelta(theirs_model.parameters(), **kwargs)
    return (ours_model, configure(ours)), (theirs_model, configure(theirs))


# --------------------------------------------------------------------------------------------
# Hyperparameters outside torch.optim.Adadelta's __init__ ranges.
# --------------------------------------------------------------------------------------------

GROUP_EDITS = {
    "negative_lr": {"lr": -0.5},
    "negative_weight_decay": {"weight_decay": -0.1},
    # Both make square_avg + eps or acc_delta + eps negative at the first step: NaN, as torch's.
    "rho_above_one": {"rho": 1.5},
    "negative_eps": {"eps": -1e-3},
}


@pytest.mark.parametrize("edit", list(GROUP_EDITS.values()), ids=list(GROUP_EDITS))
@pytest.mark.parametrize("device", DEVICES)
def test_a_param_groups_edit_outside_init_ranges_steps_as_torch(device, edit):
    def configure(optimizer):
        optimizer.param_groups[0].update(edit)
        return optimizer

    (ours_model, ours), (theirs_model, theirs) = twin_optimizers(device, configure)
    train_steps(ours_model, ours, 3)
    train_steps(theirs_model, theirs, 3)
    assert_same_step(ours, theirs, device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_lambda_lr_going_negative_steps_as_torch(device):
    """LambdaLR sets group["lr"] to lr * factor before each step: here 1.0, 0.0, -1.0, -2.0."""
    schedulers = []

    def configure(optimizer):
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0 - epoch))
        return optimizer

    (ours_model, ours), (theirs_model, theirs) = twin_optimizers(device, configure, weight_decay=0.1)
    for _ in range(4):
        for model, optimizer, scheduler in zip(
            (ours_model, theirs_model), (ours, theirs), schedulers, strict=True
        ):
            train_steps(model, optimizer, 1)
            scheduler.step()
    assert ours.param_groups[0]["lr"] < 0
    assert_same_step(ours, theirs, device)
