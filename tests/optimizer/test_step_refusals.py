"""FusedAdadelta.step() refuses what it cannot step, with a clear exception, and changes nothing.

A refused step changes nothing: no param, grad or state tensor, and no state is
left behind for params seen for the first time in that step. Each refusal is
checked with the bad param in several positions: first in a group that has
already stepped, and last in a group added later, after params that would
otherwise have been updated. (What the op refuses when called directly is in
tests/op/test_op_refusals.py; what torch accepts and FusedAdadelta steps alike, in
test_parity_with_torch.py; refused hyperparameters, in test_api_and_errors.py.)
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import DEVICES, assert_unchanged, optimizer_snapshot, small_model

from adadelta_ext import FusedAdadelta

# --------------------------------------------------------------------------------------------
# An optimizer in which one param is spoiled, after params that would otherwise be updated:
# - last of the only group: one kernel call, which must check every param before changing any;
# - first of a group that already stepped, or last of a group added later (whose params have no
#   state yet): two kernel calls, the good one must not run either.
# --------------------------------------------------------------------------------------------

POSITIONS = ["last_param_of_the_only_group", "first_param_of_stepped_group", "last_param_of_new_group"]


def optimizer_with_a_bad_param(device, position, spoil):
    """(optimizer, bad_param) after one good step of group 0, with `spoil(param)` applied to one param."""
    generator = torch.Generator().manual_seed(0)

    def new_param(*shape):
        return torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))

    stepped = [new_param(4, 3), new_param(5), new_param(3, 2, 2)]
    optimizer = FusedAdadelta(stepped, lr=0.5, weight_decay=0.1)
    for p in stepped:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    optimizer.step()
    fresh = []
    if position != "last_param_of_the_only_group":
        fresh = [new_param(6), new_param(3, 4)]
        optimizer.add_param_group({"params": fresh, "rho": 0.5})
    for p in stepped + fresh:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    bad_param = {
        "last_param_of_the_only_group": stepped[-1],
        "first_param_of_stepped_group": stepped[0],
        "last_param_of_new_group": fresh[-1] if fresh else None,
    }[position]
    spoil(bad_param)
    return optimizer, bad_param


def sparse_grad(param):
    param.grad = param.grad.to_sparse()


def grad_of_another_shape(param):
    # Autograd refuses to assign such a grad (`param.grad = ...` checks the size);
    # writing through `.data`, as some hooks and old code do, still makes one.
    param.grad.data = torch.randn(param.numel() + 1, device=param.device, dtype=param.dtype)


def grad_of_another_dtype(param):
    # A param's grad_dtype (torch >= 2.9) lets autograd store a grad of another dtype.
    # torch.optim.Adadelta computes in mixed dtypes then; FusedAdadelta refuses.
    grad = param.grad.double()
    param.grad = None
    param.grad_dtype = torch.float64
    param.grad = grad


def param_data_of_another_shape(param):
    # The param is resized after state was created for it.
    param.data = torch.randn(7, device=param.device, dtype=param.dtype)
    param.grad = torch.randn(7, device=param.device, dtype=param.dtype)


BAD_PARAMS = {
    "sparse_grad": (sparse_grad, "FusedAdadelta does not support sparse gradients"),
    "grad_of_another_shape": (
        grad_of_another_shape,
        r"grads\[\d+\] has shape \[13\] but params\[\d+\] has shape",
    ),
    "grad_of_another_dtype": (
        grad_of_another_dtype,
        r"grads\[\d+\] has dtype Double but params\[\d+\] has dtype Float",
    ),
}


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("bad", list(BAD_PARAMS), ids=list(BAD_PARAMS))
@pytest.mark.parametrize("device", DEVICES)
def test_a_bad_grad_is_refused_and_the_step_changes_nothing(device, bad, position):
    spoil, message = BAD_PARAMS[bad]
    optimizer, _ = optimizer_with_a_bad_param(device, position, spoil)
    before = optimizer_snapshot(optimizer)

    with pytest.raises(RuntimeError, match=message):
        optimizer.step()

    assert_unchanged(optimizer_snapshot(optimizer), before)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_grad_error_names_fused_adadelta_like_torchs_names_adadelta(device):
    """torch.optim.Adadelta says "Adadelta does not support sparse gradients"; FusedAdadelta names itself."""
    param = torch.nn.Parameter(torch.randn(4, 3, device=device))
    param.grad = torch.randn(4, 3, device=device).to_sparse()
    with pytest.raises(RuntimeError, match="Adadelta does not support sparse gradients"):
        torch.optim.Adadelta([param]).step()
    with pytest.raises(RuntimeError, match="FusedAdadelta does not support sparse gradients"):
        FusedAdadelta([param]).step()


@pytest.mark.parametrize("device", DEVICES)
def test_param_resized_after_a_step_is_refused_because_its_state_no_longer_fits(device):
    """`param.data = <other shape>` after a step leaves state of the old shape: step() names the mismatch."""
    optimizer, bad_param = optimizer_with_a_bad_param(
        device, "first_param_of_stepped_group", param_data_of_another_shape
    )
    before = optimizer_snapshot(optimizer)

    with pytest.raises(
        RuntimeError, match=r"square_avgs\[0\] has shape \[4, 3\] but params\[0\] has shape \[7\]"
    ):
        optimizer.step()

    assert_unchanged(optimizer_snapshot(optimizer), before)
    assert optimizer.state[bad_param]["square_avg"].shape == (4, 3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("device", DEVICES)
def test_integer_params_are_refused_and_the_step_changes_nothing(device, dtype):
    """Integer tensors cannot require grad, but a plain one can be given a grad by hand and
    handed to an optimizer; step() names its dtype, and its index in its group. It comes last,
    after a fresh float param that would otherwise be updated."""
    optimizer, _ = optimizer_with_a_bad_param(device, "last_param_of_new_group", spoil=lambda param: None)
    fresh_param = torch.nn.Parameter(torch.randn(3, device=device))
    fresh_param.grad = torch.randn(3, device=device)
    integer_param = torch.arange(6, device=device).to(dtype)
    integer_param.grad = torch.ones_like(integer_param)
    optimizer.add_param_group({"params": [fresh_param, integer_param]})
    before = optimizer_snapshot(optimizer)
    aten_name = {torch.int64: "Long", torch.int32: "Int", torch.uint8: "Byte"}[dtype]

    with pytest.raises(RuntimeError, match=rf"params\[1\] has dtype {aten_name}; supported are float32"):
        optimizer.step()

    assert_unchanged(optimizer_snapshot(optimizer), before)


@pytest.mark.parametrize("device", DEVICES)
def test_step_without_any_grad_changes_nothing(device):
    model = small_model(device)
    optimizer = FusedAdadelta(model.parameters())
    before = optimizer_snapshot(optimizer)
    optimizer.step()
    assert_unchanged(optimizer_snapshot(optimizer), before)
    assert len(optimizer.state) == 0


def test_a_step_on_inference_tensors_outside_inference_mode_is_refused_like_torch():
    """Issue 9, defect 2: the refusal torch gives, before anything changes."""

    def inference_param():
        with torch.inference_mode():
            param = torch.randn(4)
            param.grad = torch.randn(4)
        return param

    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        torch.optim.Adadelta([inference_param()]).step()
    # torch writes the param before it raises; FusedAdadelta refuses first.
    param = inference_param()
    before = param.clone()
    optimizer = FusedAdadelta([param])
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        optimizer.step()
    assert torch.equal(param, before) and not optimizer.state
    with torch.inference_mode():
        optimizer.step()
    assert not torch.equal(param, before)


# --------------------------------------------------------------------------------------------
# Params of one group on several devices (needs a GPU).
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("bad_device", ["cpu", "cuda"])
def test_a_bad_param_on_one_device_refuses_the_step_on_every_device(bad_device):
    """The CPU params would be updated by the first of two kernel calls: every call is checked first."""
    generator = torch.Generator().manual_seed(0)
    devices = ["cpu", "cuda", "cpu", "cuda"]
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=generator).to(d)) for d in devices]
    optimizer = FusedAdadelta(params, lr=0.5)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.device)
    optimizer.step()
    bad_param = params[3] if bad_device == "cuda" else params[2]
    grad_of_another_shape(bad_param)
    before = optimizer_snapshot(optimizer)

    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \[16\] but params\[1\] has shape \[5, 3\]"):
        optimizer.step()

    assert_unchanged(optimizer_snapshot(optimizer), before)


@pytest.mark.cuda
def test_grad_on_another_device_than_its_param_is_refused():
    params = [torch.nn.Parameter(torch.randn(4, device="cuda")) for _ in range(2)]
    optimizer = FusedAdadelta(params)
    params[0].grad = torch.randn(4, device="cuda")
    params[1].grad = torch.zeros(4, device="cuda")
    params[1].grad.data = torch.randn(4)  # autograd refuses `grad = <cpu tensor>`; .data does not
    before = optimizer_snapshot(optimizer)
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cpu but params\[1\] is on cuda"):
        optimizer.step()
    assert_unchanged(optimizer_snapshot(optimizer), before)
