"""FusedAdadelta gathers each step's tensors anew, in C++ where it can (NOTE [Gathered in C++] in
adadelta_ext/optimizer.py): steady steps take the C++ path, which gives the Python path's bits;
whatever the user changes between steps (state replaced or cleared, params swapped, grads dropped)
is seen by the next step, which then steps as torch.optim.Adadelta does; and no step holds a
tensor after it returns.

Tolerances: assert_close's defaults for the dtype, as in test_parity_with_torch.py (the CPU
cannot be bit-identical with torch: torch's float32 sqrt is not correctly rounded). The two paths
run the same op: bit for bit.
"""

from __future__ import annotations

import gc
import weakref
from collections import defaultdict

import pytest
import torch
from optim_testing import DEVICES, optimizer_state, small_model, train_steps, twin_models
from torch import nn

from adadelta_ext import FusedAdadelta


@pytest.fixture
def python_path_count(monkeypatch):
    """How many times FusedAdadelta built its op calls in Python (the path the C++ one falls back to)."""
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
def test_steps_after_the_first_are_gathered_in_cpp(device, python_path_count):
    fused_model, torch_model = twin_models(small_model(device))
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5, weight_decay=0.1)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5, weight_decay=0.1)
    for seed in range(5):
        step_both(fused_model, fused, torch_model, reference, seed)
        group = fused.param_groups[0]
        group["lr"] = reference.param_groups[0]["lr"] = group["lr"] * 0.8  # read at every step
    assert python_path_count() == 1, "only the first step, which creates the state, needs Python"


CONFIGS = {
    "float32_two_groups": (torch.float32, {}),
    "float64": (torch.float64, {}),
    "bfloat16": (torch.bfloat16, {}),
    "float16_fp32_state": (torch.float16, {"fp32_state": True}),
    "bfloat16_kahan_sum": (torch.bfloat16, {"kahan_sum": True}),
    "bfloat16_stochastic_round": (torch.bfloat16, {"stochastic_round": True}),
}


@pytest.mark.parametrize("config", CONFIGS.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_the_cpp_and_python_paths_give_the_same_bits(device, config, monkeypatch):
    """One model steps through the C++ path, its twin through the Python path alone: the same bits,
    state included. The rounding options with a float32 param among the 16-bit ones (two calls per
    group), and two groups with their own options."""
    dtype, options = CONFIGS[config]
    models = twin_models(small_model(device, dtype))
    for model in models:
        model[-1].float()  # a float32 param among 16-bit ones
    optimizers = []
    for model in models:
        groups = [
            {"params": list(model[0].parameters())},
            {"params": list(model[2:].parameters()), "rho": 0.5},
        ]
        optimizers.append(FusedAdadelta(groups, lr=0.5, weight_decay=0.1, **options))
    python_only = optimizers[1]
    monkeypatch.setattr(python_only, "_step_gathered_in_cpp", lambda: False)
    for seed in range(4):
        random_grads(*models, seed=seed)
        for optimizer in optimizers:
            torch.manual_seed(1)  # the same stochastic rounding seeds, drawn at the first step
            optimizer.step()
    torch.testing.assert_close(models[0].state_dict(), models[1].state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(optimizer_state(optimizers[0]), optimizer_state(python_only), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Changes between steps, applied to both optimizers and models alike.
# --------------------------------------------------------------------------------------------


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


def clear_the_state(model, optimizer):
    optimizer.state.clear()


def replace_the_state(model, optimizer):
    optimizer.state = defaultdict(dict)


def load_a_state_dict(model, optimizer):
    optimizer.load_state_dict(optimizer.state_dict())


def clear_a_params_state(model, optimizer):
    optimizer.state[model[2].weight].clear()


def empty_a_params_state(model, optimizer):
    optimizer.state[model[2].weight] = {}


def zero_a_square_avg(model, optimizer):
    optimizer.state[model[2].weight]["square_avg"] = torch.zeros_like(model[2].weight)


def zero_an_acc_delta(model, optimizer):
    optimizer.state[model[2].weight]["acc_delta"] = torch.zeros_like(model[2].weight)


CHANGES = {
    "param_dtype": change_dtype,
    "param_memory_format": change_memory_format,
    "a_param_loses_its_grad": freeze_a_param,
    "a_param_replaced_in_param_groups": replace_a_param,
    "param_group_added": add_a_param_group,
    "state_cleared": clear_the_state,
    "state_replaced_by_a_new_dict": replace_the_state,
    "state_dict_loaded": load_a_state_dict,
    "a_params_state_cleared": clear_a_params_state,
    "a_params_state_set_to_an_empty_dict": empty_a_params_state,
    "a_square_avg_replaced": zero_a_square_avg,
    "an_acc_delta_replaced": zero_an_acc_delta,
}


@pytest.mark.parametrize("change", CHANGES.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_a_change_between_steps_is_seen_by_the_next_step(device, change):
    """Two steps, the change applied to both optimizers and models alike, then two more: every step
    matches torch.optim.Adadelta's, and so does every param's state at the end."""
    fused_model, torch_model = twin_models(small_model(device))
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    for seed in range(2):
        step_both(fused_model, fused, torch_model, reference, seed)
    for model, optimizer in ((fused_model, fused), (torch_model, reference)):
        CHANGES[change](model, optimizer)
    for seed in range(2, 4):
        step_both(fused_model, fused, torch_model, reference, seed)
    # Per param now in the groups (a replaced param's old state stays behind, in both).
    # (After model.double() torch keeps float32 state, FusedAdadelta converts it: see test_state.py.)
    for fused_group, torch_group in zip(fused.param_groups, reference.param_groups, strict=True):
        for p, twin in zip(fused_group["params"], torch_group["params"], strict=True):
            torch.testing.assert_close(
                fused.state[p], reference.state[twin], check_device=False, check_dtype=False
            )


@pytest.mark.parametrize("device", DEVICES)
def test_a_param_that_gets_a_grad_joins_the_next_step(device):
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
    assert fused_model[0].bias in fused.state


@pytest.mark.parametrize("device", DEVICES)
def test_two_params_that_swap_state_step_with_each_others(device):
    """Issue 23, defect 2: state dicts swapped between two params of one shape are used as swapped."""
    fused_model, torch_model = twin_models(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(device))
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    for seed in range(2):
        step_both(fused_model, fused, torch_model, reference, seed)
    for model, optimizer in ((fused_model, fused), (torch_model, reference)):
        state = optimizer.state
        state[model[0].weight], state[model[1].weight] = state[model[1].weight], state[model[0].weight]
    random_grads(fused_model, torch_model, seed=2)
    for model in (fused_model, torch_model):
        model[1].weight.grad.mul_(100)  # acc_delta/square_avg then tell the two states apart
    fused.step()
    reference.step()
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict())


# --------------------------------------------------------------------------------------------
# No tensor is held after a step.
# --------------------------------------------------------------------------------------------


def stepped_optimizer(device, optimizer_class=FusedAdadelta):
    model = small_model(device)
    optimizer = optimizer_class(model.parameters())
    train_steps(model, optimizer, 2)
    return model, optimizer


FORGETTINGS = {
    "state_cleared": lambda optimizer: optimizer.state.clear(),
    "state_replaced_by_a_new_dict": lambda optimizer: setattr(optimizer, "state", defaultdict(dict)),
}


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adadelta, FusedAdadelta])
@pytest.mark.parametrize("forget", FORGETTINGS.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_forgotten_state_is_freed_at_once(device, forget, optimizer_class):
    """Issue 23, defect 5: state the user drops is freed at once, and so are the params once the
    model and the param groups are gone too; as torch frees them, not at the next step or never."""
    model, optimizer = stepped_optimizer(device, optimizer_class)
    tensors = [weakref.ref(t) for state in optimizer.state.values() for t in state.values()]
    tensors += [weakref.ref(p) for p in model.parameters()]
    FORGETTINGS[forget](optimizer)
    optimizer.param_groups.clear()
    del model
    gc.collect()
    assert [t() for t in tensors] == [None] * len(tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_holds_no_grad_after_it(device):
    """Issue 23, defect 4's other half: grads are referenced during a step only."""
    model, optimizer = stepped_optimizer(device)
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    optimizer.zero_grad(set_to_none=True)
    assert [grad() for grad in grads] == [None] * len(grads)


SWAPPING_CONVERSIONS = {
    "model_double": lambda model, state_dict: model.double(),
    "load_state_dict": lambda model, state_dict: model.load_state_dict(state_dict),
}


@pytest.mark.parametrize("conversion", SWAPPING_CONVERSIONS.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_modules_swap_their_params_after_a_step(device, conversion):
    """Issue 23, defect 1: with swap_module_params_on_conversion, model.double() and
    model.load_state_dict() swap each param's tensor in place (torch.utils.swap_tensors), which
    refuses a param that something else references. After a step nothing does, and the next step
    matches torch's."""
    fused_model, torch_model = twin_models(small_model(device))
    saved = {key: value.clone() for key, value in fused_model.state_dict().items()}
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    step_both(fused_model, fused, torch_model, reference, seed=0)
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for model in (fused_model, torch_model):
            SWAPPING_CONVERSIONS[conversion](model, saved)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    for seed in range(1, 3):
        step_both(fused_model, fused, torch_model, reference, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_a_parametrization_registered_after_a_step(device):
    """torch.nn.utils.parametrize moves a param into the parametrization (by swapping, with
    swap_module_params_on_conversion): it works after a step, and the param steps on."""
    model = nn.Linear(4, 3).to(device)
    optimizer = FusedAdadelta(model.parameters())
    model(torch.ones(2, 4, device=device)).sum().backward()
    optimizer.step()
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        torch.nn.utils.parametrize.register_parametrization(model, "weight", nn.Identity())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    before = model.weight.detach().clone()
    optimizer.zero_grad()
    model(torch.ones(2, 4, device=device)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.weight.detach(), before)
