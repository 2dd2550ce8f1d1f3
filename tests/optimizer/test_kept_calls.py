"""FusedAdadelta keeps its op calls between steps (NOTE [Kept calls] in adadelta_ext/optimizer.py):
after the first step, steps reuse the lists kept in C++ and skip the per-param Python work; any
change those lists came from makes the next step build them anew, and it then steps as
torch.optim.Adadelta does. (Refused kept steps are in test_step_refusals.py, whose bad params
spoil an optimizer that has already stepped.)

Tolerances: assert_close's defaults for the dtype, as in test_parity_with_torch.py (the CPU
cannot be bit-identical with torch: torch's float32 sqrt is not correctly rounded).
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
from optim_testing import DEVICES, small_model, twin_models
from torch.utils._python_dispatch import TorchDispatchMode

from adadelta_ext import FusedAdadelta


@pytest.fixture
def full_path_count(monkeypatch):
    """How many times FusedAdadelta built its op calls from its param groups (the full path)."""
    calls = []
    init_group = FusedAdadelta._init_group

    def counted(self, group, *lists):
        calls.append(group)
        return init_group(self, group, *lists)

    monkeypatch.setattr(FusedAdadelta, "_init_group", counted)
    return lambda: len(calls)


def random_grads(*models, seed):
    generator = torch.Generator().manual_seed(seed)
    for params in zip(*(model.parameters() for model in models), strict=True):
        grad = torch.randn(params[0].shape, generator=generator, dtype=torch.float64)
        for p in params:
            if p.requires_grad:
                p.grad = grad.to(p.device, p.dtype)


def step_both(fused_model, fused, torch_model, reference, seed):
    random_grads(fused_model, torch_model, seed=seed)
    fused.step()
    reference.step()
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict())


@pytest.mark.parametrize("device", DEVICES)
def test_steps_after_the_first_reuse_the_kept_calls(device, full_path_count):
    fused_model, torch_model = twin_models(small_model(device))
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5, weight_decay=0.1)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5, weight_decay=0.1)
    for seed in range(5):
        step_both(fused_model, fused, torch_model, reference, seed)
        group = fused.param_groups[0]
        group["lr"] = reference.param_groups[0]["lr"] = group["lr"] * 0.8  # read at every step
    assert full_path_count() == 1


def change_dtype(model, optimizer):
    model.double()


def change_memory_format(model, optimizer):
    model.to(memory_format=torch.channels_last)


def freeze_a_param(model, optimizer):
    model[0].bias.requires_grad_(False)
    model[0].bias.grad = None


def replace_a_param(model, optimizer):
    new = torch.nn.Parameter(model[2].bias.detach().clone())
    model[2].bias = new
    optimizer.param_groups[0]["params"][3] = new


def add_a_param_group(model, optimizer):
    extra = torch.nn.Parameter(torch.ones(3, device=model[0].weight.device))
    extra.grad = torch.ones_like(extra)
    optimizer.add_param_group({"params": [extra]})
    return extra


def clear_the_state(model, optimizer):
    optimizer.state.clear()


def load_a_state_dict(model, optimizer):
    saved = optimizer.state_dict()
    optimizer.load_state_dict(saved)


CHANGES = {
    "param_dtype": change_dtype,
    "param_memory_format": change_memory_format,
    "a_param_loses_its_grad": freeze_a_param,
    "a_param_replaced_in_param_groups": replace_a_param,
    "param_group_added": add_a_param_group,
    "state_cleared": clear_the_state,
    "state_dict_loaded": load_a_state_dict,
}


@pytest.mark.parametrize("change", CHANGES.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_a_change_between_steps_rebuilds_the_calls_and_steps_as_torch(device, change, full_path_count):
    """Two steps, the change applied to both optimizers and models alike, then two more: the step
    after the change takes the full path, and every step matches torch.optim.Adadelta's."""
    fused_model, torch_model = twin_models(small_model(device))
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    for seed in range(2):
        step_both(fused_model, fused, torch_model, reference, seed)
    assert full_path_count() == 1

    for model, optimizer in ((fused_model, fused), (torch_model, reference)):
        CHANGES[change](model, optimizer)
    full_paths_before = full_path_count()
    for seed in range(2, 4):
        step_both(fused_model, fused, torch_model, reference, seed)
        if seed == 2:
            assert full_path_count() > full_paths_before, "the step after the change reused stale calls"
    # Per param now in the groups (a replaced param's old state stays behind, in both).
    # (After model.double() torch keeps float32 state, FusedAdadelta converts it: see test_state.py.)
    for fused_group, torch_group in zip(fused.param_groups, reference.param_groups, strict=True):
        for p, twin in zip(fused_group["params"], torch_group["params"], strict=True):
            torch.testing.assert_close(
                fused.state[p], reference.state[twin], check_device=False, check_dtype=False
            )


@pytest.mark.parametrize("device", DEVICES)
def test_a_param_that_gets_a_grad_joins_the_next_step(device, full_path_count):
    """A param without a grad is skipped (as torch skips it) until it has one: then it steps."""
    fused_model, torch_model = twin_models(small_model(device))
    for model in (fused_model, torch_model):
        model[0].bias.requires_grad_(False)
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    for seed in range(2):
        step_both(fused_model, fused, torch_model, reference, seed)
    for model in (fused_model, torch_model):
        model[0].bias.requires_grad_(True)
    step_both(fused_model, fused, torch_model, reference, 2)
    assert full_path_count() == 2
    assert fused_model[0].bias in fused.state


class PassThroughMode(TorchDispatchMode):
    """Python code inside every op call: the mode runs each op as it is."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("under_a_mode", [False, True], ids=["borrowed", "referenced"])
def test_a_kept_step_holds_no_grad_after_it(under_a_mode, full_path_count):
    """Kept steps borrow the grads, or, where Python code runs inside the op call (a dispatch mode),
    reference them (NOTE [Borrowed grads] in csrc/kept_step_lists.cpp): either way, a grad set to
    None after the step is freed."""
    fused_model, torch_model = twin_models(small_model("cpu"))
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    step_both(fused_model, fused, torch_model, reference, seed=0)
    with PassThroughMode() if under_a_mode else contextlib.nullcontext():
        step_both(fused_model, fused, torch_model, reference, seed=1)
    assert full_path_count() == 1
    grads = [weakref.ref(p.grad) for p in fused_model.parameters()]
    fused.zero_grad(set_to_none=True)
    assert [grad() for grad in grads] == [None] * len(grads)
