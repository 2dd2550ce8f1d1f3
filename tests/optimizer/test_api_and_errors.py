"""FusedAdadelta is a drop-in for torch.optim.Adadelta: arguments, errors, state, checkpoints."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
from optim_testing import DEVICES, save_and_load, small_model, train_steps, twin_models
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


def test_differentiable_is_refused():
    with pytest.raises(ValueError, match="FusedAdadelta does not support differentiable=True"):
        FusedAdadelta([torch.nn.Parameter(torch.zeros(2))], differentiable=True)


@pytest.mark.parametrize("device", DEVICES)
def test_state_has_torch_keys_dtypes_and_shapes(device):
    fused_model, torch_model = twin_models(small_model(device))
    fused = FusedAdadelta(fused_model.parameters())
    reference = torch.optim.Adadelta(torch_model.parameters())
    train_steps(fused_model, fused, 1)
    train_steps(torch_model, reference, 1)
    ours, theirs = fused.state_dict(), reference.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert ours["state"][index][key].dtype == value.dtype, key
            assert ours["state"][index][key].shape == value.shape, key


@pytest.mark.parametrize("direction", ["fused_to_torch", "torch_to_fused"])
@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_moves_between_optimizers(device, direction):
    """5 steps with one optimizer, save, load into the other, 5 more steps: as if one optimizer did all 10."""
    kwargs = {"lr": 0.5, "rho": 0.95, "weight_decay": 0.01}
    first_class, second_class = (
        (FusedAdadelta, torch.optim.Adadelta)
        if direction == "fused_to_torch"
        else (torch.optim.Adadelta, FusedAdadelta)
    )
    switched_model, straight_model = twin_models(small_model(device))
    first = first_class(switched_model.parameters(), **kwargs)
    train_steps(switched_model, first, 5)
    checkpoint = save_and_load(first.state_dict())
    second = second_class(switched_model.parameters(), **kwargs)
    second.load_state_dict(checkpoint)
    train_steps(switched_model, second, 5)

    straight = torch.optim.Adadelta(straight_model.parameters(), **kwargs)
    train_steps(straight_model, straight, 10)

    torch.testing.assert_close(switched_model.state_dict(), straight_model.state_dict())
    for ours, theirs in zip(
        second.state_dict()["state"].values(), straight.state_dict()["state"].values(), strict=True
    ):
        for key in ("square_avg", "acc_delta", "step"):
            torch.testing.assert_close(ours[key], theirs[key], check_device=False)


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_with_their_own_hyperparameters(device):
    fused_model, torch_model = twin_models(small_model(device))

    def groups(model):
        first, *rest = model.parameters()
        return [
            {"params": [first], "lr": 0.1, "rho": 0.5, "maximize": True},
            {"params": rest, "weight_decay": 0.2},
        ]

    fused = FusedAdadelta(groups(fused_model), eps=1e-4)
    reference = torch.optim.Adadelta(groups(torch_model), eps=1e-4)
    train_steps(fused_model, fused, 10)
    train_steps(torch_model, reference, 10)
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict())


@pytest.mark.parametrize("device", DEVICES)
def test_params_without_grad_are_skipped(device):
    model = small_model(device)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    optimizer = FusedAdadelta(model.parameters())
    train_steps(model, optimizer, 3)
    assert torch.equal(frozen, before)
    assert frozen not in optimizer.state
    assert all(optimizer.state[p]["step"].item() == 3 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_refused_step_changes_nothing(device):
    """A sparse grad on the last param: the step raises before any param or state changes."""
    params = [torch.nn.Parameter(torch.randn(4, 3, device=device)) for _ in range(3)]
    optimizer = FusedAdadelta(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    snapshot = save_and_load(optimizer.state_dict())
    values = [p.detach().clone() for p in params]
    late_param = torch.nn.Parameter(torch.randn(5, device=device))
    optimizer.add_param_group({"params": [late_param]})
    late_param.grad = torch.randn(5, device=device).to_sparse()

    with pytest.raises(RuntimeError, match="FusedAdadelta does not support sparse gradients"):
        optimizer.step()

    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    assert late_param not in optimizer.state
    torch.testing.assert_close(optimizer.state_dict()["state"], snapshot["state"], check_device=False)


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


# Runs FusedAdadelta on data drawn with numpy (torch's own random kernels differ
# between instruction sets) and saves the results to the file named in argv[1].
ISA_CHILD = """
import sys
import numpy as np
import torch
import adadelta_ext

rng = np.random.default_rng(0)
results = {"isa": adadelta_ext.cpu_kernel_isa()}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    sizes = (1, 7, 33, 1000, 70001)
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n)).to(dtype)) for n in sizes]
    optimizer = adadelta_ext.FusedAdadelta(params, lr=0.5, weight_decay=0.1)
    for _ in range(5):
        for p in params:
            p.grad = torch.from_numpy(rng.standard_normal(p.shape)).to(dtype)
        optimizer.step()
    state = [optimizer.state[p][key] for p in params for key in ("square_avg", "acc_delta")]
    results[str(dtype)] = [p.detach() for p in params] + state
torch.save(results, sys.argv[1])
"""


def isas_this_cpu_runs() -> list[str]:
    """The builds up to the one torch runs its own kernels with (ATen trusts ATEN_CPU_CAPABILITY:
    a build past what the CPU has would die of an illegal instruction)."""
    built = adadelta_ext.cpu_kernel_isas()
    best = torch.backends.cpu.get_cpu_capability()
    return built[: built.index(best) + 1] if best in built else ["DEFAULT"]


def test_every_cpu_kernel_build_gives_identical_results(tmp_path):
    """Every instruction-set build of the CPU kernel (forced as torch forces its own) rounds alike."""
    isas = isas_this_cpu_runs()
    if len(isas) == 1:
        pytest.skip(f"this CPU runs only the {isas[0]} kernel")
    results = {}
    for isa in isas:
        path = tmp_path / f"{isa}.pt"
        environment = {**os.environ, "ATEN_CPU_CAPABILITY": isa.lower()}
        subprocess.run([sys.executable, "-c", ISA_CHILD, str(path)], env=environment, check=True)
        results[isa] = torch.load(path)
        assert results[isa].pop("isa") == isa, "the kernel for the forced instruction set must run"
    for isa in isas[1:]:
        for key, tensors in results["DEFAULT"].items():
            for default_tensor, isa_tensor in zip(tensors, results[isa][key], strict=True):
                assert torch.equal(default_tensor, isa_tensor), f"{isa} differs from DEFAULT for {key}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_state_survives_a_checkpoint(dtype):
    """load_state_dict casts state to the param's dtype; fp32_state keeps its float32 values whole."""
    param = torch.nn.Parameter(torch.randn(1000, dtype=dtype))
    param.grad = torch.randn_like(param)
    saved = FusedAdadelta([param], fp32_state=True)
    for _ in range(3):
        saved.step()
    checkpoint = save_and_load(saved.state_dict())
    loaded = FusedAdadelta([param], fp32_state=True)
    loaded.load_state_dict(checkpoint)
    for key in ("square_avg", "acc_delta"):
        assert loaded.state[param][key].dtype == torch.float32
        assert torch.equal(loaded.state[param][key], saved.state[param][key])
    # Into an optimizer that keeps state in the param's dtype, as torch.optim.Adadelta does.
    plain = FusedAdadelta([param])
    plain.load_state_dict(save_and_load(saved.state_dict()))
    assert plain.state[param]["square_avg"].dtype == dtype
