"""What torch.optim.Adadelta steps with, and FusedAdadelta's op once refused: FusedAdadelta steps it
as torch does.

- grads behind a lazy bit: the negative bit (`x.conj().imag`), or a ZeroTensor
  (`torch._efficientzerotensor`), read as their values, in a later param group too;
- a param listed twice in a group (tied weights gathered from two modules' parameters()): torch
  warns, and its for-loop updates the param twice in the step (its foreach path does otherwise);
- hyperparameters outside the ranges torch.optim.Adadelta's __init__ checks, set afterwards
  through param_groups or an LRScheduler (torch checks them in __init__ only);
- a grad that shares memory with a param (`p.grad = p.detach()`, a grad that is a view of another
  param): read as it was before the step, as torch's foreach path reads every grad before it
  writes any param (and its for-loop, for a grad that is its own param);

Tolerances (TORCH_TOLERANCES, as test_parity_with_torch.py's): bit for bit on CUDA, where the
kernel makes torch's roundings; assert_close's defaults on the CPU, where torch's float32 sqrt is
MKL's, not correctly rounded, so that bit-identity is impossible there. (What the op itself reads
such inputs as: tests/op/test_op_inputs_torch_accepts.py.)
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import (
    DEVICES,
    TORCH_TOLERANCES,
    assert_unchanged,
    lazily_negated,
    optimizer_snapshot,
    small_model,
    train_steps,
    twin_models,
)
from torch import nn

from adadelta_ext import FusedAdadelta


def assert_same_step(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, device: str) -> None:
    """Params and state of two optimizers over twin params, in order, as torch.optim.Adadelta keeps them."""

    def tensors(optimizer):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = [optimizer.state[p] for p in params]
        keys = ("step", "square_avg", "acc_delta")
        return [p.detach() for p in params], [[s[key] for key in keys] if s else [] for s in state]

    # check_device=False: FusedAdadelta keeps `step` on the param's device, torch on the CPU.
    torch.testing.assert_close(
        tensors(ours), tensors(theirs), equal_nan=True, check_device=False, **TORCH_TOLERANCES[device]
    )


def twin_optimizers(device, configure, **kwargs):
    """FusedAdadelta and torch.optim.Adadelta over twin small models, each passed to `configure`."""
    ours_model, theirs_model = twin_models(small_model(device))
    ours = FusedAdadelta(ours_model.parameters(), **kwargs)
    theirs = torch.optim.Adadelta(theirs_model.parameters(), **kwargs)
    return (ours_model, configure(ours)), (theirs_model, configure(theirs))


def random_tensor(shape, device, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device, dtype)


# --------------------------------------------------------------------------------------------
# Grads behind a lazy bit.
# --------------------------------------------------------------------------------------------

LAZY_GRADS = {
    "negative_bit": (torch.float32, lazily_negated),
    "negative_bit_complex": (torch.complex64, lazily_negated),
    "zero_tensor": (torch.float32, lambda g: torch._efficientzerotensor(g.shape, device=g.device)),
}


@pytest.mark.parametrize("lazy", list(LAZY_GRADS), ids=list(LAZY_GRADS))
@pytest.mark.parametrize("device", DEVICES)
def test_a_grad_behind_a_lazy_bit_in_a_second_group_steps_both_groups_as_torch(device, lazy):
    """The second group's grad selected torch's fallbacks, which refused it after the first group's
    call had stepped: both groups now step, each as torch's."""
    dtype, make_lazy = LAZY_GRADS[lazy]
    optimizers = []
    for optimizer_class in (FusedAdadelta, torch.optim.Adadelta):
        first, second = (
            nn.Parameter(random_tensor((4, 3), device)),
            nn.Parameter(random_tensor(5, device, dtype)),
        )
        groups = [{"params": [first]}, {"params": [second], "lr": 0.5}]
        optimizers.append(optimizer_class(groups, weight_decay=0.1))
        for seed in range(3):
            first.grad = random_tensor(first.shape, device, seed=seed)
            second.grad = make_lazy(random_tensor(second.shape, device, dtype, seed=seed + 10))
            optimizers[-1].step()
    assert_same_step(*optimizers, device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_param_behind_a_lazy_bit_in_a_second_group_refuses_the_whole_step(device):
    """The second group has a grad behind the negative bit, which it may, and a param behind it,
    which it may not: the check op refuses the param (torch's fallback had handed it the param
    resolved, and the first group's call stepped before the second's raised), so nothing changes."""
    first, lazy_grad = nn.Parameter(random_tensor(4, device)), nn.Parameter(random_tensor(5, device))
    first.grad = random_tensor(4, device, seed=1)
    lazy_grad.grad = lazily_negated(random_tensor(5, device, seed=2))
    lazy_param = nn.Parameter(lazily_negated(random_tensor(3, device, seed=3)))
    lazy_param.grad = random_tensor(3, device, seed=4)
    optimizer = FusedAdadelta([{"params": [first]}, {"params": [lazy_grad, lazy_param]}])
    before = optimizer_snapshot(optimizer)
    with pytest.raises(RuntimeError, match=r"params\[1\] is written but has the negative bit set"):
        optimizer.step()
    assert_unchanged(optimizer_snapshot(optimizer), before)


# --------------------------------------------------------------------------------------------
# A param listed twice.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_a_param_listed_twice_steps_twice_as_torchs_for_loop(device):
    optimizers = []
    for optimizer_class, kwargs in ((FusedAdadelta, {}), (torch.optim.Adadelta, {"foreach": False})):
        tied, other = nn.Parameter(random_tensor((4, 3), device)), nn.Parameter(random_tensor(5, device))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            optimizers.append(optimizer_class([tied, other, tied], weight_decay=0.1, **kwargs))
        for seed in range(3):
            tied.grad = random_tensor(tied.shape, device, seed=seed + 10)
            other.grad = random_tensor(other.shape, device, seed=seed + 20)
            optimizers[-1].step()
    for optimizer in optimizers:  # each of 3 steps stepped the tied param twice
        assert optimizer.state[optimizer.param_groups[0]["params"][0]]["step"].item() == 6
    assert_same_step(*optimizers, device)


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


# --------------------------------------------------------------------------------------------
# Grads sharing memory with a param.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for_loop"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_grad_that_is_its_own_param_steps_as_torch(device, foreach):
    optimizers = []
    for optimizer_class, kwargs in ((FusedAdadelta, {}), (torch.optim.Adadelta, {"foreach": foreach})):
        tied, other = nn.Parameter(random_tensor((4, 3), device)), nn.Parameter(random_tensor(5, device))
        optimizers.append(optimizer_class([tied, other], weight_decay=0.1, **kwargs))
        for seed in range(3):
            tied.grad = tied.detach()
            other.grad = random_tensor(5, device, seed=seed + 10)
            optimizers[-1].step()
    assert_same_step(*optimizers, device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_grad_that_is_a_view_of_another_param_steps_as_torchs_foreach_path(device):
    """torch's foreach path reads the view before it writes the param under it; its for-loop would
    read it after the earlier param's update, which FusedAdadelta, stepping every param at once, does
    not follow."""
    optimizers = []
    for optimizer_class, kwargs in ((FusedAdadelta, {}), (torch.optim.Adadelta, {"foreach": True})):
        viewed, viewing = nn.Parameter(random_tensor((4, 3), device)), nn.Parameter(random_tensor(3, device))
        optimizers.append(optimizer_class([viewed, viewing], weight_decay=0.1, **kwargs))
        for seed in range(3):
            viewed.grad = random_tensor((4, 3), device, seed=seed + 10)
            viewing.grad = viewed.detach()[1]
            optimizers[-1].step()
    assert_same_step(*optimizers, device)
