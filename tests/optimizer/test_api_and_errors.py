"""FusedAdadelta is a drop-in for torch.optim.Adadelta: its arguments, its errors for bad
hyperparameters (the same as torch's, word for word), step()'s closure, and what it reports.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from optim_testing import DEVICES, OP_OPTIONS, op_lists, small_model
from torch import nn
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_error_inputs_func_adadelta

import adadelta_ext
from adadelta_ext import FusedAdadelta


def test_same_arguments_and_defaults_as_torch():
    ours = inspect.signature(FusedAdadelta).parameters
    theirs = inspect.signature(torch.optim.Adadelta).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].default == parameter.default, name
        assert ours[name].kind == parameter.kind, name


@pytest.mark.parametrize(
    "error_input",
    optim_error_inputs_func_adadelta(device="cpu", dtype=torch.float32),
    ids=lambda error_input: error_input.optimizer_error_input.desc,
)
def test_pytorch_error_inputs_raise_what_torch_raises(error_input):
    config = error_input.optimizer_error_input
    assert error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            FusedAdadelta(config.params, **config.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            FusedAdadelta(config.params, **config.kwargs)


# --------------------------------------------------------------------------------------------
# Hyperparameters: torch's errors, or where torch has none, a refusal before anything changes.
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


def two_groups(second_group_options):
    first, second = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    first.grad, second.grad = torch.ones(3), torch.ones(3)
    return (first, second), [{"params": [first]}, {"params": [second], **second_group_options}]


@pytest.mark.parametrize("stepped", [False, True], ids=["first_step", "after_a_step"])
def test_a_bad_option_in_a_later_group_refuses_the_whole_step(stepped):
    """Issue 9, defect 5: a bad option in a later param group half-applied the step. After a step
    (the state made, so the C++ path would take the step) the error still names the option."""
    (first, second), groups = two_groups({})
    optimizer = FusedAdadelta(groups)
    if stepped:
        optimizer.step()
    before = [first.detach().clone(), second.detach().clone()]
    optimizer.param_groups[1]["lr"] = "0.5"
    with pytest.raises((RuntimeError, TypeError), match="lr"):
        optimizer.step()
    assert torch.equal(first, before[0]) and torch.equal(second, before[1])
    assert len(optimizer.state) == (2 if stepped else 0)


def test_an_integer_lr_tensor_is_accepted_as_torch_accepts_it():
    """Issue 9, defect 5, the other side: what torch accepts in a later group steps alike."""
    results = []
    for optimizer_class in (torch.optim.Adadelta, FusedAdadelta):
        (first, second), groups = two_groups({"lr": torch.tensor(2)})
        optimizer_class(groups).step()
        results.append((first.detach(), second.detach()))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("option", ["lr", "eps", "weight_decay"])
def test_options_beyond_float32_range_raise_torchs_overflow_error_and_change_nothing(option):
    """Issue 9, defect 9: lr, eps or weight_decay beyond float32's range silently made params inf/NaN."""
    param = nn.Parameter(torch.randn(4))
    param.grad = torch.randn(4)
    before = param.detach().clone()
    optimizer = FusedAdadelta([param], **{option: 1e300})
    with pytest.raises(RuntimeError, match="value cannot be converted to type float without overflow"):
        optimizer.step()
    assert torch.equal(param, before) and not optimizer.state


def test_float64_params_take_options_beyond_float32_range():
    """Issue 9, defect 9, the other side: float64 params compute in float64, where 1e300 fits."""
    lists = op_lists(dtype=torch.float64)
    adadelta_ext.fused_adadelta_(*lists.values(), **dict(OP_OPTIONS, weight_decay=1e300))
    assert lists["params"][0].isfinite().any()


# --------------------------------------------------------------------------------------------
# step(closure), and what the package reports.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_closure_loss_is_returned(device):
    model = small_model(device)
    optimizer = FusedAdadelta(model.parameters())
    inputs = torch.randn(2, 2, 6, 6, device=device)

    def closure():
        optimizer.zero_grad()
        loss = model(inputs).sum()
        loss.backward()
        return loss

    assert torch.is_tensor(optimizer.step(closure))


def test_reports_its_backends():
    backends = adadelta_ext.backends()
    assert "cpu" in backends
    assert ("cuda" in backends) == (torch.version.cuda is not None), "a CUDA torch must get the CUDA kernel"
    output = subprocess.run(
        [sys.executable, "-m", "adadelta_ext"], capture_output=True, text=True, check=True
    ).stdout
    assert f"adadelta_ext {adadelta_ext.__version__}" in output
    assert f"backends: {', '.join(backends)}" in output


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adadelta, FusedAdadelta])
def test_capturable_params_on_the_cpu_are_refused_at_step_as_torch_refuses_them(optimizer_class):
    """Issue 23, defect 9: capturable=True needs params on a device that can capture CUDA graphs.
    torch raises at step (an AssertionError, its message below); FusedAdadelta raises the same, naming
    the group, and changes nothing."""
    param = nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    optimizer = optimizer_class([param], capturable=True)
    with pytest.raises(AssertionError, match="If capturable=True, params and state_steps must be on"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.ones(3))
    if optimizer_class is FusedAdadelta:
        assert not optimizer.state
