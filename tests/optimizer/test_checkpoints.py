"""FusedAdadelta checkpoints: save, load, carry on as if never interrupted.

Every checkpoint goes through `save_and_load` (torch.save then torch.load):
Optimizer.load_state_dict does not copy tensors, so without it the "loaded"
optimizer would share its state with the saved one and a round trip could not fail.

Tolerances: a FusedAdadelta run compared with another FusedAdadelta run is exact
(rtol=0, atol=0): the same kernel on the same values gives the same bits. Compared
with torch.optim.Adadelta, float32/float64 use assert_close's defaults (float32:
rtol 1.3e-6, atol 1e-5; float64: rtol 1e-7, atol 1e-7), as in test_parity_with_torch.py.
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import (
    DEVICES,
    FLOAT_DTYPES,
    assert_unchanged,
    optimizer_snapshot,
    optimizer_state,
    save_and_load,
    small_model,
    train_steps,
    twin_models,
)

from adadelta_ext import FusedAdadelta

OPTIONS = {
    "defaults": {},
    "lr_rho_weight_decay_maximize": {"lr": 0.5, "rho": 0.8, "weight_decay": 0.1, "maximize": True},
    "tensor_lr": {"lr": torch.tensor(0.5)},
    "fp32_state": {"fp32_state": True},
}


def fresh_kwargs(kwargs: dict) -> dict:
    """The kwargs with a tensor lr of its own: an optimizer may change its lr in place (schedulers do)."""
    return {key: value.clone() if torch.is_tensor(value) else value for key, value in kwargs.items()}


def scrambled(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every param overwritten, so that a test can only pass if loading restores them."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.25)
    return model


@pytest.mark.parametrize("kwargs", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_continues_exactly_as_uninterrupted_training(device, dtype, kwargs):
    """Train 3 steps, save model and optimizer, load both into new objects, train 3 more:
    bit for bit what 6 uninterrupted steps give, and the loaded state is the saved state."""
    interrupted_model = small_model(device, dtype)
    interrupted = FusedAdadelta(interrupted_model.parameters(), **fresh_kwargs(kwargs))
    train_steps(interrupted_model, interrupted, 3)
    checkpoint = save_and_load(
        {"model": interrupted_model.state_dict(), "optimizer": interrupted.state_dict()}
    )

    resumed_model = scrambled(small_model(device, dtype))
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = FusedAdadelta(resumed_model.parameters(), **fresh_kwargs(kwargs))
    resumed.load_state_dict(checkpoint["optimizer"])
    torch.testing.assert_close(
        resumed.state_dict(), checkpoint["optimizer"], rtol=0, atol=0, msg="loading changed the state"
    )
    train_steps(resumed_model, resumed, 3)

    uninterrupted_model = small_model(device, dtype)
    uninterrupted = FusedAdadelta(uninterrupted_model.parameters(), **fresh_kwargs(kwargs))
    train_steps(uninterrupted_model, uninterrupted, 6)

    torch.testing.assert_close(resumed_model.state_dict(), uninterrupted_model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(resumed.state_dict(), uninterrupted.state_dict(), rtol=0, atol=0)


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
def test_loaded_step_counters_live_on_the_param_device_in_torchs_dtype(device):
    """torch.optim.Adadelta leaves a loaded `step` where the checkpoint had it; FusedAdadelta puts it on
    the param's device (the kernel increments it there), in the dtype torch gives it."""
    model = small_model(device)
    optimizer = FusedAdadelta(model.parameters())
    train_steps(model, optimizer, 2)
    checkpoint = optimizer.state_dict()
    loaded = FusedAdadelta(model.parameters())
    loaded.load_state_dict(save_and_load(checkpoint))
    reference = torch.optim.Adadelta(model.parameters())
    reference.load_state_dict(save_and_load(checkpoint))
    for p in model.parameters():
        step = loaded.state[p]["step"]
        assert step.device == p.device
        assert step.dtype == reference.state[p]["step"].dtype
        assert step.item() == 2


def build_with_late_group(optimizer_class, model, kwargs=None):
    """An optimizer over all but the last layer; the last layer joins later, with its own hyperparameters."""
    *early, last = model
    early_params = [p for layer in early for p in layer.parameters()]
    optimizer = optimizer_class(early_params, lr=0.7, **(kwargs or {}))
    return optimizer, {"params": list(last.parameters()), "lr": 0.3, "rho": 0.5, "weight_decay": 0.1}


@pytest.mark.parametrize("device", DEVICES)
def test_group_added_later_survives_a_checkpoint_like_torchs(device):
    """3 steps, add_param_group, 3 steps, save, load into a new optimizer built the same way, 3 steps:
    FusedAdadelta ends where torch.optim.Adadelta, doing the same, ends (float32 default tolerance)."""
    results = {}
    for optimizer_class in (FusedAdadelta, torch.optim.Adadelta):
        model = small_model(device)
        optimizer, late_group = build_with_late_group(optimizer_class, model)
        train_steps(model, optimizer, 3)
        optimizer.add_param_group(late_group)
        train_steps(model, optimizer, 3)
        checkpoint = save_and_load({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

        resumed_model = scrambled(small_model(device))
        resumed_model.load_state_dict(checkpoint["model"])
        resumed, late_group = build_with_late_group(optimizer_class, resumed_model)
        resumed.add_param_group(late_group)
        resumed.load_state_dict(checkpoint["optimizer"])
        train_steps(resumed_model, resumed, 3)
        results[optimizer_class] = (resumed_model, resumed)

    (fused_model, fused), (torch_model, reference) = results[FusedAdadelta], results[torch.optim.Adadelta]
    assert fused.state_dict()["param_groups"] == [
        {**group, "fused": True} for group in reference.state_dict()["param_groups"]
    ]
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict())
    torch.testing.assert_close(optimizer_state(fused), optimizer_state(reference), check_device=False)
    last_weight = fused_model[-1].weight
    assert fused.state[last_weight]["step"].item() == 6, "the late group stepped 3 times before and 3 after"


DTYPE_CHANGES = [
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16),
]


def dtype_change_id(change):
    saved, loaded = change
    return f"{str(saved).removeprefix('torch.')}_into_{str(loaded).removeprefix('torch.')}"


@pytest.mark.parametrize("change", DTYPE_CHANGES, ids=dtype_change_id)
@pytest.mark.parametrize("device", DEVICES)
def test_state_loaded_into_a_model_of_another_dtype_is_cast_as_torch_casts(device, change):
    """square_avg and acc_delta become the param's dtype (exactly `saved.to(dtype)`); step keeps its dtype."""
    saved_dtype, loaded_dtype = change
    saved_model = small_model(device, saved_dtype)
    saved = FusedAdadelta(saved_model.parameters())
    train_steps(saved_model, saved, 3)
    checkpoint = saved.state_dict()

    loaded_model = small_model(device, loaded_dtype)
    loaded = FusedAdadelta(loaded_model.parameters())
    loaded.load_state_dict(save_and_load(checkpoint))
    reference = torch.optim.Adadelta(loaded_model.parameters())
    reference.load_state_dict(save_and_load(checkpoint))

    for index, p in enumerate(loaded_model.parameters()):
        for key in ("square_avg", "acc_delta"):
            assert loaded.state[p][key].dtype == loaded_dtype
            torch.testing.assert_close(
                loaded.state[p][key], checkpoint["state"][index][key].to(loaded_dtype), rtol=0, atol=0
            )
        assert loaded.state[p]["step"].dtype == reference.state[p]["step"].dtype
    torch.testing.assert_close(optimizer_state(loaded), optimizer_state(reference), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change", [(torch.float32, torch.float64), (torch.float64, torch.float32)], ids=dtype_change_id
)
@pytest.mark.parametrize("device", DEVICES)
def test_training_continues_in_the_new_dtype_like_torch(device, change):
    saved_dtype, loaded_dtype = change
    saved_model = small_model(device, saved_dtype)
    saved = FusedAdadelta(saved_model.parameters(), lr=0.5)
    train_steps(saved_model, saved, 3)
    checkpoint = save_and_load({"model": saved_model.state_dict(), "optimizer": saved.state_dict()})

    results = []
    for optimizer_class in (FusedAdadelta, torch.optim.Adadelta):
        model = small_model(device, loaded_dtype)
        model.load_state_dict(checkpoint["model"])
        optimizer = optimizer_class(model.parameters(), lr=0.5)
        optimizer.load_state_dict(save_and_load(checkpoint["optimizer"]))
        train_steps(model, optimizer, 3)
        results.append((model, optimizer))

    (fused_model, fused), (torch_model, reference) = results
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict())
    torch.testing.assert_close(optimizer_state(fused), optimizer_state(reference), check_device=False)


FP32_STATE_CHECKPOINTS = [
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]


@pytest.mark.parametrize("change", FP32_STATE_CHECKPOINTS, ids=dtype_change_id)
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_state_keeps_a_float32_checkpoint_state_exactly(device, change):
    """A 16-bit model with fp32_state=True loads float32 state as it was saved, not rounded to 16 bits
    (load_state_dict casts state to the param's dtype; fp32_state keeps float32 state whole).

    The float32 state comes from a float32 run, or from a 16-bit run with fp32_state=True itself.
    Loaded into an optimizer without fp32_state, it takes the param's dtype, as in torch.optim.Adadelta.
    """
    saved_dtype, loaded_dtype = change
    saved_model = small_model(device, saved_dtype)
    saved = FusedAdadelta(saved_model.parameters(), fp32_state=True)
    train_steps(saved_model, saved, 3)
    checkpoint = saved.state_dict()

    loaded_model = small_model(device, loaded_dtype)
    loaded = FusedAdadelta(loaded_model.parameters(), fp32_state=True)
    loaded.load_state_dict(save_and_load(checkpoint))
    plain = FusedAdadelta(loaded_model.parameters())
    plain.load_state_dict(save_and_load(checkpoint))

    for index, p in enumerate(loaded_model.parameters()):
        for key in ("square_avg", "acc_delta"):
            assert loaded.state[p][key].dtype == torch.float32
            torch.testing.assert_close(loaded.state[p][key], checkpoint["state"][index][key], rtol=0, atol=0)
            assert plain.state[p][key].dtype == loaded_dtype


@pytest.mark.cuda
@pytest.mark.parametrize("direction", ["cpu_into_cuda", "cuda_into_cpu"])
def test_state_loaded_onto_another_device_moves_there_and_training_continues_like_torch(direction):
    saved_device, loaded_device = direction.split("_into_")
    saved_model = small_model(saved_device)
    saved = FusedAdadelta(saved_model.parameters(), lr=0.5)
    train_steps(saved_model, saved, 3)
    checkpoint = save_and_load({"model": saved_model.state_dict(), "optimizer": saved.state_dict()})

    results = []
    for optimizer_class in (FusedAdadelta, torch.optim.Adadelta):
        model = small_model(loaded_device)
        model.load_state_dict(checkpoint["model"])
        optimizer = optimizer_class(model.parameters(), lr=0.5)
        optimizer.load_state_dict(save_and_load(checkpoint["optimizer"]))
        if optimizer_class is FusedAdadelta:
            for p in model.parameters():
                assert all(value.device == p.device for value in optimizer.state[p].values())
        train_steps(model, optimizer, 3)
        results.append((model, optimizer))

    (fused_model, fused), (torch_model, reference) = results
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict())
    torch.testing.assert_close(optimizer_state(fused), optimizer_state(reference), check_device=False)


def two_layer_model(device, hidden, outputs):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Linear(hidden, outputs)).to(device)


MISMATCHES = {
    # (hidden, outputs) of the saved model; the loaded one has hidden=4, outputs=2.
    "first_param": ((5, 2), r"square_avgs\[0\] has shape \[5, 3\] but params\[0\] has shape \[4, 3\]"),
    "last_params": ((4, 3), r"square_avgs\[2\] has shape \[3, 4\] but params\[2\] has shape \[2, 4\]"),
}


@pytest.mark.parametrize("mismatch", list(MISMATCHES), ids=list(MISMATCHES))
@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_of_other_shapes_is_refused_at_step_and_changes_nothing(device, mismatch):
    """Optimizer.load_state_dict checks only the number of params; step() names the first mismatch
    and leaves every param (also those before it) and the loaded state as they were."""
    (hidden, outputs), message = MISMATCHES[mismatch]
    saved_model = two_layer_model(device, hidden, outputs)
    saved = FusedAdadelta(saved_model.parameters())
    saved_model(torch.randn(2, 3, device=device)).sum().backward()
    saved.step()

    model = two_layer_model(device, 4, 2)
    optimizer = FusedAdadelta(model.parameters())
    optimizer.load_state_dict(save_and_load(saved.state_dict()))
    model(torch.randn(2, 3, device=device)).sum().backward()
    before = optimizer_snapshot(optimizer)

    with pytest.raises(RuntimeError, match=message):
        optimizer.step()

    assert_unchanged(optimizer_snapshot(optimizer), before)


@pytest.mark.cuda
def test_a_cpu_checkpoint_loads_onto_cuda_as_torchs_test_state_dict_with_cuda_params_expects():
    """Issue 23, defect 13: torch's TestOptimRenewed.test_state_dict_with_cuda_params, for
    FusedAdadelta. Its groups are marked fused, as torch's fused optimizers' are, so torch's own rule
    moves `step` to CUDA on load (where the kernel increments it); loading leaves the state dict
    as it was; and the two optimizers then step alike."""
    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = FusedAdadelta(params)
    for _ in range(3):
        optimizer.step()
    with torch.no_grad():
        params_cuda = [p.to(device="cuda") for p in params]
        for p, cpu_param in zip(params_cuda, params, strict=True):
            p.grad = cpu_param.grad.to(device="cuda")
    optimizer_cuda = FusedAdadelta(params_cuda)
    state_dict_cpu = save_and_load(optimizer.state_dict())
    state_dict_cuda = save_and_load(optimizer.state_dict())
    optimizer_cuda.load_state_dict(state_dict_cuda)
    torch.testing.assert_close(state_dict_cuda, state_dict_cpu, rtol=0, atol=0)
    assert state_dict_cpu["param_groups"][0]["fused"]
    for state in optimizer_cuda.state_dict()["state"].values():
        assert state["step"].device.type == "cuda"
    for _ in range(5):
        optimizer.step()
        optimizer_cuda.step()
        torch.testing.assert_close(params_cuda, params, check_device=False)
        torch.testing.assert_close(optimizer_cuda.state_dict(), optimizer.state_dict(), check_device=False)


def test_load_state_dict_hooks_see_and_keep_what_they_do():
    """Issue 23, defect 6: with fp32_state, the float32 state is taken from the state dict as the
    user's pre-hooks left it, and the user's post-hooks see the loaded state and keep what they do."""
    model = small_model("cpu", torch.bfloat16)
    optimizer = FusedAdadelta(model.parameters(), fp32_state=True)
    train_steps(model, optimizer, 2)
    checkpoint = save_and_load(optimizer.state_dict())
    loaded = FusedAdadelta(model.parameters(), fp32_state=True)

    def pre_hook(optimizer, state_dict):
        for state in state_dict["state"].values():
            state["square_avg"] = torch.full_like(state["square_avg"], 0.25)

    def post_hook(optimizer):
        for state in optimizer.state.values():
            assert state["square_avg"].dtype == torch.float32, "the post-hook runs after the conversion"
            state["acc_delta"].fill_(0.5)

    loaded.register_load_state_dict_pre_hook(pre_hook)
    loaded.register_load_state_dict_post_hook(post_hook)
    loaded.load_state_dict(checkpoint)
    for p in model.parameters():
        assert torch.equal(loaded.state[p]["square_avg"], torch.full(p.shape, 0.25))
        assert torch.equal(loaded.state[p]["acc_delta"], torch.full(p.shape, 0.5))


# Each spoils the saved state of param 2.
MALFORMED = {
    "no_square_avg": (lambda states: states[2].pop("square_avg"), KeyError, "has no 'square_avg'"),
    "acc_delta_none": (
        lambda states: states[2].update(acc_delta=None),
        TypeError,
        "has 'acc_delta' of type NoneType, not a tensor",
    ),
    # torch.optim.Adadelta's own load fails on these two, in its __setstate__, after replacing the state.
    "state_none": (lambda states: states.update({2: None}), TypeError, "is a NoneType, not a dict"),
    "step_none": (lambda states: states[2].update(step=None), TypeError, "has 'step' of type NoneType"),
}
TORCH_FAILS_TO_LOAD = ("state_none", "step_none")


@pytest.mark.parametrize("malformation", MALFORMED.keys())
def test_a_malformed_checkpoint_loads_as_in_torch_and_the_next_step_names_it(malformation):
    """Issue 23, defect 14: a malformed entry made load_state_dict fail after it had replaced the
    state. As torch, the load succeeds; the next step names the param and the problem, and changes
    nothing: no param, and the loaded state entries are the same objects, with the same values."""
    spoil, error, message = MALFORMED[malformation]
    model = small_model()
    optimizer = FusedAdadelta(model.parameters())
    train_steps(model, optimizer, 1)
    checkpoint = save_and_load(optimizer.state_dict())
    spoil(checkpoint["state"])
    if malformation not in TORCH_FAILS_TO_LOAD:
        torch.optim.Adadelta(model.parameters()).load_state_dict(save_and_load(checkpoint))
    optimizer.load_state_dict(checkpoint)
    params = [p.detach().clone() for p in model.parameters()]
    loaded = dict(optimizer.state)  # each param's state, as an object
    entries = {p: dict(state) for p, state in loaded.items() if isinstance(state, dict)}
    values = [t.clone() for state in entries.values() for t in state.values() if torch.is_tensor(t)]
    with pytest.raises(error, match=rf"param_groups\[0\]\['params'\]\[2\] {message}"):
        optimizer.step()
    assert all(torch.equal(p, before) for p, before in zip(model.parameters(), params, strict=True))
    assert all(optimizer.state[p] is state for p, state in loaded.items())
    assert all(
        optimizer.state[p][key] is value for p, state in entries.items() for key, value in state.items()
    )
    after = [t for state in entries.values() for t in state.values() if torch.is_tensor(t)]
    assert all(torch.equal(t, before) for t, before in zip(after, values, strict=True))


def test_an_integer_step_in_a_checkpoint_counts_on_in_floating_point():
    """torch's for-loop path steps with an int64 `step` (older checkpoints, or edited ones);
    FusedAdadelta loads it as a floating-point counter, the kernel's, and trains on as torch does."""
    results = []
    for optimizer_class in (FusedAdadelta, torch.optim.Adadelta):
        model = small_model()
        optimizer = optimizer_class(model.parameters(), lr=0.5)
        train_steps(model, optimizer, 2)
        checkpoint = save_and_load(optimizer.state_dict())
        for state in checkpoint["state"].values():
            state["step"] = state["step"].to(torch.int64)
        optimizer.load_state_dict(checkpoint)
        train_steps(model, optimizer, 2)
        results.append((model, optimizer))
    (fused_model, fused), (torch_model, reference) = results
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict())
    for p in fused_model.parameters():
        assert fused.state[p]["step"].dtype == torch.float32 and fused.state[p]["step"].item() == 4
