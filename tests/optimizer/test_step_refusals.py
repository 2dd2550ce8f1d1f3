"""FusedAdadelta on bad input: it either does what torch.optim.Adadelta does or raises a clear exception.

A refused step changes nothing: no param, grad or state tensor, and no state is
left behind for params seen for the first time in that step. Each refusal is
checked with the bad param in several positions: first in a group that has
already stepped, and last in a group added later, after params that would
otherwise have been updated.

float32/float64 comparisons with torch.optim.Adadelta use assert_close's
default tolerances (float32: rtol 1.3e-6, atol 1e-5; float64: rtol 1e-7,
atol 1e-7): the two compute the same formula, rounded in a different order.
"""

from __future__ import annotations

import re

import pytest
import torch
from optim_testing import DEVICES, requires_cuda, small_model, train_steps, twin_models

import adadelta_ext
from adadelta_ext import FusedAdadelta

# --------------------------------------------------------------------------------------------
# Snapshots: everything a step may change.
# --------------------------------------------------------------------------------------------


def all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    """Copies of every param, every grad and every state tensor, keyed by the param's position."""
    params = all_params(optimizer)
    return {
        "params": {index: p.detach().clone() for index, p in enumerate(params)},
        "grads": {index: p.grad.clone() for index, p in enumerate(params) if p.grad is not None},
        "state": {
            index: {key: value.clone() for key, value in optimizer.state[p].items()}
            for index, p in enumerate(params)
            if p in optimizer.state
        },
    }


def assert_nothing_changed(optimizer: torch.optim.Optimizer, before: dict) -> None:
    """Bit for bit (rtol=0, atol=0): a refused step must not have touched anything."""
    after = optimizer_snapshot(optimizer)
    assert after["state"].keys() == before["state"].keys(), "state was created or removed"
    assert after["grads"].keys() == before["grads"].keys(), "a grad was created or removed"
    for part in ("params", "grads", "state"):
        torch.testing.assert_close(after[part], before[part], rtol=0, atol=0, equal_nan=True, msg=part)


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

    assert_nothing_changed(optimizer, before)


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

    assert_nothing_changed(optimizer, before)
    assert optimizer.state[bad_param]["square_avg"].shape == (4, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_new_parameter_assigned_to_the_module_is_not_the_one_the_optimizer_updates(device):
    """As in torch.optim.Adadelta: the optimizer holds the old Parameter; the new one never steps.

    After `model[2].weight = nn.Parameter(...)`, backward gives the new Parameter a grad
    and the old one none (zero_grad sets grads to None), so neither is stepped by the
    optimizer, while every other param keeps training.
    """
    fused_model, torch_model = twin_models(small_model(device))
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    train_steps(fused_model, fused, 2)
    train_steps(torch_model, reference, 2)
    old_weight = fused_model[2].weight
    old_weight_value = old_weight.detach().clone()
    for model in (fused_model, torch_model):
        model[2].weight = torch.nn.Parameter(torch.ones(5, 48, device=device))

    train_steps(fused_model, fused, 3)
    train_steps(torch_model, reference, 3)

    assert torch.equal(fused_model[2].weight, torch.ones(5, 48, device=device)), (
        "the new Parameter must not step"
    )
    assert torch.equal(old_weight, old_weight_value), "the old Parameter has no grad any more"
    assert fused_model[2].weight not in fused.state
    assert fused.state[old_weight]["step"].item() == 2
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict())
    torch.testing.assert_close(
        fused.state_dict()["state"], reference.state_dict()["state"], check_device=False
    )


# --------------------------------------------------------------------------------------------
# Inputs torch.optim.Adadelta accepts: FusedAdadelta gives the same results.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_in_grads_give_what_torch_gives(device, dtype, bad_value):
    """NaN/Inf in some grad elements at step 2 of 4: the same NaN/Inf/finite pattern and values as torch.

    Only float32/float64: for float16/bfloat16 torch rounds after each of its ops and the finite
    values differ by many 16-bit ulps (see test_parity.py), which is not what this test is about.
    """
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (17,), ()]
    fused_params = [
        torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype).to(device)) for s in shapes
    ]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = FusedAdadelta(fused_params, lr=0.5, weight_decay=0.1)
    reference = torch.optim.Adadelta(torch_params, lr=0.5, weight_decay=0.1)
    for step in range(4):
        for ours, theirs in zip(fused_params, torch_params, strict=True):
            grad = torch.randn(ours.shape, generator=generator, dtype=dtype).to(device)
            if step == 1:
                grad.view(-1)[::3] = bad_value
            ours.grad, theirs.grad = grad.clone(), grad.clone()
        fused.step()
        reference.step()
        torch.testing.assert_close(fused_params, torch_params, equal_nan=True)
    assert not all(p.isfinite().all() for p in fused_params), "the bad values must have reached the params"
    assert any(p.isfinite().any() for p in fused_params), "elements with good grads must stay finite"
    torch.testing.assert_close(
        fused.state_dict()["state"], reference.state_dict()["state"], equal_nan=True, check_device=False
    )


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_param_is_skipped_and_gets_no_state_as_in_torch(device):
    fused_model, torch_model = twin_models(small_model(device))
    for model in (fused_model, torch_model):
        model[0].bias.requires_grad_(False)
    frozen_value = fused_model[0].bias.detach().clone()
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    train_steps(fused_model, fused, 3)
    train_steps(torch_model, reference, 3)

    assert torch.equal(fused_model[0].bias, frozen_value)
    assert fused_model[0].bias.grad is None
    assert fused_model[0].bias not in fused.state
    assert fused.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_zero_element_params_step_like_in_torch(device, dtype):
    """Empty params (shapes (0,), (3, 0)) beside non-empty ones: empty state, step counted, as in torch."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(0,), (5,), (3, 0), (2, 3)]
    fused_params = [
        torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype).to(device)) for s in shapes
    ]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = FusedAdadelta(fused_params, lr=0.5)
    reference = torch.optim.Adadelta(torch_params, lr=0.5)
    for _ in range(3):
        for ours, theirs in zip(fused_params, torch_params, strict=True):
            grad = torch.randn(ours.shape, generator=generator, dtype=dtype).to(device)
            ours.grad, theirs.grad = grad.clone(), grad.clone()
        fused.step()
        reference.step()
    torch.testing.assert_close(fused_params, torch_params)
    ours_state, theirs_state = fused.state_dict()["state"], reference.state_dict()["state"]
    torch.testing.assert_close(ours_state, theirs_state, check_device=False)
    assert ours_state[0]["square_avg"].shape == (0,)
    assert ours_state[0]["step"].item() == 3


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("device", DEVICES)
def test_integer_params_are_refused_and_the_step_changes_nothing(device, dtype):
    """Integer tensors cannot require grad, but a plain one can be given a grad by hand and
    handed to an optimizer; step() names its dtype. It comes last, after a fresh float param."""
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

    assert_nothing_changed(optimizer, before)


@pytest.mark.parametrize("device", DEVICES)
def test_step_without_any_grad_changes_nothing(device):
    model = small_model(device)
    optimizer = FusedAdadelta(model.parameters())
    before = optimizer_snapshot(optimizer)
    optimizer.step()
    assert_nothing_changed(optimizer, before)
    assert len(optimizer.state) == 0


# --------------------------------------------------------------------------------------------
# Hyperparameters.
# --------------------------------------------------------------------------------------------

OUT_OF_RANGE = {
    "negative_lr": {"lr": -1},
    "negative_tensor_lr": {"lr": torch.tensor(-1.0)},
    "nan_lr": {"lr": float("nan")},
    "rho_above_one": {"rho": 1.5},
    "negative_rho": {"rho": -0.5},
    "negative_eps": {"eps": -1},
    "negative_weight_decay": {"weight_decay": -1},
    "tensor_lr_of_two_elements": {"lr": torch.tensor([0.1, 0.2])},
}


@pytest.mark.parametrize("kwargs", list(OUT_OF_RANGE.values()), ids=list(OUT_OF_RANGE))
def test_hyperparameters_out_of_range_raise_torchs_value_error(kwargs):
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adadelta(params, **kwargs)
    with pytest.raises(ValueError) as ours:
        FusedAdadelta(params, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_differentiable_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="FusedAdadelta does not support differentiable=True"):
        FusedAdadelta([torch.nn.Parameter(torch.zeros(3))], differentiable=True)


# --------------------------------------------------------------------------------------------
# Params of one group on several devices (needs a GPU).
# --------------------------------------------------------------------------------------------


@requires_cuda
def test_one_group_with_params_on_cpu_and_cuda_steps_like_torch():
    generator = torch.Generator().manual_seed(0)
    devices = ["cpu", "cuda", "cpu", "cuda"]
    fused_params = [torch.nn.Parameter(torch.randn(5, 3, generator=generator).to(d)) for d in devices]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = FusedAdadelta(fused_params, lr=0.5, weight_decay=0.1)
    reference = torch.optim.Adadelta(torch_params, lr=0.5, weight_decay=0.1)
    for _ in range(3):
        for ours, theirs in zip(fused_params, torch_params, strict=True):
            grad = torch.randn(ours.shape, generator=generator).to(ours.device)
            ours.grad, theirs.grad = grad.clone(), grad.clone()
        fused.step()
        reference.step()
    torch.testing.assert_close(fused_params, torch_params)
    for p in fused_params:
        assert fused.state[p]["step"].device == p.device


@requires_cuda
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

    assert_nothing_changed(optimizer, before)


@requires_cuda
def test_grad_on_another_device_than_its_param_is_refused():
    params = [torch.nn.Parameter(torch.randn(4, device="cuda")) for _ in range(2)]
    optimizer = FusedAdadelta(params)
    params[0].grad = torch.randn(4, device="cuda")
    params[1].grad = torch.zeros(4, device="cuda")
    params[1].grad.data = torch.randn(4)  # autograd refuses `grad = <cpu tensor>`; .data does not
    before = optimizer_snapshot(optimizer)
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cpu but params\[1\] is on cuda"):
        optimizer.step()
    assert_nothing_changed(optimizer, before)


# --------------------------------------------------------------------------------------------
# Direct calls of the op: a RuntimeError, never a crash, and nothing changes.
# --------------------------------------------------------------------------------------------

OPTIONS = {"lr": 0.5, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.1, "maximize": False}


def op_lists(device="cpu", count=2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=generator).to(device, dtype) for _ in range(count)]
    return {
        "params": params,
        "grads": [torch.randn(3, 2, generator=generator).to(device, dtype) for _ in range(count)],
        "square_avgs": [torch.rand(3, 2, generator=generator).to(device, dtype) for _ in range(count)],
        "acc_deltas": [torch.rand(3, 2, generator=generator).to(device, dtype) for _ in range(count)],
        "state_steps": [torch.zeros((), device=device) for _ in range(count)],
    }


def one_grad_fewer(lists, options):
    lists["grads"].pop()


def integer_params(lists, options):
    lists["params"] = [p.long() for p in lists["params"]]
    lists["grads"] = [g.long() for g in lists["grads"]]


def grad_of_other_dtype(lists, options):
    lists["grads"][1] = lists["grads"][1].double()


def state_of_other_dtype(lists, options):
    lists["square_avgs"][1] = lists["square_avgs"][1].double()


def state_of_other_shape(lists, options):
    lists["acc_deltas"][1] = lists["acc_deltas"][1].t()


def integer_step(lists, options):
    lists["state_steps"][1] = lists["state_steps"][1].long()


def step_of_two_elements(lists, options):
    lists["state_steps"][1] = lists["state_steps"][1].repeat(2)


def tensor_lr_of_two_elements(lists, options):
    options["lr"] = torch.tensor([0.1, 0.2], device=lists["params"][0].device)


def integer_grad_scale(lists, options):
    options["grad_scale"] = torch.tensor(2, device=lists["params"][0].device)


OP_MISUSES = {
    "one_grad_fewer": (one_grad_fewer, "must have the same length, got 2, 1, 2, 2 and 2"),
    "integer_params": (integer_params, r"params\[0\] has dtype Long"),
    "grad_of_other_dtype": (
        grad_of_other_dtype,
        r"grads\[1\] has dtype Double but params\[1\] has dtype Float",
    ),
    "state_of_other_dtype": (
        state_of_other_dtype,
        r"square_avgs\[1\] and acc_deltas\[1\] must both have the dtype",
    ),
    "state_of_other_shape": (
        state_of_other_shape,
        r"acc_deltas\[1\] has shape \[2, 3\] but params\[1\] has shape \[3, 2\]",
    ),
    "integer_step": (integer_step, r"state_steps\[1\] must be a one-element float32 or float64 tensor"),
    "step_of_two_elements": (
        step_of_two_elements,
        r"state_steps\[1\] must be a one-element float32 or float64 tensor",
    ),
    "tensor_lr_of_two_elements": (tensor_lr_of_two_elements, "lr must have one element, got 2"),
    "integer_grad_scale": (integer_grad_scale, "grad_scale must be a floating-point tensor"),
}


def clone_lists(lists):
    return {name: [t.clone() for t in tensors] for name, tensors in lists.items()}


@pytest.mark.parametrize("misuse", list(OP_MISUSES), ids=list(OP_MISUSES))
@pytest.mark.parametrize("device", DEVICES)
def test_op_called_with_mismatched_lists_raises_runtime_error_and_changes_nothing(device, misuse):
    spoil, message = OP_MISUSES[misuse]
    lists, options = op_lists(device), dict(OPTIONS)
    spoil(lists, options)
    before = clone_lists(lists)

    with pytest.raises(RuntimeError, match=message):
        adadelta_ext.fused_adadelta_(*lists.values(), **options)

    torch.testing.assert_close(lists, before, rtol=0, atol=0)


EMPTY_LISTS: list[list[torch.Tensor]] = [[] for _ in range(6)]


def test_op_with_empty_lists_raises_like_torchs_fused_ops():
    """No tensor to pick a kernel by: the dispatcher raises NotImplementedError (a RuntimeError),
    as it does for torch._fused_adam_([], ...). FusedAdadelta.step() makes no such call."""
    with pytest.raises(RuntimeError, match="There were no tensor arguments to this function"):
        adam_options = {"beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "eps": 1e-8, "amsgrad": False}
        torch._fused_adam_(*EMPTY_LISTS, lr=0.1, maximize=False, **adam_options)
    with pytest.raises(RuntimeError, match="There were no tensor arguments to this function"):
        adadelta_ext.fused_adadelta_(*EMPTY_LISTS[:5], **OPTIONS)


@requires_cuda
@pytest.mark.parametrize(
    "misuse",
    [
        "params_on_two_devices",
        "grad_on_other_device",
        "state_on_other_device",
        "step_on_other_device",
        "lr_on_other_device",
    ],
)
def test_op_called_with_tensors_on_mixed_devices_raises_runtime_error_and_changes_nothing(misuse):
    lists, options = op_lists("cuda"), dict(OPTIONS)
    if misuse == "params_on_two_devices":
        for name in lists:
            lists[name][1] = lists[name][1].cpu()
        message = r"params\[1\] is on cpu but params\[0\] is on cuda:0"
    elif misuse == "grad_on_other_device":
        lists["grads"][1] = lists["grads"][1].cpu()
        message = r"grads\[1\] is on cpu but params\[1\] is on cuda:0"
    elif misuse == "state_on_other_device":
        lists["square_avgs"][1] = lists["square_avgs"][1].cpu()
        message = r"square_avgs\[1\] is on cpu but params\[1\] is on cuda:0"
    elif misuse == "step_on_other_device":
        lists["state_steps"][1] = lists["state_steps"][1].cpu()
        message = re.escape("state_steps[1] must be a one-element float32 or float64 tensor on cuda:0")
    else:
        options["lr"] = torch.tensor(0.5)
        message = "lr is on cpu but the params are on cuda:0"
    before = clone_lists(lists)

    with pytest.raises(RuntimeError, match=message):
        adadelta_ext.fused_adadelta_(*lists.values(), **options)

    torch.testing.assert_close(lists, before, rtol=0, atol=0)
