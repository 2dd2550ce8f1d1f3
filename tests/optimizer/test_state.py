"""FusedAdadelta's per-param state (square_avg, acc_delta, step): torch's keys, dtypes and shapes;
float32 with fp32_state, copies included; and it follows its param to another dtype or layout.

float32/float64 comparisons with torch.optim.Adadelta use assert_close's defaults (the same formula
rounded in a different order); where the two keep state in different dtypes, the tolerance is said
at the comparison.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from optim_testing import DEVICES, small_model, train_steps, twin_models
from torch import nn

from adadelta_ext import FusedAdadelta


@pytest.mark.parametrize("device", DEVICES)
def test_state_has_torch_keys_dtypes_and_shapes(device):
    fused_model, torch_model = twin_models(small_model(device))
    fused = FusedAdadelta(fused_model.parameters())
    reference = torch.optim.Adadelta(torch_model.parameters())
    train_steps(fused_model, fused, 1)
    train_steps(torch_model, reference, 1)
    ours, theirs = fused.state_dict(), reference.state_dict()
    # Marked as torch's fused optimizers mark theirs: load_state_dict then keeps `step` on the device.
    assert ours["param_groups"] == [{**group, "fused": True} for group in theirs["param_groups"]]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert ours["state"][index][key].dtype == value.dtype, key
            assert ours["state"][index][key].shape == value.shape, key


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda optimizer: pickle.loads(pickle.dumps(optimizer))}


@pytest.mark.parametrize("make_copy", list(COPIES.values()), ids=list(COPIES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_state_is_kept_in_float32_by_the_optimizer_and_its_copies(dtype, make_copy):
    """fp32_state=True keeps square_avg and acc_delta of 16-bit params in float32; a copy keeps it
    (issue 9, defect 6: copy.deepcopy and pickle dropped fp32_state)."""
    param = nn.Parameter(torch.randn(8, dtype=dtype))
    param.grad = torch.randn(8, dtype=dtype)
    optimizer = FusedAdadelta([param], fp32_state=True)
    optimizer.step()
    copied = make_copy(optimizer)
    assert copied.fp32_state
    copied_param = copied.param_groups[0]["params"][0]
    for state in (optimizer.state[param], copied.state[copied_param]):
        assert state["square_avg"].dtype == state["acc_delta"].dtype == torch.float32
    # Loading a state dict keeps float32 state whole in the copy too.
    copied.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    torch.testing.assert_close(
        copied.state[copied_param]["square_avg"], optimizer.state[param]["square_avg"], rtol=0, atol=0
    )


# A model changed to another dtype after it stepped. Issue 9, defect 1: float64 params with
# float32 state (after `model.double()`) corrupted the heap.
DTYPE_CHANGES = {
    # State follows the param to float64 (lossless from float32); torch keeps float32 state and
    # promotes, so the two differ by float32 roundings of the state: rtol 1e-5.
    "double_after_float32": (torch.float32, torch.float64, {"rtol": 1e-5, "atol": 1e-7}),
    # State follows the param back to float32; torch keeps its float64 state and rounds each
    # update to the float32 param: within assert_close's float32 defaults.
    "float_after_float64": (torch.float64, torch.float32, {}),
}


@pytest.mark.parametrize("change", list(DTYPE_CHANGES.values()), ids=list(DTYPE_CHANGES))
def test_state_follows_its_param_to_another_dtype_and_training_goes_on_like_torch(change):
    first_dtype, then_dtype, tolerance = change
    fused_model, torch_model = twin_models(small_model(dtype=first_dtype))
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    for model, optimizer in ((fused_model, fused), (torch_model, reference)):
        train_steps(model, optimizer, 2)
        model.to(then_dtype)
        train_steps(model, optimizer, 2)
    for p in fused_model.parameters():
        assert fused.state[p]["square_avg"].dtype == fused.state[p]["acc_delta"].dtype == then_dtype
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict(), **tolerance)


def test_state_follows_its_param_into_channels_last():
    """Issue 9, defect 11: state kept its old layout after `model.to(memory_format=torch.channels_last)`."""
    model = small_model()
    optimizer = FusedAdadelta(model.parameters())
    train_steps(model, optimizer, 1)
    model.to(memory_format=torch.channels_last)
    train_steps(model, optimizer, 1)
    weight = model[0].weight
    state = optimizer.state[weight]
    assert weight.stride() == state["square_avg"].stride() == state["acc_delta"].stride()
    assert weight.is_contiguous(memory_format=torch.channels_last)
