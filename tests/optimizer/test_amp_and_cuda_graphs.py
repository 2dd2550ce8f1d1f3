"""GradScaler, CUDA graphs and very large tensors, through FusedAdadelta.

With `_step_supports_amp_scaling`, GradScaler hands FusedAdadelta its scale and
found_inf; the kernel unscales the grads in its own pass and skips the whole
step (params, state, step counts) when found_inf is set, without a host sync.

Against torch.optim.Adadelta under an identical GradScaler (TOLERANCES): on CUDA
bit for bit, params, state, grads and scale after every step, as the kernel
unscales as GradScaler.unscale_ does (times float(1 / double(scale)), rounded to
the grad's dtype) and then rounds as torch's CUDA kernels do (see
tests/optimizer/test_parity_with_torch.py); on the CPU within assert_close's
defaults, as torch's float32 sqrt there is not correctly rounded. The models'
backward runs with deterministic cuDNN kernels (`deterministic_cudnn`), so that
equal params give equal grads.
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import (
    DEVICES,
    assert_unchanged,
    model_input,
    optimizer_snapshot,
    optimizer_state,
    small_model,
    twin_models,
)

from adadelta_ext import FusedAdadelta

# FusedAdadelta against torch.optim.Adadelta, per device (see the module docstring).
TOLERANCES = {"cpu": {}, "cuda": {"rtol": 0, "atol": 0}}

# A scale that grows and backs off: doubled after every 2 steps without inf (growth_interval=2),
# halved by the inf at POISON_STEP, whose step is skipped. EXPECTED_SCALES[i]: after step i's update().
SCALER_OPTIONS = {"init_scale": 2.0**10, "growth_interval": 2}
POISON_STEP = 3
EXPECTED_SCALES = [2.0**10, 2.0**11, 2.0**11, 2.0**10, 2.0**10, 2.0**11, 2.0**11, 2.0**12]


@pytest.fixture
def deterministic_cudnn():
    """cuDNN convolutions that give the same bits every run (some backward algorithms add with
    atomics, in any order), so that two models with equal params get equal grads. Through the
    flags() context manager: torch.testing's internals, once imported, forbid setting the flags."""
    with torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True
    ):
        yield


def scaled_training(model, optimizer, scaler, steps, separate_unscale, poison_step=None):
    inputs = model_input(model)
    for step in range(steps):
        optimizer.zero_grad()
        scaler.scale(model(inputs).square().mean()).backward()
        if step == poison_step:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        if separate_unscale:
            scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()


@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("separate_unscale", [False, True], ids=["fused_unscale", "scaler_unscale"])
@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_matches_torch(device, separate_unscale, dtype):
    """Each under its own GradScaler, step by step: the same params, state, grads and scale
    (TOLERANCES), the inf step skipped by both. (GradScaler unscales float32 and float64 grads;
    float16 ones it refuses.)"""
    tolerances = TOLERANCES[device]
    fused_model, torch_model = twin_models(small_model(device, dtype))
    fused = FusedAdadelta(fused_model.parameters(), lr=0.5)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=0.5)
    fused_scaler = torch.amp.GradScaler(device, **SCALER_OPTIONS)
    torch_scaler = torch.amp.GradScaler(device, **SCALER_OPTIONS)
    for step, expected_scale in enumerate(EXPECTED_SCALES):
        poison_step = 0 if step == POISON_STEP else None
        scaled_training(fused_model, fused, fused_scaler, 1, separate_unscale, poison_step)
        scaled_training(torch_model, reference, torch_scaler, 1, separate_unscale, poison_step)

        assert fused_scaler.get_scale() == torch_scaler.get_scale() == expected_scale, f"step {step}"
        torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict(), **tolerances)
        torch.testing.assert_close(
            optimizer_state(fused), optimizer_state(reference), check_device=False, **tolerances
        )
        if step == POISON_STEP and not separate_unscale:
            # Skipped in-kernel, FusedAdadelta leaves the grads scaled; torch's were unscaled by
            # the scaler before it skipped the step. The next zero_grad() drops both.
            continue
        # The unscaled grads are left in .grad, as scaler.unscale_ leaves them.
        for ours, theirs in zip(fused_model.parameters(), torch_model.parameters(), strict=True):
            torch.testing.assert_close(ours.grad, theirs.grad, **tolerances)
    # 7 steps taken, the inf one skipped.
    assert all(fused.state[p]["step"].item() == len(EXPECTED_SCALES) - 1 for p in fused_model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_skips_the_whole_step(device):
    model = small_model(device)
    optimizer = FusedAdadelta(model.parameters())
    scaler = torch.amp.GradScaler(device)
    scaled_training(model, optimizer, scaler, 2, separate_unscale=False)
    before = optimizer_snapshot(optimizer)

    scaled_training(model, optimizer, scaler, 1, separate_unscale=False, poison_step=0)

    # Params and state as they were; the grads are the skipped step's own.
    after = optimizer_snapshot(optimizer)
    assert_unchanged(after["params"], before["params"])
    assert_unchanged(after["state"], before["state"])
    assert all(optimizer.state[p]["step"].item() == 2 for p in model.parameters())


@pytest.mark.cuda
def test_whole_training_step_replays_in_a_cuda_graph():
    """Forward, backward and step captured once and replayed equal the same steps run eagerly."""
    graph_model, eager_model = twin_models(small_model("cuda"))
    inputs = model_input(graph_model)
    lr = torch.tensor(0.5, device="cuda")
    graph_optimizer = FusedAdadelta(graph_model.parameters(), lr=lr, capturable=True)
    eager_optimizer = FusedAdadelta(eager_model.parameters(), lr=0.5)

    def training_step(model, optimizer):
        optimizer.zero_grad(set_to_none=False)
        model(inputs).square().mean().backward()
        optimizer.step()

    # Warm up on a side stream (allocations, lazy state) as CUDA-graph capture requires.
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for _ in range(3):
            training_step(graph_model, graph_optimizer)
    torch.cuda.current_stream().wait_stream(side_stream)
    for _ in range(3):
        training_step(eager_model, eager_optimizer)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        training_step(graph_model, graph_optimizer)
    for _ in range(5):
        graph.replay()
        training_step(eager_model, eager_optimizer)
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_model.state_dict(), eager_model.state_dict())
    # Capture recorded one step and the replays ran 5 more: 3 + 5 steps counted on the device.
    assert all(graph_optimizer.state[p]["step"].item() == 8 for p in graph_model.parameters())


@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.cuda
def test_capturable_with_cuda_tensor_lr_matches_torch():
    """Bit for bit as torch's foreach path, which applies a tensor lr under capturable as
    param + update * (-lr), two roundings, as FusedAdadelta does for an lr on the params' device
    (torch's for-loop path fuses them into one: see tests/optimizer/test_parity_with_torch.py)."""
    fused_model, torch_model = twin_models(small_model("cuda"))
    fused = FusedAdadelta(fused_model.parameters(), lr=torch.tensor(0.01, device="cuda"), capturable=True)
    reference = torch.optim.Adadelta(
        torch_model.parameters(), lr=torch.tensor(0.01, device="cuda"), capturable=True, foreach=True
    )
    inputs = model_input(fused_model)
    for model, optimizer in ((fused_model, fused), (torch_model, reference)):
        for _ in range(5):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    exact = TOLERANCES["cuda"]
    torch.testing.assert_close(fused_model.state_dict(), torch_model.state_dict(), **exact)
    torch.testing.assert_close(optimizer_state(fused), optimizer_state(reference), **exact)


@pytest.mark.slow
@pytest.mark.cuda
def test_tensor_of_more_than_2_pow_31_elements():
    """Indexing past 2**31 elements: every element, the last ones too, gets the float32 reference update."""
    numel = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    # param, grad, square_avg, acc_delta in float16, plus float32 reference slices.
    if free < 4 * 2 * numel + 2**30:
        pytest.skip(
            f"needs about {4 * 2 * numel / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free"
        )
    param = torch.nn.Parameter(torch.full((numel,), 1.0, dtype=torch.float16, device="cuda"))
    param.grad = torch.full_like(param, 0.5)
    param.grad[-4099:] = -0.25  # the tail past 2**31 gets another grad, so an index wrap would show
    optimizer = FusedAdadelta([param], lr=1.0)
    optimizer.step()

    def expected(grad):
        square_avg = 0.1 * grad * grad
        update = (1e-6) ** 0.5 / (square_avg + 1e-6) ** 0.5 * grad
        return torch.tensor(1.0 - update, dtype=torch.float16)

    head, tail = expected(0.5), expected(-0.25)
    assert torch.equal(param[: 2**31 - 1], head.cuda().expand(2**31 - 1))
    assert torch.equal(param[-4099:], tail.cuda().expand(4099))
    assert optimizer.state[param]["step"].item() == 1
