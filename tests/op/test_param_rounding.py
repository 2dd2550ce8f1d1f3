"""How the op rounds a float16/bfloat16 param: stochastically with `stochastic_round_seeds`, with
Kahan summation with `compensations` (NOTE [Stochastic rounding] and NOTE [Kahan summation] in
csrc/adadelta_math.h).

The float32 result a 16-bit param is rounded from is the result the same op computes for a float32
param holding the same values: the 16-bit kernels widen exactly and compute in float32 with the
same operations. So every test compares with that float32 step, bit for bit where it can.
"""

from __future__ import annotations

import math

import pytest
import torch
from optim_testing import OP_OPTIONS, op_lists

import adadelta_ext

REDUCED = [torch.bfloat16, torch.float16]
# Enough elements that the step is split between threads (at::internal::GRAIN_SIZE is 32768).
ELEMENTS = 1 << 18
SEED = 1234


def step(lists, **options):
    adadelta_ext.fused_adadelta_(*lists.values(), **{**OP_OPTIONS, **options})
    return lists


def float32_result(lists, **options):
    """The float32 values a 16-bit step rounds: the same step on float32 copies of the tensors."""
    wide = {
        name: [t.to(torch.float32 if name != "state_steps" else t.dtype, copy=True) for t in ts]
        for name, ts in lists.items()
    }
    return step(wide, **options)["params"][0]


def neighbours(values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of `dtype` just below and just above (or equal to) each float32 value."""
    nearest = values.to(dtype).float()
    up = torch.nextafter(nearest.to(dtype), torch.tensor(math.inf, dtype=dtype)).float()
    down = torch.nextafter(nearest.to(dtype), torch.tensor(-math.inf, dtype=dtype)).float()
    low = torch.where(nearest <= values, nearest, down)
    high = torch.where(nearest >= values, nearest, up)
    return low, high


def small_update_lists(dtype, scale=1.0, elements=ELEMENTS, seed=0):
    """Params near `scale` and updates of a few spacings of dtype there: every result falls between
    two neighbours, at a spread of distances."""
    lists = op_lists([(elements,)], dtype, state_dtype=torch.float32, seed=seed)
    lists["params"][0] = (1 + lists["params"][0].float() / 64).mul(scale).to(dtype)
    return lists


@pytest.mark.parametrize("scale", [1.0, 2.0**-20], ids=["normal", "float16_subnormal"])
@pytest.mark.parametrize("dtype", REDUCED)
def test_stochastic_rounding_picks_a_neighbour_with_probability_by_distance(dtype, scale):
    """Every param becomes one of its float32 result's two neighbours, and on average the result
    itself: with p_i the distance to the lower neighbour over the spacing, each element rounds up
    with probability p_i, so sum(up_i - p_i) has mean 0 and variance sum(p_i (1 - p_i)) <= n / 4.
    The bound is 6 standard deviations (a false failure about once in 10^9 seeds)."""
    options = {"lr": 2.0**-9 * scale, "weight_decay": 0.0}
    lists = small_update_lists(dtype, scale)
    exact = float32_result(lists, **options)
    rounded = step(lists, stochastic_round_seeds=[SEED], **options)["params"][0].float()
    low, high = neighbours(exact, dtype)
    assert torch.all((rounded == low) | (rounded == high))
    between = high > low
    assert between.float().mean() > 0.9, "the case must put results between neighbours"
    p = ((exact - low) / (high - low))[between].double()
    up = (rounded == high)[between].double()
    deviation = (up - p).sum().item()
    bound = 6 * math.sqrt((p * (1 - p)).sum().item())
    assert abs(deviation) < bound
    # Not round-to-nearest in disguise: many elements round away from the nearest neighbour.
    away = (rounded != exact.to(dtype).float())[between].double().mean().item()
    expected_away = torch.minimum(p, 1 - p).mean().item()
    assert abs(away - expected_away) < 0.01


@pytest.mark.parametrize("dtype", REDUCED)
def test_stochastic_rounding_bits_depend_on_seed_and_step_only(dtype):
    """The same seed and step give the same params on 1 or 2 threads; another seed or step does
    not."""
    options = {"weight_decay": 0.0, "lr": 2.0**-9}

    def rounded(seed, step_count, threads):
        lists = small_update_lists(dtype)
        lists["state_steps"][0].fill_(step_count)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return step(lists, stochastic_round_seeds=[seed], **options)["params"][0]
        finally:
            torch.set_num_threads(previous)

    reference = rounded(SEED, 7, 2)
    assert torch.equal(rounded(SEED, 7, 1), reference)
    assert not torch.equal(rounded(SEED + 1, 7, 2), reference)
    assert not torch.equal(rounded(SEED, 8, 2), reference)


@pytest.mark.parametrize(
    ("dtype", "param", "target"),
    [
        # The largest finite value, moved past it: round-to-nearest's answer, never a carry to inf.
        (torch.float16, 65504.0, 65510.0),  # rounds to 65504
        (torch.float16, 65504.0, 65530.0),  # rounds to inf
        (torch.bfloat16, 3.3895313892515355e38, 3.39e38),  # rounds to the largest bfloat16
        (torch.bfloat16, 3.3895313892515355e38, 3.40e38),  # rounds to inf
        (torch.float16, math.inf, None),
        (torch.bfloat16, -math.inf, None),
        (torch.float16, math.nan, None),
        (torch.bfloat16, math.nan, None),
    ],
)
def test_stochastic_rounding_keeps_round_to_nearest_at_the_edges(dtype, param, target):
    """Values round-to-nearest takes to inf still go there, values past the largest finite value
    that it does not stay finite, and inf and NaN stay as they are."""
    # With rho=0, grad -1, square_avg 0 and acc_delta 1e30, every element's update is the same,
    # about -1e15: lr then moves the param to about `target`.
    lists = op_lists([(4096,)], dtype, state_dtype=torch.float32)
    lists["grads"][0].fill_(-1.0)
    lists["square_avgs"][0].zero_()
    lists["acc_deltas"][0].fill_(1e30)
    options = {"rho": 0.0, "weight_decay": 0.0, "lr": 1.0}
    if target is not None:
        lists["params"][0].zero_()
        update = float32_result(lists, **options)[0].item()  # the step of a zero param with lr=1
        options["lr"] = (target - param) / update
    lists["params"][0].fill_(param)
    exact = float32_result(lists, **options)
    rounded = step(lists, stochastic_round_seeds=[SEED], **options)["params"][0]
    torch.testing.assert_close(rounded, exact.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", REDUCED)
def test_kahan_summation_keeps_what_rounding_lost(dtype):
    """One step: the param is the float32 sum rounded to nearest, and the compensation what that
    rounding lost, rounded to the param's dtype."""
    lists = small_update_lists(dtype, elements=4099)
    compensation = (torch.randn(4099, generator=torch.Generator().manual_seed(3)) * 2.0**-12).to(dtype)
    before = lists["params"][0].float()
    # Without weight decay the update does not depend on the param: a zero param's step is the
    # update times -lr, rounded once, which is what Kahan summation adds.
    options = {"weight_decay": 0.0}
    zero = {**lists, "params": [torch.zeros_like(before)]}
    update = float32_result(zero, **options)
    compensations = [compensation.clone()]
    rounded = step(lists, compensations=compensations, **options)["params"][0]
    compensated = compensation.float() + update
    expected = (before + compensated).to(dtype)
    assert torch.equal(rounded, expected)
    lost = compensated - (expected.float() - before)
    assert torch.equal(compensations[0], lost.to(dtype))


@pytest.mark.parametrize("option", ["compensations", "stochastic_round_seeds"])
def test_a_skipped_step_changes_neither_param_nor_compensation(option):
    """GradScaler's found_inf skips the whole step, the compensation buffer included."""
    lists = small_update_lists(torch.bfloat16, elements=1000)
    extra = [torch.full((1000,), 2.0**-10, dtype=torch.bfloat16)] if option == "compensations" else [SEED]
    before = {name: [t.clone() for t in ts] for name, ts in lists.items()}
    kept = [e.clone() if torch.is_tensor(e) else e for e in extra]
    step(lists, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0), **{option: extra})
    torch.testing.assert_close(lists, before, rtol=0, atol=0)
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(extra, kept, strict=True))
