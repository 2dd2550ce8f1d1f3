"""`python -m benchmarks.step`: one Adadelta step of every implementation, against the copy ceiling.

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
)

RHO = 0.9


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
    "mlp": [(200, 784), (200,), (10, 200), (10,)],  # the tutorial's 784-200-10 MLP
    "gpt2": gpt2_small_shapes(),
}
DEVICE_WORKLOADS = {
    "cpu": ["1M", "10M", "16M", "1000x4096", "mlp", "gpt2"],
    "cuda": ["1M", "16M", "64M", "256M", "1000x4096", "mlp", "gpt2"],
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


def _stepped(optimizer: torch.optim.Optimizer, step: Callable[[], object]) -> Built:
    step()
    params = optimizer.param_groups[0]["params"]
    return step, [optimizer.state[p][key] for p in params for key in ("square_avg", "acc_delta")]


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


IMPLEMENTATIONS: dict[str, Callable[[list[Tensor]], Built]] = {
    "reference": _reference,
    "torch for-loop": _torch_for_loop,
    "torch foreach": _torch_foreach,
    "torch.compile foreach": _torch_compile_foreach,
    "FusedAdadelta": _fused,
}
# Neither is the baseline of any goal: --skip-slow-above may leave them out of large workloads.
SLOW_IMPLEMENTATIONS = ("reference", "torch for-loop")


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


def time_step(
    implementation: str,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    plan: RunPlan,
    scratch: Tensor,
) -> dict:
    """One implementation on one workload: its bytes, its first step's time and every timed step's."""
    params = make_params(shapes, dtype, device)
    start = time.perf_counter()
    step, state = IMPLEMENTATIONS[implementation](params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_step_s = time.perf_counter() - start  # state allocation and, compiled, compilation
    # A compiled optimizer may recompile once more on its second step (the first
    # created the state); after that, a recompile would time the compiler, not the step.
    step()
    rotation = Rotation([*params, *(p.grad for p in params), *state], scratch)
    with torch._dynamo.config.patch(error_on_recompile=True):
        rotation.check(step)
        times = measure(step, device, plan, before_each=rotation.advance)
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


def release_memory(device: torch.device) -> None:
    # A compiled step holds its optimizer's tensors, and every compile counts
    # toward dynamo's recompile limit: start each measurement from nothing.
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_comparisons(results: list[dict], copy_gb_per_s: float) -> None:
    """Each timed row's fraction of the copy bandwidth, and its speedup over torch foreach
    and torch.compile foreach on the same workload and dtype (None where that one was skipped)."""
    medians = {(r["workload"], r["dtype"], r["implementation"]): r.get("median_s") for r in results}
    for row in results:
        if "median_s" not in row:
            continue
        row["fraction_of_copy"] = row["gb_per_s"] / copy_gb_per_s
        for baseline, key in (
            ("torch foreach", "speedup_vs_foreach"),
            ("torch.compile foreach", "speedup_vs_compile"),
        ):
            baseline_median = medians.get((row["workload"], row["dtype"], baseline))
            row[key] = baseline_median / row["median_s"] if baseline_median else None


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
    jobs = [(w, d, i) for w in workloads for d in args.dtypes for i in IMPLEMENTATIONS]
    results = []
    with tqdm(total=len(jobs) + 2, unit="measurement") as progress:
        # The copy before and after the steps: on a shared machine, their gap shows the drift.
        progress.set_postfix_str("copy bandwidth")
        scratch = scratch_buffer(device, cache_bytes)
        copy_before = copy_bandwidth(scratch, plan)
        release_memory(device)
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
            else:
                row |= time_step(implementation, shapes, DTYPES[dtype_name], device, plan, scratch)
            results.append(row)
            release_memory(device)
            progress.update()
        progress.set_postfix_str("copy bandwidth")
        copy_after = copy_bandwidth(scratch, plan)
        progress.update()
    # The ceiling is the best the machine showed.
    copy = {
        "gb_per_s": max(copy_before["gb_per_s"], copy_after["gb_per_s"]),
        "before": copy_before,
        "after": copy_after,
    }
    add_comparisons(results, copy["gb_per_s"])

    run = {
        "command": shlex.join(["python", "-m", "benchmarks.step", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device, cache_bytes),
        # Other processes on the machine (1-minute load average): the timings' noise.
        "load_average": {"start": load_at_start[0], "end": os.getloadavg()[0]},
        "plan": dataclasses.asdict(plan),
        "copy": copy,
        "results": results,
    }
    table = report.write(run, out_dir)
    print(table)


if __name__ == "__main__":
    main()
