"""FusedAdadelta computes what torch.optim.Adadelta and the tutorial's step compute.

Configurations are PyTorch's own (`optim_inputs_func_adadelta`, the list its
test suite runs Adadelta with). Grads are random and identical for both
optimizers. Two comparisons, as PyTorch's test_optim makes them:

- step by step: after every step compare, then copy the reference's values into
  FusedAdadelta, so that rounding cannot pile up and any single-step error shows;
- 20 steps without resync, so that an error that only shows when state
  accumulates (a wrong rho, a swapped state tensor) shows too.

float32/float64 against torch.optim.Adadelta with random grads (test_matches_torch,
test_shapes_match_torch, test_non_contiguous_params), per device (TOLERANCES):

- CUDA: exact (rtol=0, atol=0). FusedAdadelta's kernel makes every rounding
  torch's CUDA kernels make, in their order (csrc/adadelta_math.h), so params
  and state are bit-identical to torch's, foreach and for-loop, with and
  without resync. One exception comes from torch itself: with capturable=True
  and a tensor lr, torch's foreach path computes `param + update * (-lr)` (two
  roundings) and its for-loop path `param.add_(update, alpha=-lr)` (one fused
  multiply-add). FusedAdadelta rounds as the foreach path (torch's default on
  CUDA), so there the for-loop comparison keeps the default tolerances
  (`torch_tolerances`).
- CPU: `assert_close`'s default tolerances (float32: rtol 1.3e-6, atol 1e-5;
  float64: rtol 1e-7, atol 1e-7). Bit-identity is impossible there: torch's
  float32 sqrt goes through MKL's vector math, which is not correctly rounded
  (about 16% of its results are 1 ulp off), where FusedAdadelta's is.

The other comparisons with torch keep assert_close's defaults on every device:
those that train a model (param groups, frozen and replaced params), whose grads
come from backward passes whose cuDNN/cuBLAS kernels need not give the same bits
twice; and those of inputs torch accepts (NaN/Inf grads, empty params, float32
grads of other dtypes), which check which elements step and that they step as
torch's do, leaving the last bit to the tests above.

float16/bfloat16: torch.optim.Adadelta rounds to 16 bits after every one of its
~10 ops while FusedAdadelta computes in float32 and rounds once per stored
value, so the results differ by many 16-bit ulps; there the test is that
FusedAdadelta's error against a float64 run is no larger than torch's own
(LOW_PRECISION_SLACK says by how much it may tie), on every device.
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import DEVICES, small_model, train_steps, twin_models
from torch import nn
from torch.testing._internal.common_optimizers import optim_inputs_func_adadelta

from adadelta_ext import FusedAdadelta
from adadelta_ext.reference import adadelta as tutorial_adadelta
from adadelta_ext.reference import init_state as tutorial_init_state

STEPS = 20

# float32/float64 FusedAdadelta against torch.optim.Adadelta, per device (see the module docstring):
# bit for bit on CUDA, assert_close's defaults on the CPU.
TOLERANCES = {"cpu": {}, "cuda": {"rtol": 0, "atol": 0}}

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


def torch_tolerances(device: str, kwargs: dict, foreach: bool) -> dict:
    """TOLERANCES[device], unless torch's path and FusedAdadelta apply a tensor lr with different roundings.

    With capturable=True and a tensor lr (on any device), FusedAdadelta, as torch's foreach path,
    rounds `update * (-lr)` before adding it to the param; torch's for-loop path fuses the two. A
    param can then differ by an ulp per step: assert_close's default tolerances.
    """
    tensor_lr = isinstance(kwargs.get("lr"), torch.Tensor)
    if tensor_lr and kwargs.get("capturable", False) and not foreach:
        return {}
    return TOLERANCES[device]


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
    tolerances = torch_tolerances(device, kwargs, foreach)
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
            assert_same_values(ours, theirs, **tolerances)
            with torch.no_grad():
                for our_tensor, their_tensor in zip(ours, theirs, strict=True):
                    our_tensor.copy_(their_tensor)
    assert_same_values(optimizer_tensors(fused, params), optimizer_tensors(reference, twin), **tolerances)


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
    assert_same_values(
        optimizer_tensors(fused, params), optimizer_tensors(reference, twin), **TOLERANCES[device]
    )


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
    assert_same_values(
        optimizer_tensors(fused, [param]), optimizer_tensors(reference, [twin]), **TOLERANCES[device]
    )


def square_avgs_and_acc_deltas(optimizer, params) -> list[torch.Tensor]:
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
        exact_state = square_avgs_and_acc_deltas(exact_optimizer, exact)
        for name, (optimizer, run_params) in runs.items():
            squared[name][0] += squared_error(run_params, exact)
            squared[name][1] += squared_error(square_avgs_and_acc_deltas(optimizer, run_params), exact_state)
        with torch.no_grad():
            exact_tensors = exact + exact_state
            for tensor in exact_tensors:
                tensor.copy_(tensor.to(dtype))
            for optimizer, run_params in runs.values():
                for tensor, exact_tensor in zip(
                    run_params + square_avgs_and_acc_deltas(optimizer, run_params), exact_tensors, strict=True
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


# --------------------------------------------------------------------------------------------
# Models, param groups and inputs as users hand them over: the same results as torch.
# --------------------------------------------------------------------------------------------


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
def test_frozen_param_is_skipped_and_gets_no_state_as_in_torch(device):
    """A param without grad (requires_grad=False) keeps its value, gets no state, and the others step."""
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
    assert all(fused.state[p]["step"].item() == 3 for p in fused_model.parameters() if p.requires_grad)


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
    values differ by many 16-bit ulps (see the module docstring), which is not what this test is about.
    """
    fused_params = make_params([(4, 3), (17,), ()], device, dtype)
    torch_params = clone_params(fused_params)
    fused = FusedAdadelta(fused_params, lr=0.5, weight_decay=0.1)
    reference = torch.optim.Adadelta(torch_params, lr=0.5, weight_decay=0.1)
    for step in range(4):
        set_random_grads([fused_params, torch_params], step)
        if step == 1:
            for p in fused_params + torch_params:
                p.grad.view(-1)[::3] = bad_value
        fused.step()
        reference.step()
        torch.testing.assert_close(fused_params, torch_params, equal_nan=True)
    assert not all(p.isfinite().all() for p in fused_params), "the bad values must have reached the params"
    assert any(p.isfinite().any() for p in fused_params), "elements with good grads must stay finite"
    torch.testing.assert_close(
        fused.state_dict()["state"], reference.state_dict()["state"], equal_nan=True, check_device=False
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_zero_element_params_step_like_in_torch(device, dtype):
    """Empty params (shapes (0,), (3, 0)) beside non-empty ones: empty state, step counted, as in torch."""
    fused_params = make_params([(0,), (5,), (3, 0), (2, 3)], device, dtype)
    torch_params = clone_params(fused_params)
    fused = FusedAdadelta(fused_params, lr=0.5)
    reference = torch.optim.Adadelta(torch_params, lr=0.5)
    for step in range(3):
        set_random_grads([fused_params, torch_params], step)
        fused.step()
        reference.step()
    torch.testing.assert_close(fused_params, torch_params)
    ours_state, theirs_state = fused.state_dict()["state"], reference.state_dict()["state"]
    torch.testing.assert_close(ours_state, theirs_state, check_device=False)
    assert ours_state[0]["square_avg"].shape == (0,)
    assert ours_state[0]["step"].item() == 3


@pytest.mark.parametrize("torch_foreach", [False, True])
def test_overlapping_views_as_params_get_every_update_like_torch(torch_foreach):
    """Issue 9, defect 4: overlapping views as params lost updates; each is stepped in turn, as in torch."""
    results = []
    for optimizer_class, options in ((torch.optim.Adadelta, {"foreach": torch_foreach}), (FusedAdadelta, {})):
        base = torch.zeros(2, 4)
        a, b = base[:, 0:3], base[:, 1:4]
        a.grad, b.grad = torch.ones(2, 3), torch.ones(2, 3)
        optimizer_class([a, b], **options).step()
        results.append(base)
    torch.testing.assert_close(results[1], results[0])
    assert results[1][0, 1] == pytest.approx(2 * results[1][0, 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_float32_grads_of_another_dtypes_param_step_like_torch(device, param_dtype):
    """Issue 9, defect 7 (such grads were refused). torch's grad_dtype: float32 grads stored on
    (here) 16-bit or float64 weights. The grads are read as float32 in the fused pass. torch rounds
    intermediates to the param's dtype and we do not, so 16-bit params agree within one ulp of their
    dtype at the parameters' scale."""
    results = []
    for optimizer_class in (torch.optim.Adadelta, FusedAdadelta):
        torch.manual_seed(0)
        param = nn.Parameter(torch.randn(64).to(device=device, dtype=param_dtype))
        param.grad_dtype = torch.float32
        optimizer = optimizer_class([param], lr=0.5)
        for _ in range(3):
            param.grad = torch.randn(64, device=device)
            optimizer.step()
        assert param.grad.dtype == torch.float32
        results.append(param.detach().float())
    tolerance = {torch.float64: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[param_dtype]
    torch.testing.assert_close(results[1], results[0], rtol=tolerance, atol=tolerance)


@pytest.mark.cuda
def test_one_group_with_params_on_cpu_and_cuda_steps_like_torch():
    devices = ["cpu", "cuda", "cpu", "cuda"]
    cpu_params = make_params([(5, 3)] * len(devices), "cpu", torch.float32)
    fused_params = [torch.nn.Parameter(p.detach().to(d)) for p, d in zip(cpu_params, devices, strict=True)]
    torch_params = clone_params(fused_params)
    fused = FusedAdadelta(fused_params, lr=0.5, weight_decay=0.1)
    reference = torch.optim.Adadelta(torch_params, lr=0.5, weight_decay=0.1)
    for step in range(3):
        set_random_grads([fused_params, torch_params], step)
        fused.step()
        reference.step()
    torch.testing.assert_close(fused_params, torch_params)
    for p in fused_params:
        assert fused.state[p]["step"].device == p.device
