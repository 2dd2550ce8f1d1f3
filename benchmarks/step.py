"""`python -m benchmarks.step`: one Adadelta step of every implementation, against the step-pattern ceiling.

Writes step.md, step.json and step.png to --out-dir and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

import adadelta_ext
from adadelta_ext import FusedAdadelta, reference

from . import report
from .timing import (
    FULL,
    QUICK,
    Rotation,
    RunPlan,
    copy_bandwidth,
    last_level_cache_bytes,
    measure,
    scratch_buffer,
    step_pattern_bandwidth,
)

RHO = 0.9
# The host cost per tensor: the step of HOST_COST_TENSORS[1] params of HOST_COST_ELEMENTS elements
# less the step of HOST_COST_TENSORS[0] of them, over the difference in tensors.
HOST_COST_TENSORS = (20, 2000)
HOST_COST_ELEMENTS = 4
HOST_COST_IMPLEMENTATIONS = ("FusedAdadelta", "torch foreach")
# The launch-bound pair: many small tensors against one tensor of as many elements.
LAUNCH_BOUND = ("1000x4096", "4096000")
# FusedAdadelta's goal: 1000x4096 float32 within this factor of the single tensor's time.
LAUNCH_BOUND_GOAL = 1.3
# torch.compile(optimizer.step) against the eager step, at these many float32 params of 4,096
# elements (issue 24: at 1,000 params, at most COMPILED_GOAL times the eager step).
COMPILED_PARAM_COUNTS = (10, 100, 1000)
COMPILED_GOAL = 1.2


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small's parameters (124M), with Conv1D weights stored (in, out) as in its checkpoints."""
    width, vocab, context, layers = 768, 50257, 1024, 12
    block = [
        (width,), (width,),  # ln_1 weight, bias
        (width, 3 * width), (3 * width,),  # attn.c_attn
        (width, width), (width,),  # attn.c_proj
        (width,), (width,),  # ln_2 weight, bias
        (width, 4 * width), (4 * width,),  # mlp.c_fc
        (4 * width, width), (width,),  # mlp.c_proj
    ]  # fmt: skip
    return [(vocab, width), (context, width), *block * layers, (width,), (width,)]


WORKLOADS: dict[str, list[tuple[int, ...]]] = {
    "1M": [(1_000_000,)],
    "10M": [(10_000_000,)],
    "16M": [(16_000_000,)],
    "64M": [(64_000_000,)],
    "256M": [(256_000_000,)],
    "1000x4096": [(4096,)] * 1000,
    "4096000": [(4_096_000,)],  # as many elements as 1000x4096, in one tensor
    "mlp": [(200, 784), (200,), (10, 200), (10,)],  # the tutorial's 784-200-10 MLP
    "gpt2": gpt2_small_shapes(),
}
DEVICE_WORKLOADS = {
    "cpu": ["1M", "10M", "16M", "1000x4096", "4096000", "mlp", "gpt2"],
    "cuda": ["1M", "16M", "64M", "256M", "1000x4096", "4096000", "mlp", "gpt2"],
}
QUICK_WORKLOADS = {"cpu": ["1M", "10M", "mlp"], "cuda": ["1M", "64M", "mlp"]}

# Param dtypes. For bfloat16, FusedAdadelta keeps its state in float32 (fp32_state=True);
# torch.optim and the reference keep it in bfloat16, the param's dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# A builder takes the params (grads set), takes the first step (state, compilation)
# and returns the step and the state tensors it updates.
Built = tuple[Callable[[], object], list[Tensor]]


def _reference(params: list[Tensor]) -> Built:
    sqrs, deltas = reference.init_state(params)

    def step() -> None:
        reference.adadelta(params, sqrs, deltas, RHO)

    step()
    return step, [*sqrs, *deltas]


def _state(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The state tensors a step reads and writes: with kahan_sum, the compensation buffers too."""
    params = optimizer.param_groups[0]["params"]
    keys = ("square_avg", "acc_delta", "kahan_comp")
    return [optimizer.state[p][key] for p in params for key in keys if key in optimizer.state[p]]


def _stepped(optimizer: torch.optim.Optimizer, step: Callable[[], object]) -> Built:
    step()
    return step, _state(optimizer)


def _torch_for_loop(params: list[Tensor]) -> Built:
    optimizer = torch.optim.Adadelta(params, rho=RHO, foreach=False)
    return _stepped(optimizer, optimizer.step)


def _torch_foreach(params: list[Tensor]) -> Built:
    optimizer = torch.optim.Adadelta(params, rho=RHO, foreach=True)
    return _stepped(optimizer, optimizer.step)


def _torch_compile_foreach(params: list[Tensor]) -> Built:
    # lr as a tensor, so that the graph does not bake it in (and recompile when it changes).
    optimizer = torch.optim.Adadelta(params, lr=torch.tensor(1.0), rho=RHO, foreach=True)

    @torch.compile(fullgraph=False)
    def step() -> None:
        optimizer.step()

    return _stepped(optimizer, step)


def _fused(params: list[Tensor]) -> Built:
    optimizer = FusedAdadelta(params, rho=RHO, fp32_state=True)
    return _stepped(optimizer, optimizer.step)


def _compiled_fused(params: list[Tensor]) -> Built:
    # As PyTorch's tutorials compile an optimizer: its step, default mode (NOTE [Under torch.compile]).
    optimizer = FusedAdadelta(params, rho=RHO, fp32_state=True)
    return _stepped(optimizer, torch.compile(optimizer.step))


def _warmed_up_for_capture(optimizer: torch.optim.Optimizer) -> Built:
    """The eager step of a capturable optimizer, its first steps taken on a side stream.

    As torch.cuda.graph's documentation asks: state allocation and any lazy initialization
    happen outside the capture, on a stream other than the one captured later.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    return optimizer.step, _state(optimizer)


def _fused_with(option: str) -> Callable[[list[Tensor]], Built]:
    def build(params: list[Tensor]) -> Built:
        optimizer = FusedAdadelta(params, rho=RHO, fp32_state=True, **{option: True})
        return _stepped(optimizer, optimizer.step)

    return build


def _fused_cuda_graph(params: list[Tensor]) -> Built:
    # capturable=True with lr a tensor on the device: nothing in the step reads a host value.
    lr = torch.tensor(1.0, device=params[0].device)
    optimizer = FusedAdadelta(params, lr=lr, rho=RHO, fp32_state=True, capturable=True)
    return _warmed_up_for_capture(optimizer)


def _torch_foreach_cuda_graph(params: list[Tensor]) -> Built:
    lr = torch.tensor(1.0, device=params[0].device)
    optimizer = torch.optim.Adadelta(params, lr=lr, rho=RHO, foreach=True, capturable=True)
    return _warmed_up_for_capture(optimizer)


IMPLEMENTATIONS: dict[str, Callable[[list[Tensor]], Built]] = {
    "reference": _reference,
    "torch for-loop": _torch_for_loop,
    "torch foreach": _torch_foreach,
    "torch.compile foreach": _torch_compile_foreach,
    "FusedAdadelta": _fused,
    # kahan_sum reads and writes a compensation buffer of the param's dtype (+4 B/elem for
    # bfloat16); stochastic_round moves no more bytes than FusedAdadelta.
    "FusedAdadelta kahan_sum": _fused_with("kahan_sum"),
    "FusedAdadelta stochastic_round": _fused_with("stochastic_round"),
    "torch foreach (CUDA graph)": _torch_foreach_cuda_graph,
    "FusedAdadelta (CUDA graph)": _fused_cuda_graph,
    "torch.compile FusedAdadelta": _compiled_fused,
}
# Neither is the baseline of any goal: --skip-slow-above may leave them out of large workloads.
SLOW_IMPLEMENTATIONS = ("reference", "torch for-loop")
# Captured once per rotation copy (see capture_per_copy) and replayed: CUDA only, and only on the
# launch-bound pair, where launching is what a graph saves.
CUDA_GRAPH_IMPLEMENTATIONS = ("torch foreach (CUDA graph)", "FusedAdadelta (CUDA graph)")
CUDA_GRAPH_WORKLOADS = LAUNCH_BOUND
# Timed in their own section (compiled_steps), not on the workloads.
SECTION_IMPLEMENTATIONS = ("torch.compile FusedAdadelta",)


# For 16-bit params only (no effect on others).
ROUNDING_IMPLEMENTATIONS = ("FusedAdadelta kahan_sum", "FusedAdadelta stochastic_round")


def implementations(device: torch.device, workload: str, dtype_name: str) -> list[str]:
    """The implementations timed on `workload` with `dtype_name` params on `device`."""
    return [
        name
        for name in IMPLEMENTATIONS
        if name not in SECTION_IMPLEMENTATIONS
        and (
            name not in CUDA_GRAPH_IMPLEMENTATIONS
            or (device.type == "cuda" and workload in CUDA_GRAPH_WORKLOADS)
        )
        and (name not in ROUNDING_IMPLEMENTATIONS or dtype_name != "float32")
    ]


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype)) for shape in shapes]
    for param in params:
        param.grad = torch.randn_like(param)
    return params


def bytes_per_step(params: list[Tensor], state: list[Tensor]) -> int:
    """The bytes a step must move: param, grad and state read; param and state written."""
    param_bytes = sum(p.nbytes for p in params)
    return 2 * param_bytes + sum(p.grad.nbytes for p in params) + 2 * sum(s.nbytes for s in state)


def capture_per_copy(step: Callable[[], object], rotation: Rotation) -> Callable[[], None]:
    """The step as CUDA graph replays: one graph per copy of the rotation.

    A graph replays the addresses it was captured with, and the rotation moves the tensors'
    storage every step: so each copy gets its own capture, and the step replays the graph
    of the copy the rotation is at. The graphs share one memory pool: they run one at a
    time, and none leaves a temporary alive for another.
    """
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    for _ in rotation.copies:  # all positions, ending where it started
        rotation.advance()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
        graphs[rotation.position] = graph

    def replay() -> None:
        graphs[rotation.position].replay()

    return replay


def time_step(
    implementation: str,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    plan: RunPlan,
    scratch: Tensor | None,
) -> dict:
    """One implementation on one workload: its bytes, its first step's time and every timed step's.

    With `scratch`, each step finds its memory cold (see Rotation); without, the same
    tensors every step (the host-cost measurement, where the bytes are few and not the point).
    """
    params = make_params(shapes, dtype, device)
    start = time.perf_counter()
    step, state = IMPLEMENTATIONS[implementation](params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_step_s = time.perf_counter() - start  # state allocation and, compiled, compilation
    # A compiled optimizer may recompile once more on its second step (the first
    # created the state); after that, a recompile would time the compiler, not the step.
    step()
    tensors = [*params, *(p.grad for p in params), *state]
    rotation = Rotation(
        tensors, scratch if scratch is not None else tensors[0].new_empty(0, dtype=torch.uint8)
    )
    if implementation in CUDA_GRAPH_IMPLEMENTATIONS:
        step = capture_per_copy(step, rotation)
    before_each = rotation.advance if len(rotation.copies) > 1 else lambda: None
    with torch._dynamo.config.patch(error_on_recompile=True):
        rotation.check(step)
        times = measure(step, device, plan, before_each=before_each)
    median = statistics.median(times)
    bytes_moved = bytes_per_step(params, state)
    return {
        "state_dtype": str(state[0].dtype).removeprefix("torch."),
        "bytes_per_step": bytes_moved,
        "copies": len(rotation.copies),
        "first_step_s": first_step_s,
        "times_s": times,
        "median_s": median,
        "gb_per_s": bytes_moved / median / 1e9,
    }


def host_cost(implementation: str, device: torch.device, plan: RunPlan) -> dict:
    """The host's work in one step: per tensor, the step of many tiny float32 params less the
    step of a few, over the difference in tensors (tiny params move next to no bytes, so what
    grows with their number is the per-tensor work: checks, lists, launches); and fixed, what a
    step costs beyond that, whatever its tensors (the line through both steps at zero tensors:
    Python around the call, hooks, dispatch), which the report derives from the same medians."""
    few, many = HOST_COST_TENSORS
    steps = {
        count: time_step(implementation, [(HOST_COST_ELEMENTS,)] * count, torch.float32, device, plan, None)
        for count in HOST_COST_TENSORS
    }
    return {
        "implementation": implementation,
        "elements_per_tensor": HOST_COST_ELEMENTS,
        "tensors": list(HOST_COST_TENSORS),
        "times_s": {str(count): steps[count]["times_s"] for count in HOST_COST_TENSORS},
        "median_s": {str(count): steps[count]["median_s"] for count in HOST_COST_TENSORS},
        "us_per_tensor": (steps[many]["median_s"] - steps[few]["median_s"]) / (many - few) * 1e6,
    }


def compiled_steps(device: torch.device, plan: RunPlan, scratch: Tensor) -> list[dict]:
    """torch.compile(optimizer.step) against the eager step, at COMPILED_PARAM_COUNTS float32 params
    of 4,096 elements: each one's median and first step (for the compiled one, compilation)."""
    rows = []
    for count in COMPILED_PARAM_COUNTS:
        timed = {}
        for implementation in ("FusedAdadelta", "torch.compile FusedAdadelta"):
            shapes = [(4096,)] * count
            timed[implementation] = time_step(implementation, shapes, torch.float32, device, plan, scratch)
            release_memory(device)
        eager, compiled = timed["FusedAdadelta"], timed["torch.compile FusedAdadelta"]
        rows.append(
            {
                "params": count,
                "eager_median_s": eager["median_s"],
                "compiled_median_s": compiled["median_s"],
                "ratio": compiled["median_s"] / eager["median_s"],
                "compile_s": compiled["first_step_s"],
                "eager_first_step_s": eager["first_step_s"],
                **({"goal": COMPILED_GOAL} if count == COMPILED_PARAM_COUNTS[-1] else {}),
            }
        )
    return rows


def release_memory(device: torch.device) -> None:
    # A compiled step holds its optimizer's tensors, and every compile counts
    # toward dynamo's recompile limit: start each measurement from nothing.
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_comparisons(results: list[dict], ceiling_gb_per_s: float, copy_gb_per_s: float) -> None:
    """Each timed row's fraction of the step-pattern ceiling and of the copy bandwidth, and its
    speedup over torch foreach and torch.compile foreach on the same workload and dtype (None
    where that one was skipped)."""
    medians = {(r["workload"], r["dtype"], r["implementation"]): r.get("median_s") for r in results}
    for row in results:
        if "median_s" not in row:
            continue
        row["fraction_of_ceiling"] = row["gb_per_s"] / ceiling_gb_per_s
        row["fraction_of_copy"] = row["gb_per_s"] / copy_gb_per_s
        for baseline, key in (
            ("torch foreach", "speedup_vs_foreach"),
            ("torch.compile foreach", "speedup_vs_compile"),
        ):
            baseline_median = medians.get((row["workload"], row["dtype"], baseline))
            row[key] = baseline_median / row["median_s"] if baseline_median else None


def _medians(results: list[dict]) -> dict[tuple[str, str, str], float]:
    return {
        (r["workload"], r["dtype"], r["implementation"]): r["median_s"] for r in results if "median_s" in r
    }


def launch_bound(results: list[dict]) -> list[dict]:
    """Per dtype and implementation timed on both: the step of 1,000 tensors of 4,096 elements
    over the step of one tensor of 4,096,000. 1x: the split into tensors costs nothing."""
    many, one = LAUNCH_BOUND
    medians = _medians(results)
    rows = []
    for (workload, dtype, implementation), many_median in medians.items():
        one_median = medians.get((one, dtype, implementation))
        if workload == many and one_median:
            row = {
                "dtype": dtype,
                "implementation": implementation,
                "many_median_s": many_median,
                "one_median_s": one_median,
                "ratio": many_median / one_median,
            }
            if implementation == "FusedAdadelta" and dtype == "float32":
                row["goal"] = LAUNCH_BOUND_GOAL
            rows.append(row)
    return rows


def cuda_graphs(results: list[dict]) -> list[dict]:
    """Per workload and dtype: FusedAdadelta replayed from a CUDA graph against its eager step and
    against torch foreach replayed the same way (each ratio: the other's median / the graph's)."""
    medians = _medians(results)
    rows = []
    for (workload, dtype, implementation), graph_median in medians.items():
        if implementation != "FusedAdadelta (CUDA graph)":
            continue
        eager = medians.get((workload, dtype, "FusedAdadelta"))
        torch_graph = medians.get((workload, dtype, "torch foreach (CUDA graph)"))
        rows.append(
            {
                "workload": workload,
                "dtype": dtype,
                "graph_median_s": graph_median,
                "eager_median_s": eager,
                "torch_graph_median_s": torch_graph,
                "speedup_vs_eager": eager / graph_median if eager else None,
                "speedup_vs_torch_graph": torch_graph / graph_median if torch_graph else None,
            }
        )
    return rows


def machine(device: torch.device, cache_bytes: int) -> dict:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model,
        "device_type": device.type,
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "last_level_cache_bytes": cache_bytes,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "adadelta_ext": adadelta_ext.__version__,
        "adadelta_ext_backends": adadelta_ext.backends(),
        "cpu_kernel_isa": adadelta_ext.cpu_kernel_isa(),
        "python": platform.python_version(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer workloads and runs: seconds to a minute on CPU"
    )
    parser.add_argument("--out-dir", type=Path, help="default: benchmarks/results/<device>/")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=list(WORKLOADS),
        help="default: the device's workloads (fewer with --quick)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument(
        "--skip-slow-above",
        type=int,
        metavar="ELEMENTS",
        help=f"time {' and '.join(SLOW_IMPLEMENTATIONS)} only on workloads of at most ELEMENTS elements",
    )
    parser.add_argument(
        "--skip-compile-above",
        type=int,
        metavar="TENSORS",
        help="time torch.compile only on workloads of at most TENSORS tensors (its first step of "
        "1,000 tensors compiles for minutes)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    plan = QUICK if args.quick else FULL
    workloads = args.workloads or (QUICK_WORKLOADS if args.quick else DEVICE_WORKLOADS)[device.type]
    out_dir = args.out_dir or Path(__file__).parent / "results" / device.type
    cache_bytes = last_level_cache_bytes(device)

    load_at_start = os.getloadavg()
    jobs_of = {w: [(w, d, i) for d in args.dtypes for i in implementations(device, w, d)] for w in workloads}
    jobs = [job for w in workloads for job in jobs_of[w]]
    results = []
    ceilings = {"step pattern": step_pattern_bandwidth, "copy": copy_bandwidth}
    with tqdm(
        total=len(jobs) + (len(workloads) + 1) * len(ceilings) + len(HOST_COST_IMPLEMENTATIONS) + 1,
        unit="measurement",
    ) as progress:
        # The ceilings before the steps and after each workload: a shared machine's bandwidth drifts
        # by a third from minute to minute (NOTES entry 5), and a ceiling sampled only before and
        # after the steps missed the fast periods some steps ran in.
        scratch = scratch_buffer(device, cache_bytes)

        def measure_ceilings() -> dict:
            measured = {}
            for name, bandwidth in ceilings.items():
                progress.set_postfix_str(f"{name} bandwidth")
                measured[name] = bandwidth(scratch, plan)
                release_memory(device)
                progress.update()
            return measured

        samples = [measure_ceilings()]
        host_costs = []
        for implementation in HOST_COST_IMPLEMENTATIONS:
            progress.set_postfix_str(f"host cost {implementation}")
            host_costs.append(host_cost(implementation, device, plan))
            release_memory(device)
            progress.update()
        progress.set_postfix_str("compiled steps")
        compiled = compiled_steps(device, plan, scratch)
        progress.update()
        for workload, dtype_name, implementation in jobs:
            progress.set_postfix_str(f"{workload} {dtype_name} {implementation}")
            shapes = WORKLOADS[workload]
            row = {
                "workload": workload,
                "elements": sum(torch.Size(shape).numel() for shape in shapes),
                "tensors": len(shapes),
                "dtype": dtype_name,
                "implementation": implementation,
            }
            if (
                implementation in SLOW_IMPLEMENTATIONS
                and args.skip_slow_above is not None
                and row["elements"] > args.skip_slow_above
            ):
                row["skipped"] = f"more than --skip-slow-above {args.skip_slow_above:,} elements"
            elif (
                implementation == "torch.compile foreach"
                and args.skip_compile_above is not None
                and row["tensors"] > args.skip_compile_above
            ):
                row["skipped"] = f"more than --skip-compile-above {args.skip_compile_above:,} tensors"
            else:
                row |= time_step(implementation, shapes, DTYPES[dtype_name], device, plan, scratch)
            results.append(row)
            release_memory(device)
            progress.update()
            if (workload, dtype_name, implementation) == jobs_of[workload][-1]:
                samples.append(measure_ceilings())
    # Each ceiling is the best the machine showed.
    ceiling, copy = (
        {
            "gb_per_s": max(sample[name]["gb_per_s"] for sample in samples),
            "samples": [sample[name] for sample in samples],
        }
        for name in ceilings
    )
    add_comparisons(results, ceiling["gb_per_s"], copy["gb_per_s"])

    run = {
        "command": shlex.join(["python", "-m", "benchmarks.step", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device, cache_bytes),
        # Other processes on the machine (1-minute load average): the timings' noise.
        "load_average": {"start": load_at_start[0], "end": os.getloadavg()[0]},
        "plan": dataclasses.asdict(plan),
        "ceiling": ceiling,
        "copy": copy,
        "host_cost": host_costs,
        "compiled": compiled,
        "launch_bound": launch_bound(results),
        "cuda_graphs": cuda_graphs(results),
        "results": results,
    }
    table = report.write(run, out_dir)
    print(table)


if __name__ == "__main__":
    main()
