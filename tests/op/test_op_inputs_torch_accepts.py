"""adadelta_ext.fused_adadelta_ called directly with what torch.optim.Adadelta steps with, and the op
once refused: it steps as torch does.

- options outside the ranges torch.optim.Adadelta's __init__ checks, which torch steps with when
  a param_groups edit or an LRScheduler sets them (a negative lr).

(tests/optimizer/test_inputs_torch_accepts.py makes the same comparisons through FusedAdadelta.)
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import DEVICES, OP_OPTIONS, TORCH_TOLERANCES, op_lists, snapshot
from torch.optim.adadelta import adadelta as torch_adadelta

import adadelta_ext

# --------------------------------------------------------------------------------------------
# Options outside torch.optim.Adadelta's __init__ ranges.
# --------------------------------------------------------------------------------------------

OUTSIDE_INIT_RANGES = {
    "negative_lr": {"lr": -0.5},
    "negative_weight_decay": {"weight_decay": -0.3},
    "rho_above_one": {"rho": 1.5},
    "negative_rho": {"rho": -0.5},
    "negative_eps": {"eps": -0.5},
}


@pytest.mark.parametrize("options", list(OUTSIDE_INIT_RANGES.values()), ids=list(OUTSIDE_INIT_RANGES))
@pytest.mark.parametrize("device", DEVICES)
def test_options_outside_torchs_init_ranges_step_as_torch_steps(device, options):
    """Each value as torch's functional adadelta (the one torch.optim.Adadelta.step calls) takes it,
    NaN where torch's is NaN (rho outside [0, 1] or a negative eps can make square_avg + eps or
    acc_delta + eps negative: 5% to 80% of these params' elements). In float64: there square_avg +
    eps, which such values can cancel to near zero, keeps enough digits for assert_close's tolerance,
    on the CPU too."""
    options = {**OP_OPTIONS, **options}
    ours = op_lists([(64,), (3, 5)], torch.float64, device=device, step=3.0)
    theirs = snapshot(ours)
    adadelta_ext.fused_adadelta_(*ours.values(), **options)
    torch_adadelta(*theirs.values(), foreach=device == "cuda", **options)
    torch.testing.assert_close(ours, theirs, equal_nan=True, **TORCH_TOLERANCES[device])
