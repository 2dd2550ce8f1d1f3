"""The op's registrations as torch.library.opcheck checks them: the schema matches what the kernel
mutates, there is no autograd formula to miss (the op is a no-grad update), the fake kernel agrees
with the real one, and AOTAutograd with dynamic shapes traces it. The op mutates its list arguments
and returns nothing."""

from __future__ import annotations

import pytest
import torch
from optim_testing import DEVICES, DTYPES_AND_STATE, OP_OPTIONS, op_lists

import adadelta_ext  # noqa: F401 (registers torch.ops.adadelta_ext)

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

# Beside OP_OPTIONS; grad_scale and found_inf become tensors on the params' device.
EXTRA_OPTIONS = {
    "plain": {},
    "weight_decay_maximize": {"weight_decay": 0.1, "maximize": True},
    "grad_scale": {"grad_scale": 4.0, "found_inf": 0.0},
    "found_inf_set": {"grad_scale": 4.0, "found_inf": 1.0},
}
# Empty and 0-d entries beside a matrix and an odd length.
SHAPES = [(5, 3), (0,), (), (17,)]


@pytest.mark.parametrize("option", list(EXTRA_OPTIONS))
@pytest.mark.parametrize("overload", ["default", "tensor_lr"])
@pytest.mark.parametrize(("dtype", "fp32_state"), DTYPES_AND_STATE)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_passes(device, dtype, fp32_state, overload, option):
    op = getattr(torch.ops.adadelta_ext.fused_adadelta_, overload)
    state_dtype = torch.float32 if fp32_state else dtype
    args = tuple(op_lists(SHAPES, dtype, state_dtype=state_dtype, step=3.0, device=device).values())
    kwargs = dict(OP_OPTIONS)
    for key, value in EXTRA_OPTIONS[option].items():
        kwargs[key] = torch.tensor(value, device=device) if key in ("grad_scale", "found_inf") else value
    if overload == "tensor_lr":
        kwargs["lr"] = torch.tensor(kwargs["lr"], device=device)
    results = torch.library.opcheck(op, args, kwargs, test_utils=OPCHECK_TESTS, raise_exception=False)
    assert results == dict.fromkeys(OPCHECK_TESTS, "SUCCESS")
