"""FusedAdadelta computes what torch.optim.Adadelta and the tutorial's step compute.

Configurations are PyTorch's own (`optim_inputs_func_adadelta`, the list its
test suite runs Adadelta with). Grads are random and identical for both
optimizers. Two comparisons, as PyTorch's test_optim makes them:

- step by step: after every step compare, then copy the reference's values into
  FusedAdadelta, so that rounding cannot pile up and any single-step error shows;
- 20 steps without resync, so that an error that only shows when state
  accumulates (a wrong rho, a swapped state tensor) shows too.

float32/float64 use `assert_close`'s default tolerances (float32: rtol 1.3e-6,
atol 1e-5; float64: rtol 1e-7, atol 1e-7). float16/bfloat16: torch.optim.Adadelta
rounds to 16 bits after every one of its ~10 ops while FusedAdadelta computes in
float32 and rounds once per stored value, so the results differ by many 16-bit
ulps; there the test is that FusedAdadelta's error against a float64 run is no
larger than torch's own (LOW_PRECISION_SLACK says by how much it may tie).
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import DEVICES
from torch.testing._internal.common_optimizers import optim_inputs_func_adadelta

from adadelta_ext import FusedAdadelta
from adadelta_ext.reference import adadelta as tutorial_adadelta
from adadelta_ext.reference import init_state as tutorial_init_state

STEPS = 20

# Both optimizers store the param in 16 bits after every step, one rounding
# of up to half an ulp that dominates the param's error in both: measured
# FusedAdadelta/torch param error ratios lie between 0.998 and 1.0000, so the
# params may tie torch's error with 1% to spare. The state is where torch's
# extra roundings show (measured ratio 0.60 to 0.72; 1e-4 with fp32_state):
# its error must not exceed torch's at all.
LOW_PRECISION_SLACK = 1.01


def pytorch_configs(device: str) -> list:
    """PyTorch's Adadelta test configurations for `device`, as pytest params named by their description."""
    return [
        pytest.param(config.kwargs, id=config.desc.replace(" ", "_"))
        for config in optim_inputs_func_adadelta(device)
    ]


def config_cases():
    """(device, kwargs) for every device and every PyTorch config of that device."""
    for device in DEVICES:
        name = device if isinstance(device, str) else device.values[0]
        marks = () if isinstance(device, str) else device.marks
        for config in pytorch_configs(name):
            yield pytest.param(name, config.values[0], id=f"{name}-{config.id}", marks=marks)


CONFIG_CASES = list(config_cases())

# Shapes the kernel must cut right: empty, one element, lengths that are not a
# multiple of any vector width (AVX-512: 16 floats; CUDA: 4 floats per 16 bytes),
# one long enough for several threads, and 2-D/4-D tensors.
SHAPES = {
    "empty": [(0,)],
    "scalar": [()],
    "one": [(1,)],
    "odd_lengths": [(7,), (33,), (1023,)],
    "long": [(100_003,)],
    "matrix_and_4d": [(5, 7), (2, 3, 4, 5)],
    "mixed_many": [(n,) for n in (0, 1, 15, 16, 17, 300, 4096, 4097, 31, 2)] * 5,
}


def make_params(shapes, device, dtype, seed=0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(device, dtype))
        for shape in shapes
    ]


def clone_params(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_random_grads(param_sets, step: int) -> None:
    """Gives every set of params the same grads (rounded to each param's dtype from one float64 draw)."""
    generator = torch.Generator().manual_seed(1000 + step)
    for params in zip(*param_sets, strict=True):
        grad = torch.randn(params[0].shape, generator=generator, dtype=torch.float64)
        grad = grad.to(params[0].dtype)  # one rounding, shared by every set
        for p in params:
            p.grad = grad.to(device=p.device, dtype=p.dtype)


def optimizer_tensors(optimizer, params) -> list[torch.Tensor]:
    """params followed by every state tensor, in a fixed order."""
    tensors = [p.detach() for p in params]
    for p in params:
        state = optimizer.state[p]
        tensors += [state["square_avg"], state["acc_delta"], state["step"]]
    return tensors


def assert_same_values(actual, expected, **tolerances) -> None:
    # FusedAdadelta keeps `step` on the param's device; torch.optim keeps it on the CPU.
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, check_device=False, **tolerances)


def param_model_shapes():
    # A conv kernel (4-D), linear weights (2-D), biases (1-D): the shapes of a real model.
    return [(3, 2, 3, 3), (3,), (5, 48), (5,), (2, 5), (2,)]


@pytest.mark.parametrize("resync", [True, False], ids=["step_by_step", "without_resync"])
@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device,kwargs", CONFIG_CASES)
def test_matches_torch(device, kwargs, dtype, foreach, resync):
    params = make_params(param_model_shapes(), device, dtype)
    twin = clone_params(params)
    fused = FusedAdadelta(params, **kwargs)
    reference = torch.optim.Adadelta(twin, foreach=foreach, **kwargs)
    for step in range(STEPS):
        set_random_grads([params, twin], step)
        fused.step()
        reference.step()
        if resync:
            ours, theirs = optimizer_tensors(fused, params), optimizer_tensors(reference, twin)
            assert_same_values(ours, theirs)
            with torch.no_grad():
                for our_tensor, their_tensor in zip(ours, theirs, strict=True):
                    our_tensor.copy_(their_tensor)
    assert_same_values(optimizer_tensors(fused, params), optimizer_tensors(reference, twin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_tutorial_reference(device, dtype):
    """With lr=1, eps=1e-6 (the defaults) FusedAdadelta is the tutorial's hand-written step."""
    params = make_params(param_model_shapes(), device, dtype)
    twin = clone_params(params)
    sqrs, deltas = tutorial_init_state(twin)
    fused = FusedAdadelta(params, rho=0.9)
    for step in range(STEPS):
        set_random_grads([params, twin], step)
        fused.step()
        tutorial_adadelta(twin, sqrs, deltas, rho=0.9)
    ours = [p.detach() for p in params] + [
        fused.state[p][key] for key in ("square_avg", "acc_delta") for p in params
    ]
    tutorial = [p.detach() for p in twin] + sqrs + deltas
    assert_same_values(ours, tutorial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_shapes_match_torch(device, shapes, dtype):
    params = make_params(shapes, device, dtype)
    twin = clone_params(params)
    fused = FusedAdadelta(params, lr=0.5, weight_decay=0.1)
    reference = torch.optim.Adadelta(twin, lr=0.5, weight_decay=0.1, foreach=True)
    for step in range(STEPS):
        set_random_grads([params, twin], step)
        fused.step()
        reference.step()
    assert_same_values(optimizer_tensors(fused, params), optimizer_tensors(reference, twin))


def transposed_param(device, dtype):
    # Dense but not contiguous: its grad and zeros_like state share its strides.
    return torch.nn.Parameter(torch.randn(7, 5, dtype=dtype, device=device).t())


def sliced_param(device, dtype):
    # Not dense: its grad is contiguous, so param and grad strides differ.
    base = torch.randn(6, 10, dtype=dtype, device=device)
    return torch.nn.Parameter(base[:, ::2])


@pytest.mark.parametrize("make_param", [transposed_param, sliced_param], ids=["transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_params(device, dtype, make_param):
    torch.manual_seed(0)
    param = make_param(device, dtype)
    twin = torch.nn.Parameter(param.detach().clone())
    fused = FusedAdadelta([param], lr=0.5)
    reference = torch.optim.Adadelta([twin], lr=0.5, foreach=False)
    strides = param.stride()
    for step in range(STEPS):
        set_random_grads([[param], [twin]], step)
        fused.step()
        reference.step()
    assert param.stride() == strides, "the step must update the param in place"
    assert_same_values(optimizer_tensors(fused, [param]), optimizer_tensors(reference, [twin]))


def state_tensors(optimizer, params) -> list[torch.Tensor]:
    return [optimizer.state[p][key] for key in ("square_avg", "acc_delta") for p in params]


def squared_error(tensors, exact_tensors) -> float:
    return sum((t.double() - e).square().sum().item() for t, e in zip(tensors, exact_tensors, strict=True))


def low_precision_errors(shapes, device, dtype, kwargs, fp32_state=False) -> dict[str, tuple[float, float]]:
    """Errors against a float64 run of FusedAdadelta and torch.optim.Adadelta(foreach) in `dtype`.

    Before every step the three runs are set to the same values (the float64
    run's, rounded to `dtype`), so that what is measured is each step's own
    arithmetic, not trajectories that drifted apart earlier. Returns, per
    optimizer, the root-sum-square error over all steps of the params and of
    the state.
    """
    params = make_params(shapes, device, dtype)
    twin = clone_params(params)
    exact = [torch.nn.Parameter(p.detach().double()) for p in params]
    runs = {
        "fused": (FusedAdadelta(params, fp32_state=fp32_state, **kwargs), params),
        "torch": (torch.optim.Adadelta(twin, foreach=True, **kwargs), twin),
    }
    exact_optimizer = torch.optim.Adadelta(exact, foreach=False, **kwargs)
    squared = {name: [0.0, 0.0] for name in runs}
    for step in range(STEPS):
        set_random_grads([params, twin, exact], step)
        for optimizer, _ in runs.values():
            optimizer.step()
        exact_optimizer.step()
        exact_state = state_tensors(exact_optimizer, exact)
        for name, (optimizer, run_params) in runs.items():
            squared[name][0] += squared_error(run_params, exact)
            squared[name][1] += squared_error(state_tensors(optimizer, run_params), exact_state)
        with torch.no_grad():
            exact_tensors = exact + exact_state
            for tensor in exact_tensors:
                tensor.copy_(tensor.to(dtype))
            for optimizer, run_params in runs.values():
                for tensor, exact_tensor in zip(
                    run_params + state_tensors(optimizer, run_params), exact_tensors, strict=True
                ):
                    tensor.copy_(exact_tensor)
    return {name: (params_sq**0.5, state_sq**0.5) for name, (params_sq, state_sq) in squared.items()}


def assert_error_at_most_torch(errors: dict[str, tuple[float, float]]) -> None:
    (fused_params, fused_state), (torch_params, torch_state) = errors["fused"], errors["torch"]
    assert fused_params <= LOW_PRECISION_SLACK * torch_params, (
        f"params: FusedAdadelta error {fused_params:.4g} > torch's {torch_params:.4g}"
    )
    assert fused_state <= torch_state, (
        f"state: FusedAdadelta error {fused_state:.4g} > torch's {torch_state:.4g}"
    )


@pytest.mark.parametrize("fp32_state", [False, True], ids=["state_in_param_dtype", "fp32_state"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device,kwargs", CONFIG_CASES)
def test_low_precision_error_at_most_torch(device, kwargs, dtype, fp32_state):
    shapes = param_model_shapes() + SHAPES["odd_lengths"] + SHAPES["long"]
    assert_error_at_most_torch(low_precision_errors(shapes, device, dtype, kwargs, fp32_state))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_shapes(device, dtype):
    """Every shape case in 16 bits, within torch's own error of a float64 run."""
    shapes = [shape for case in SHAPES.values() for shape in case] + [(5, 7), (3, 2, 3, 3)]
    assert_error_at_most_torch(low_precision_errors(shapes, device, dtype, {"lr": 0.5}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_state_is_kept_in_float32(dtype):
    param = torch.nn.Parameter(torch.randn(10, dtype=dtype))
    param.grad = torch.randn_like(param)
    optimizer = FusedAdadelta([param], fp32_state=True)
    optimizer.step()
    assert optimizer.state[param]["square_avg"].dtype == torch.float32
    assert optimizer.state[param]["acc_delta"].dtype == torch.float32
