"""FusedAdadelta under torch.compile (the op's registrations, as opcheck checks them, are in
tests/op/test_opcheck.py). By default a compiled step leaves the graph and runs the eager step;
with capturable=True it is traced into the graph (NOTE [Under torch.compile] in
adadelta_ext/optimizer.py): both are tested here.

Tolerances:
- A compiled FusedAdadelta step runs the same C++/CUDA kernel as an eager one (the op is
  opaque to Inductor), so compiling only `optimizer.step()` must give the same bits
  (rtol=0, atol=0).
- A compiled whole training step also compiles forward and backward, which Inductor may
  fuse and reorder, so it is compared with eager with assert_close's defaults for the
  dtype (float32: rtol 1.3e-6, atol 1e-5; float64: rtol 1e-7, atol 1e-7).
- Against eager torch.optim.Adadelta, the same defaults (as in test_parity_with_torch.py).
"""

from __future__ import annotations

import pytest
import torch
from optim_testing import DEVICES, DTYPES_AND_STATE, model_input, optimizer_state, small_model, twin_models
from torch import nn
from torch._dynamo.utils import counters

from adadelta_ext import FusedAdadelta

STEPS = 4

OPTIONS = {
    "defaults": {},
    "lr_rho_weight_decay_maximize": {"lr": 0.5, "rho": 0.8, "weight_decay": 0.1, "maximize": True},
    "tensor_lr": {"lr": torch.tensor(0.5)},
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graph or counter from another test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def optimizer_kwargs(options: dict, device) -> dict:
    """The options, with a tensor lr of this optimizer's own on `device`."""
    return {
        key: value.clone().to(device) if torch.is_tensor(value) else value for key, value in options.items()
    }


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(inputs).square().mean().backward()
    optimizer.step()


def train(model, optimizer, step_function, steps=STEPS):
    inputs = model_input(model)
    for _ in range(steps):
        step_function(model, optimizer, inputs)


WHOLE_STEP_CASES = [
    pytest.param(torch.float32, "defaults", id="float32-defaults"),
    pytest.param(torch.float32, "lr_rho_weight_decay_maximize", id="float32-lr_rho_weight_decay_maximize"),
    pytest.param(torch.float32, "tensor_lr", id="float32-tensor_lr"),
    pytest.param(torch.float64, "lr_rho_weight_decay_maximize", id="float64-lr_rho_weight_decay_maximize"),
]


@pytest.mark.parametrize(("dtype", "option"), WHOLE_STEP_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_matches_eager_fused_and_eager_torch(device, dtype, option):
    """forward + backward + optimizer.step() under torch.compile, 4 steps: what eager FusedAdadelta
    and eager torch.optim.Adadelta give (forward/backward recompiled by Inductor: default tolerances)."""
    compiled_model, eager_model = twin_models(small_model(device, dtype))
    torch_model = twin_models(eager_model)[1]
    compiled = FusedAdadelta(compiled_model.parameters(), **optimizer_kwargs(OPTIONS[option], device))
    eager = FusedAdadelta(eager_model.parameters(), **optimizer_kwargs(OPTIONS[option], device))
    reference = torch.optim.Adadelta(torch_model.parameters(), **optimizer_kwargs(OPTIONS[option], device))

    train(compiled_model, compiled, torch.compile(training_step))
    train(eager_model, eager, training_step)
    train(torch_model, reference, training_step)

    assert counters["stats"]["calls_captured"] > 0, "torch.compile must have traced something"
    torch.testing.assert_close(compiled_model.state_dict(), eager_model.state_dict())
    torch.testing.assert_close(optimizer_state(compiled), optimizer_state(eager))
    torch.testing.assert_close(compiled_model.state_dict(), torch_model.state_dict())
    torch.testing.assert_close(optimizer_state(compiled), optimizer_state(reference), check_device=False)


@pytest.mark.parametrize("lr_kind", ["float_lr", "tensor_lr"])
@pytest.mark.parametrize(("dtype", "fp32_state"), DTYPES_AND_STATE)
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_is_one_graph_and_bit_identical_to_eager(device, dtype, fp32_state, lr_kind):
    """With capturable=True, `torch.compile(optimizer.step, fullgraph=True)` traces the step without a
    graph break and, with the lr changed between steps as a scheduler would (a float: recompiles; a
    tensor: changed in place), gives exactly what eager FusedAdadelta gives (rtol=0, atol=0: the
    same kernel runs).

    A tensor lr under capturable rounds as torch's capturable step does (param + update * (-lr)):
    on CUDA it is compared with an eager capturable step. On the CPU an eager step cannot be
    capturable (torch refuses it, and so does FusedAdadelta), so the two apply the lr product with
    different roundings: assert_close's default tolerance there."""
    compiled_model, eager_model = twin_models(small_model(device, dtype))
    lr = torch.tensor(0.8, device=device) if lr_kind == "tensor_lr" else 0.8
    optimizers = [
        FusedAdadelta(
            model.parameters(),
            lr=optimizer_kwargs({"lr": lr}, device)["lr"],
            weight_decay=0.1,
            fp32_state=fp32_state,
            capturable=model is compiled_model or (lr_kind == "tensor_lr" and device == "cuda"),
        )
        for model in (compiled_model, eager_model)
    ]
    compiled_step = torch.compile(optimizers[0].step, fullgraph=True)
    inputs = model_input(compiled_model)
    for _ in range(STEPS):
        for model, optimizer, step in zip(
            (compiled_model, eager_model), optimizers, (compiled_step, optimizers[1].step), strict=True
        ):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            step()
            group = optimizer.param_groups[0]
            if lr_kind == "tensor_lr":
                group["lr"].mul_(0.5)
            else:
                group["lr"] *= 0.5

    assert counters["stats"]["calls_captured"] > 0, "torch.compile must have traced the step"
    exact = {} if lr_kind == "tensor_lr" and device == "cpu" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(compiled_model.state_dict(), eager_model.state_dict(), **exact)
    torch.testing.assert_close(optimizer_state(optimizers[0]), optimizer_state(optimizers[1]), **exact)


@pytest.mark.parametrize("option", ["kahan_sum", "stochastic_round"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_with_a_16bit_rounding_option_is_bit_identical_to_eager(device, option):
    """The Kahan compensation buffers and the stochastic rounding seeds (created outside the graph,
    with the state) reach the traced op (capturable=True): the compiled step gives eager's bits,
    state included."""
    compiled_model, eager_model = twin_models(small_model(device, torch.bfloat16))
    optimizers = [
        FusedAdadelta(model.parameters(), lr=0.8, capturable=model is compiled_model, **{option: True})
        for model in (compiled_model, eager_model)
    ]
    compiled_step = torch.compile(optimizers[0].step, fullgraph=True)
    inputs = model_input(compiled_model)
    for _ in range(STEPS):
        for model, step in zip(
            (compiled_model, eager_model), (compiled_step, optimizers[1].step), strict=True
        ):
            model.zero_grad()
            model(inputs).float().square().mean().backward()
            torch.manual_seed(5)  # the first step draws the stochastic rounding seeds
            step()

    assert counters["stats"]["calls_captured"] > 0, "torch.compile must have traced the step"
    torch.testing.assert_close(compiled_model.state_dict(), eager_model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(optimizer_state(optimizers[0]), optimizer_state(optimizers[1]), rtol=0, atol=0)


@pytest.mark.cuda
def test_reduce_overhead_training_step_replays_cuda_graphs_and_matches_eager(monkeypatch):
    """mode="reduce-overhead" (CUDA graph trees) with capturable=True and a CUDA tensor lr, decayed in
    place between steps: the optimizer step is in the compiled graphs (never run eagerly), no graph
    is left out of CUDA graphs, and the result is eager FusedAdadelta's and eager
    torch.optim.Adadelta's (float32 defaults: Inductor recompiles forward and backward)."""
    compiled_model, eager_model = twin_models(small_model("cuda"))
    torch_model = twin_models(eager_model)[1]
    kwargs = {"capturable": True, "weight_decay": 0.1}
    compiled = FusedAdadelta(compiled_model.parameters(), lr=torch.tensor(0.5, device="cuda"), **kwargs)
    eager = FusedAdadelta(eager_model.parameters(), lr=torch.tensor(0.5, device="cuda"), **kwargs)
    reference = torch.optim.Adadelta(torch_model.parameters(), lr=torch.tensor(0.5, device="cuda"), **kwargs)
    inputs = model_input(compiled_model)
    compiled_step = torch.compile(training_step, mode="reduce-overhead")
    eager_steps = []
    monkeypatch.setattr(compiled, "_step_gathered_in_cpp", lambda: eager_steps.append(1) or False)

    for _ in range(6):
        torch.compiler.cudagraph_mark_step_begin()
        compiled_step(compiled_model, compiled, inputs)
        training_step(eager_model, eager, inputs)
        training_step(torch_model, reference, inputs)
        for optimizer in (compiled, eager, reference):
            optimizer.param_groups[0]["lr"].mul_(0.9)
    torch.cuda.synchronize()

    assert counters["inductor"]["cudagraph_skips"] == 0, "a graph ran outside CUDA graphs"
    assert not eager_steps, "the step ran eagerly, outside the CUDA graphs"
    torch.testing.assert_close(compiled_model.state_dict(), eager_model.state_dict())
    torch.testing.assert_close(optimizer_state(compiled), optimizer_state(eager))
    torch.testing.assert_close(compiled_model.state_dict(), torch_model.state_dict())
    torch.testing.assert_close(optimizer_state(compiled), optimizer_state(reference))


@pytest.mark.parametrize("compiled", ["step_only", "training_step"])
@pytest.mark.parametrize("device", DEVICES)
def test_by_default_a_compiled_step_runs_the_eager_step_outside_the_graph(device, compiled):
    """Issue 24: tracing the fused op buys nothing and costs per-tensor work at every call. Without
    capturable, a compiled step leaves the graph and takes the eager C++ path at every step after
    the first (which creates the state): the eager step's bits, and nothing of it traced."""
    models = twin_models(small_model(device))
    optimizers = [FusedAdadelta(model.parameters(), lr=0.5, weight_decay=0.1) for model in models]
    gathered = []
    step_gathered = optimizers[0]._step_gathered_in_cpp

    def counted():
        gathered.append(step_gathered())
        return gathered[-1]

    optimizers[0]._step_gathered_in_cpp = counted
    steps = [torch.compile(training_step) if compiled == "training_step" else training_step, training_step]
    if compiled == "step_only":
        optimizers[0].step = torch.compile(optimizers[0].step)
    inputs = model_input(models[0])
    for _ in range(STEPS):
        for model, optimizer, step in zip(models, optimizers, steps, strict=True):
            step(model, optimizer, inputs)
    assert gathered == [False] + [True] * (STEPS - 1)
    if compiled == "step_only":
        assert counters["stats"]["unique_graphs"] == 0, "nothing of the step is traced"
    # A compiled forward and backward may round otherwise: the defaults then.
    exact = {"rtol": 0, "atol": 0} if compiled == "step_only" else {}
    torch.testing.assert_close(models[0].state_dict(), models[1].state_dict(), **exact)
    torch.testing.assert_close(optimizer_state(optimizers[0]), optimizer_state(optimizers[1]), **exact)


def test_fullgraph_without_capturable_names_capturable():
    """fullgraph=True refuses the default step's graph break; the error says what to do."""
    param = nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    optimizer = FusedAdadelta([param])
    with pytest.raises(torch._dynamo.exc.Unsupported, match="constructed with capturable=True"):
        torch.compile(optimizer.step, fullgraph=True)()


@pytest.mark.parametrize("whole_training_step", [False, True], ids=["step_only", "training_step"])
def test_torch_compile_with_complex_params_matches_eager(whole_training_step):
    """Issue 9, defect 3: torch.compile failed on complex params."""
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
