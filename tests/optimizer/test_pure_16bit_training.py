"""FusedAdadelta(kahan_sum=True) and (stochastic_round=True): float16/bfloat16 params that keep up
with a float32 run where round-to-nearest falls behind; their state, checkpoints and options.

The constructed case (issue 13): 4,096 weights near 1.0 and small biased grads (mean 2e-3, std
1e-3), 300 steps. Adadelta's first updates are about lr * sqrt(eps) = lr * 1e-3 whatever the grads'
scale. A bfloat16 weight near 1.0 has spacing 2^-8 below 1, so with lr=1 round-to-nearest drops
updates under 2^-9, about 2e-3; a float16 weight has spacing 2^-11 there, so the case takes lr=0.1
for float16, which puts its updates under half a spacing too.
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import save_and_load

from adadelta_ext import FusedAdadelta

STEPS = 300
WEIGHTS = 4096
LR = {torch.bfloat16: 1.0, torch.float16: 0.1, torch.float32: 1.0}
OPTIONS = {"kahan_sum": {"kahan_sum": True}, "stochastic_round": {"stochastic_round": True}}


def grads(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return 2e-3 + 1e-3 * torch.randn(WEIGHTS, generator=generator)


def train(
    dtype: torch.dtype,
    steps: int = STEPS,
    *,
    values_of: torch.dtype | None = None,
    optimizer=None,
    param=None,
    first: int = 0,
    **options,
):
    """The constructed case: returns (param, optimizer) after `steps` steps from step `first`.

    The initial weights and the grads are values of `values_of` (default: dtype), so that a float32
    run can start from and be fed exactly what a 16-bit run is."""
    values_of = values_of or dtype
    if param is None:
        torch.manual_seed(0)
        param = torch.nn.Parameter((1 + 0.01 * torch.rand(WEIGHTS)).to(values_of).to(dtype))
    if optimizer is None:
        optimizer = FusedAdadelta([param], lr=LR[values_of], fp32_state=True, **options)
    for step in range(first, first + steps):
        param.grad = grads(step).to(values_of).to(dtype)
        optimizer.step()
    return param, optimizer


def ulps_from(param: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|param - reference| in spacings of param's dtype at the reference."""
    nearest = reference.to(param.dtype)
    spacing = (torch.nextafter(nearest, torch.tensor(float("inf"), dtype=param.dtype)) - nearest).float()
    return (param.float() - reference).abs() / spacing


@pytest.fixture(params=[torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def float32_run(dtype) -> torch.Tensor:
    """The same run with float32 weights: the 16-bit runs' initial weights and grads."""
    return train(torch.float32, values_of=dtype)[0].detach()


def test_kahan_sum_stays_within_one_ulp_of_float32_where_round_to_nearest_does_not(dtype, float32_run):
    nearest = train(dtype)[0].detach()
    kahan = train(dtype, kahan_sum=True)[0].detach()
    assert ulps_from(nearest, float32_run).mean() > 4, "the case must defeat round-to-nearest"
    assert ulps_from(kahan, float32_run).max() <= 1


def test_stochastic_round_removes_round_to_nearests_bias(dtype, float32_run):
    """Round-to-nearest lags the float32 run by many ulps on average; stochastic rounding's error
    averages out over the weights (each weight's error is a sum of independent roundings, so the
    mean over 4,096 weights is within a fraction of an ulp)."""
    moved = (float32_run - train(torch.float32, 0, values_of=dtype)[0].detach()).mean().abs()
    nearest_error = (train(dtype)[0].detach().float() - float32_run).mean()
    stochastic_error = (train(dtype, stochastic_round=True)[0].detach().float() - float32_run).mean()
    assert nearest_error.abs() > 0.1 * moved
    assert stochastic_error.abs() < 0.01 * moved


@pytest.mark.parametrize("option", list(OPTIONS))
def test_a_run_resumed_from_a_checkpoint_continues_bit_for_bit(option):
    whole, _ = train(torch.bfloat16, 40, **OPTIONS[option])
    half, optimizer = train(torch.bfloat16, 20, **OPTIONS[option])
    saved = save_and_load(optimizer.state_dict())
    param = torch.nn.Parameter(half.detach().clone())
    resumed = FusedAdadelta([param], lr=1.0, fp32_state=True, **OPTIONS[option])
    resumed.load_state_dict(saved)
    train(torch.bfloat16, 20, optimizer=resumed, param=param, first=20)
    assert torch.equal(param, whole)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_state_dict_round_trips_through_torch_adadelta(option):
    """The extra state key survives a checkpoint loaded into torch.optim.Adadelta (which ignores
    it) and saved again; a torch checkpoint loads into FusedAdadelta with the option and gets a
    fresh buffer or seed at the next step."""
    param, optimizer = train(torch.bfloat16, 3, **OPTIONS[option])
    saved = save_and_load(optimizer.state_dict())
    key = "kahan_comp" if option == "kahan_sum" else "stochastic_round_seed"
    assert key in saved["state"][0]
    torch_optimizer = torch.optim.Adadelta([param], lr=1.0)
    torch_optimizer.load_state_dict(saved)
    param.grad = grads(3).to(torch.bfloat16)
    torch_optimizer.step()
    again = save_and_load(torch_optimizer.state_dict())
    torch.testing.assert_close(again["state"][0][key], saved["state"][0][key], rtol=0, atol=0)

    torch_param = torch.nn.Parameter(param.detach().clone())
    plain = torch.optim.Adadelta([torch_param], lr=1.0)
    torch_param.grad = grads(0).to(torch.bfloat16)
    plain.step()
    fused = FusedAdadelta([torch_param], lr=1.0, **OPTIONS[option])
    fused.load_state_dict(save_and_load(plain.state_dict()))
    assert key not in fused.state[torch_param]
    fused.step()
    assert key in fused.state[torch_param]


def test_the_default_state_dict_has_torchs_keys_only():
    _, optimizer = train(torch.bfloat16, 2)
    assert set(optimizer.state_dict()["state"][0]) == {"step", "square_avg", "acc_delta"}
    assert set(optimizer.state_dict()["param_groups"][0]) == {
        *torch.optim.Adadelta([torch.zeros(1)]).state_dict()["param_groups"][0],
        "fused",  # see test_state.py
    }


@pytest.mark.parametrize("option", list(OPTIONS))
def test_the_options_do_nothing_for_float32_params(option):
    plain, plain_optimizer = train(torch.float32, 5)
    rounded, optimizer = train(torch.float32, 5, **OPTIONS[option])
    assert torch.equal(rounded, plain)
    assert set(optimizer.state[rounded]) == set(plain_optimizer.state[plain])


def test_kahan_sum_and_stochastic_round_together_is_a_value_error():
    with pytest.raises(ValueError, match="kahan_sum and stochastic_round exclude each other"):
        FusedAdadelta(
            [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], kahan_sum=True, stochastic_round=True
        )


@pytest.mark.parametrize("option", list(OPTIONS))
def test_a_refused_step_adds_no_buffer_or_seed(option):
    """State made without the option (by a step before it was set) gains its buffer or seed at the
    next step; when that step is refused, the state is as it was."""
    good = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    bad = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    optimizer = FusedAdadelta([good, bad])
    good.grad = torch.ones(4, dtype=torch.bfloat16)
    optimizer.step()
    before = {key: value.clone() for key, value in optimizer.state[good].items()}
    for name, value in OPTIONS[option].items():
        setattr(optimizer, name, value)
    bad.grad = torch.ones(4, dtype=torch.bfloat16)
    bad.grad.data = torch.ones(3, dtype=torch.bfloat16)  # of another shape: the op refuses the step
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \[3\]"):
        optimizer.step()
    torch.testing.assert_close(dict(optimizer.state[good]), before, rtol=0, atol=0)
    assert bad not in optimizer.state


@pytest.mark.parametrize("option", list(OPTIONS))
def test_mixed_dtypes_in_one_group(option):
    """float32 and bfloat16 params in one group: the bfloat16 ones take the option, the float32
    ones step as without it."""
    torch.manual_seed(0)
    wide = torch.nn.Parameter(torch.randn(8))
    narrow = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    reference = torch.nn.Parameter(wide.detach().clone())
    optimizer = FusedAdadelta([wide, narrow], **OPTIONS[option])
    plain = FusedAdadelta([reference])
    for step in range(3):
        wide.grad = reference.grad = grads(step)[:8]
        narrow.grad = grads(step)[:8].to(torch.bfloat16)
        optimizer.step()
        plain.step()
    assert torch.equal(wide, reference)
    assert set(optimizer.state[narrow]) > set(optimizer.state[wide])


def test_a_kahan_buffer_left_from_16_bits_is_dropped_at_the_first_wider_step():
    """Decided in issue 23: after model.float(), a bfloat16 param's kahan_comp belongs to a rounding
    that no longer happens. The first float32 step drops it, so that if the param goes back to
    bfloat16 it starts from a fresh buffer (as a param that never had one) instead of re-applying
    a stale compensation."""
    param, optimizer = train(torch.bfloat16, 3, kahan_sum=True)
    assert optimizer.state[param]["kahan_comp"].abs().sum() > 0
    with torch.no_grad():
        param.data = param.data.float()  # model.float()
    train(torch.float32, 1, values_of=torch.float32, optimizer=optimizer, param=param, first=3)
    assert "kahan_comp" not in optimizer.state[param]

    twin = torch.nn.Parameter(param.detach().clone())
    twin_optimizer = FusedAdadelta([twin], lr=LR[torch.bfloat16], fp32_state=True, kahan_sum=True)
    twin_optimizer.load_state_dict(save_and_load(optimizer.state_dict()))
    for p in (param, twin):
        with torch.no_grad():
            p.data = p.data.bfloat16()  # model.bfloat16()
    train(torch.bfloat16, 2, optimizer=optimizer, param=param, first=4)
    train(torch.bfloat16, 2, optimizer=twin_optimizer, param=twin, first=4)
    assert torch.equal(param, twin)
    assert torch.equal(optimizer.state[param]["kahan_comp"], twin_optimizer.state[twin]["kahan_comp"])
