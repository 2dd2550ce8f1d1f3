"""Regressions for the eleven defects a demanding user found (issue 9), one test or more each.

Each test reproduces the user's case and checks what torch.optim.Adadelta does
(or, where torch itself goes wrong, a clear refusal that changes nothing):

 1. float64 params with float32 state (after `model.double()`) corrupted the heap;
 2. autograd did not see the step's in-place updates (no version counter bump);
 3. torch.compile failed on complex params;
 4. overlapping views as params lost updates;
 5. a bad option in a later param group half-applied the step;
 6. copy.deepcopy and pickle dropped fp32_state;
 7. grads of another dtype than their param were refused;
 8. a meta tensor among the inputs made the call a silent no-op;
 9. lr or weight_decay beyond float32's range silently made params inf/NaN;
10. the op with grad_scale and an expanded grad raised only after writing;
11. state kept its old layout after `model.to(memory_format=torch.channels_last)`.

float32/float64 comparisons with torch use assert_close's defaults (the same
formula rounded in a different order); where the two keep state in different
dtypes the tolerance is said at the comparison.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from optim_testing import DEVICES
from torch import nn

import adadelta_ext
from adadelta_ext import FusedAdadelta

OPTIONS = {"lr": 0.5, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False}


def op_lists(param_dtype=torch.float32, grad_dtype=None, state_dtype=None, numel=16, device="cpu"):
    generator = torch.Generator().manual_seed(0)

    def tensor(dtype, *, positive=False):
        values = (
            torch.rand(numel, generator=generator) if positive else torch.randn(numel, generator=generator)
        )
        return values.to(device=device, dtype=dtype)

    return [
        [tensor(param_dtype)],
        [tensor(grad_dtype or param_dtype)],
        [tensor(state_dtype or param_dtype, positive=True)],
        [tensor(state_dtype or param_dtype, positive=True)],
        [torch.zeros((), device=device)],
    ]


def snapshot(lists):
    return [[t.clone() for t in tensors] for tensors in lists]


def assert_unchanged(lists, before):
    for tensors, saved in zip(lists, before, strict=True):
        for tensor, copy_ in zip(tensors, saved, strict=True):
            assert torch.equal(
                tensor.contiguous().view(-1).view(torch.uint8), copy_.contiguous().view(-1).view(torch.uint8)
            )


def train(model, optimizer, steps, dtype=None):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        param = next(model.parameters())
        inputs = torch.randn(4, 8, generator=generator).to(param.dtype if dtype is None else dtype)
        optimizer.zero_grad()
        model(inputs).square().sum().backward()
        optimizer.step()


def twin(model_factory, **options):
    torch.manual_seed(0)
    ours_model, torch_model = model_factory(), model_factory()
    torch_model.load_state_dict(ours_model.state_dict())
    return (
        (ours_model, FusedAdadelta(ours_model.parameters(), **options)),
        (torch_model, torch.optim.Adadelta(torch_model.parameters(), **options)),
    )


# 1 ------------------------------------------------------------------------------------------


def test_model_double_after_a_step_trains_on_like_torch():
    """State follows the param to float64 (lossless from float32); torch keeps float32 state and
    promotes, so the two differ by float32 roundings of the state: rtol 1e-5."""
    (ours, ours_opt), (theirs, theirs_opt) = twin(lambda: nn.Linear(8, 8), lr=0.5)
    train(ours, ours_opt, 1)
    train(theirs, theirs_opt, 1)
    ours.double()
    theirs.double()
    train(ours, ours_opt, 3)
    train(theirs, theirs_opt, 3)
    assert ours_opt.state[ours.weight]["square_avg"].dtype == torch.float64
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=1e-5, atol=1e-7)


def test_model_float_after_float64_training_trains_on():
    (ours, ours_opt), (theirs, theirs_opt) = twin(lambda: nn.Linear(8, 8).double(), lr=0.5)
    train(ours, ours_opt, 2)
    train(theirs, theirs_opt, 2)
    ours.float()
    theirs.float()
    train(ours, ours_opt, 2)
    train(theirs, theirs_opt, 2)
    assert ours_opt.state[ours.weight]["acc_delta"].dtype == torch.float32
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16])
def test_op_refuses_float64_params_with_state_of_another_dtype_and_changes_nothing(state_dtype):
    lists = op_lists(torch.float64, state_dtype=state_dtype)
    before = snapshot(lists)
    with pytest.raises(RuntimeError, match=r"square_avgs\[0\] and acc_deltas\[0\] must both have the dtype"):
        adadelta_ext.fused_adadelta_(*lists, **OPTIONS)
    assert_unchanged(lists, before)


# 2 ------------------------------------------------------------------------------------------


def test_autograd_refuses_a_backward_through_a_param_the_step_changed():
    w = nn.Parameter(torch.randn(3))
    loss = (w * w).sum()
    loss.backward(retain_graph=True)
    FusedAdadelta([w]).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("grad_scale", [None, 2.0])
def test_the_op_bumps_the_version_of_every_tensor_it_writes(grad_scale):
    lists = op_lists()
    versions = [[t._version for t in tensors] for tensors in lists]
    options = dict(OPTIONS, grad_scale=None if grad_scale is None else torch.tensor(grad_scale))
    adadelta_ext.fused_adadelta_(*lists, **options)
    bumped = [
        [t._version - v for t, v in zip(ts, vs, strict=True)] for ts, vs in zip(lists, versions, strict=True)
    ]
    grads_bumped = 0 if grad_scale is None else 1
    assert bumped == [[1], [grads_bumped], [1], [1], [1]]


def test_a_step_on_inference_tensors_outside_inference_mode_is_refused_like_torch():
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


# 3 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("whole_training_step", [False, True], ids=["step_only", "training_step"])
def test_torch_compile_with_complex_params_matches_eager(whole_training_step):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(5, dtype=torch.complex64, generator=generator)
    target = torch.randn(5, dtype=torch.complex64, generator=generator)
    runs = {}
    for compiled in (False, True):
        param = nn.Parameter(start.clone())
        optimizer = FusedAdadelta([param], lr=0.5)

        def training_step(param=param, optimizer=optimizer):
            optimizer.zero_grad()
            (param - target).abs().square().sum().backward()
            optimizer.step()

        def step_only(param=param, optimizer=optimizer):
            param.grad = param.detach() - target
            optimizer.step()

        step = training_step if whole_training_step else step_only
        if compiled:
            if whole_training_step:
                step = torch.compile(step)
            else:
                step = torch.compile(optimizer.step)
                param.grad = param.detach() - target
        for _ in range(3):
            step()
            if compiled and not whole_training_step:
                param.grad = param.detach() - target
        runs[compiled] = param.detach()
    torch.testing.assert_close(runs[True], runs[False])


# 4 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("torch_foreach", [False, True])
def test_overlapping_views_as_params_get_every_update_like_torch(torch_foreach):
    results = []
    for optimizer_class, options in ((torch.optim.Adadelta, {"foreach": torch_foreach}), (FusedAdadelta, {})):
        base = torch.zeros(2, 4)
        a, b = base[:, 0:3], base[:, 1:4]
        a.grad, b.grad = torch.ones(2, 3), torch.ones(2, 3)
        optimizer_class([a, b], **options).step()
        results.append(base)
    torch.testing.assert_close(results[1], results[0])
    assert results[1][0, 1] == pytest.approx(2 * results[1][0, 0])


def test_op_refuses_state_that_shares_memory_with_a_param_and_changes_nothing():
    lists = op_lists(numel=8)
    lists[2][0] = lists[0][0]  # square_avg is the param itself
    before = snapshot(lists)
    with pytest.raises(RuntimeError, match=r"params\[0\] and square_avgs\[0\] share memory"):
        adadelta_ext.fused_adadelta_(*lists, **OPTIONS)
    assert_unchanged(lists, before)


# 5 ------------------------------------------------------------------------------------------


def two_groups(second_group_options):
    first, second = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    first.grad, second.grad = torch.ones(3), torch.ones(3)
    return (first, second), [{"params": [first]}, {"params": [second], **second_group_options}]


def test_a_bad_option_in_a_later_group_refuses_the_whole_step():
    (first, second), groups = two_groups({"lr": "0.5"})
    optimizer = FusedAdadelta(groups)
    with pytest.raises((RuntimeError, TypeError), match="lr"):
        optimizer.step()
    assert torch.equal(first, torch.zeros(3)) and torch.equal(second, torch.zeros(3))
    assert len(optimizer.state) == 0


def test_an_integer_lr_tensor_is_accepted_as_torch_accepts_it():
    results = []
    for optimizer_class in (torch.optim.Adadelta, FusedAdadelta):
        (first, second), groups = two_groups({"lr": torch.tensor(2)})
        optimizer_class(groups).step()
        results.append((first.detach(), second.detach()))
    torch.testing.assert_close(results[1], results[0])


# 6 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_copy", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"]
)
def test_a_copied_optimizer_keeps_fp32_state(make_copy):
    param = nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    param.grad = torch.randn(8, dtype=torch.bfloat16)
    optimizer = FusedAdadelta([param], fp32_state=True)
    optimizer.step()
    copied = make_copy(optimizer)
    assert copied.fp32_state
    copied_param = copied.param_groups[0]["params"][0]
    assert copied.state[copied_param]["square_avg"].dtype == torch.float32
    # Loading a state dict keeps float32 state whole in the copy too.
    copied.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    torch.testing.assert_close(
        copied.state[copied_param]["square_avg"], optimizer.state[param]["square_avg"], rtol=0, atol=0
    )


# 7 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_float32_grads_of_another_dtypes_param_step_like_torch(device, param_dtype):
    """torch's grad_dtype: float32 grads stored on (here) 16-bit or float64 weights. The grads are
    read as float32 in the fused pass. torch rounds intermediates to the param's dtype and we do
    not, so 16-bit params agree within one ulp of their dtype at the parameters' scale."""
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


def test_op_refuses_grads_of_a_dtype_it_has_no_kernel_for():
    lists = op_lists(torch.float32, grad_dtype=torch.float16)
    before = snapshot(lists)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype Half but params\[0\] has dtype Float"):
        adadelta_ext.fused_adadelta_(*lists, **OPTIONS)
    assert_unchanged(lists, before)


# 8 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["grad", "step", "lr"])
def test_a_meta_tensor_among_cpu_inputs_is_refused(where):
    lists = op_lists()
    options = dict(OPTIONS)
    if where == "grad":
        lists[1][0] = lists[1][0].to("meta")
        message = r"grads\[0\] is on meta but params\[0\] is on cpu"
    elif where == "step":
        lists[4][0] = lists[4][0].to("meta")
        message = r"state_steps\[0\] must be a one-element float32 or float64 tensor on cpu"
    else:
        options["lr"] = torch.tensor(0.5, device="meta")
        message = "lr is on meta but the params are on cpu"
    before = snapshot([[t for t in ts if not t.is_meta] for ts in lists])
    with pytest.raises(RuntimeError, match=message):
        adadelta_ext.fused_adadelta_(*lists, **options)
    assert_unchanged([[t for t in ts if not t.is_meta] for ts in lists], before)


# 9 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["lr", "eps", "weight_decay"])
def test_options_beyond_float32_range_raise_torchs_overflow_error_and_change_nothing(option):
    param = nn.Parameter(torch.randn(4))
    param.grad = torch.randn(4)
    before = param.detach().clone()
    optimizer = FusedAdadelta([param], **{option: 1e300})
    with pytest.raises(RuntimeError, match="value cannot be converted to type float without overflow"):
        optimizer.step()
    assert torch.equal(param, before) and not optimizer.state


def test_float64_params_take_options_beyond_float32_range():
    lists = op_lists(torch.float64)
    adadelta_ext.fused_adadelta_(*lists, **dict(OPTIONS, weight_decay=1e300))
    assert lists[0][0].isfinite().any()


# 10 -----------------------------------------------------------------------------------------


def test_grad_scale_with_an_expanded_grad_is_refused_before_anything_changes():
    lists = op_lists()
    lists[1][0] = torch.ones(1).expand(16)
    before = snapshot(lists)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is written but has elements that share memory"):
        adadelta_ext.fused_adadelta_(*lists, **dict(OPTIONS, grad_scale=torch.tensor(2.0)))
    assert_unchanged(lists, before)


def test_an_expanded_grad_is_read_without_grad_scale():
    lists = op_lists()
    expanded = torch.full((16,), 0.5)
    lists[1][0] = torch.tensor([0.5]).expand(16)
    reference = snapshot(lists)
    reference[1][0] = expanded
    adadelta_ext.fused_adadelta_(*lists, **OPTIONS)
    adadelta_ext.fused_adadelta_(*reference, **OPTIONS)
    torch.testing.assert_close(lists, reference, rtol=0, atol=0)


# 11 -----------------------------------------------------------------------------------------


def test_state_follows_its_param_into_channels_last():
    model = nn.Conv2d(4, 8, kernel_size=3)
    optimizer = FusedAdadelta(model.parameters())
    inputs = torch.randn(2, 4, 6, 6)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=memory_format)
        optimizer.zero_grad()
        model(inputs.to(memory_format=memory_format)).sum().backward()
        optimizer.step()
    state = optimizer.state[model.weight]
    assert model.weight.stride() == state["square_avg"].stride() == state["acc_delta"].stride()
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
