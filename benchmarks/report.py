"""The benchmark's three outputs: step.json (raw numbers), step.md (the table) and step.png (the plot)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def _time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e6:.3g} µs"


def _speedup(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _percent(value: float) -> str:
    return f"{value:.0%}"


def _spread(ceiling: dict) -> str:
    rates = [sample["gb_per_s"] for sample in ceiling["samples"]]
    return f"measured {min(rates):.1f} to {max(rates):.1f}"


def _ceilings(run: dict) -> list[str]:
    ceiling, copy = run["ceiling"], run["copy"]
    first = ceiling["samples"][0]
    kernel = ", ".join(f"`{name}`" for name in first["kernels"])
    return [
        f"Ceilings, each the fastest of {len(ceiling['samples'])} measurements, one before the steps and"
        " one after each workload (their spread is the machine's drift during the run):",
        "",
        f"- **step pattern: {ceiling['gb_per_s']:.1f} GB/s** ({_spread(ceiling)}): `p += g; s += g;"
        f" a += g` over four {first['array_bytes'] / 2**30:.2f} GiB float32 arrays, compiled by inductor"
        f" into one kernel ({kernel}) that passes over them once: the step's own access pattern, 4 reads"
        " and 3 in-place writes, 28 B/elem. **of ceiling** is against this.",
        f"- **copy: {copy['gb_per_s']:.1f} GB/s** ({_spread(copy)}): `dst.copy_(src)`, two"
        f" {copy['samples'][0]['buffer_bytes'] / 2**30:.2f} GiB float32 buffers, bytes read + written."
        " On CPU the copy also reads every destination line before writing it (write-allocate), which"
        " it is not credited with, so a step can pass 100% **of copy**.",
    ]


def _warnings(run: dict) -> list[str]:
    warnings = []
    over = [row for row in run["results"] if "fraction_of_ceiling" in row and row["fraction_of_ceiling"] > 1]
    if over:
        names = "; ".join(
            f"{row['workload']} {row['dtype']} {row['implementation']}"
            f" ({_percent(row['fraction_of_ceiling'])})"
            for row in over
        )
        warnings.append(
            f"**Warning: {len(over)} row(s) above 100% of the step-pattern ceiling** ({names}). No step"
            " can move its bytes faster than the pattern that moves only them: the ceiling is wrong,"
            " or the machine was faster during those steps than during every ceiling measurement."
        )
    ceiling = run["ceiling"]["samples"][0]
    if run["machine"]["device_type"] == "cpu" and ceiling["loops"] != 1:
        warnings.append(
            f"**Warning: the step-pattern kernel has {ceiling['loops']} loops, not one**: it may not be"
            " one pass (see `TORCH_LOGS=output_code`)."
        )
    return [line for warning in warnings for line in (f"> {warning}", "")]


def _host_cost(run: dict) -> list[str]:
    costs = run.get("host_cost") or []
    if not costs:
        return []
    few, many = costs[0]["tensors"]
    elements = costs[0]["elements_per_tensor"]
    lines = [
        "## Host cost per tensor and per step",
        "",
        f"**per tensor** = (step of {many:,} float32 params of {elements} elements - step of {few:,}"
        f" of them) / {many - few:,}: the work a step does per tensor beyond its bytes (checks, lists,"
        f" launches). **fixed** = step of {few:,} - {few:,} x per tensor: what a step costs whatever"
        " its tensors (Python around the call, hooks, dispatch).",
        "",
        f"| implementation | {few:,} tensors | {many:,} tensors | per tensor | fixed |",
        "|---|--:|--:|--:|--:|",
    ]
    for cost in costs:
        fixed = cost["median_s"][str(few)] * 1e6 - few * cost["us_per_tensor"]
        lines.append(
            f"| {cost['implementation']} | {_time(cost['median_s'][str(few)])}"
            f" | {_time(cost['median_s'][str(many)])} | {cost['us_per_tensor']:.2f} µs | {fixed:.0f} µs |"
        )
    return [*lines, ""]


def _compiled(run: dict) -> list[str]:
    rows = run.get("compiled") or []
    if not rows:
        return []
    lines = [
        "## Compiled: torch.compile(optimizer.step) against the eager step",
        "",
        "float32 params of 4,096 elements, FusedAdadelta with default options (the compiled step"
        " leaves the graph and runs the eager one: NOTE [Under torch.compile]). **compile**: the"
        " compiled optimizer's first step, compilation included.",
        "",
        "| params | eager | compiled | ratio | compile | goal |",
        "|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        goal = row.get("goal")
        verdict = "" if goal is None else f"<= {goal}x: {'met' if row['ratio'] <= goal else 'not met'}"
        lines.append(
            f"| {row['params']:,} | {_time(row['eager_median_s'])} | {_time(row['compiled_median_s'])}"
            f" | {row['ratio']:.2f}x | {row['compile_s']:.1f} s | {verdict} |"
        )
    return [*lines, ""]


def _launch_bound(run: dict) -> list[str]:
    rows = run.get("launch_bound") or []
    if not rows:
        return []
    lines = [
        "## Launch-bound: 1,000 tensors against one",
        "",
        "The step of 1,000 tensors of 4,096 elements over the step of one tensor of 4,096,000:"
        " the same bytes, split. 1x means the split costs nothing.",
        "",
        "| params | implementation | 1000x4096 | 4096000 | ratio | goal |",
        "|---|---|--:|--:|--:|---|",
    ]
    for row in rows:
        goal = ""
        if "goal" in row:
            goal = f"<= {row['goal']}x: {'met' if row['ratio'] <= row['goal'] else 'not met'}"
        lines.append(
            f"| {row['dtype']} | {row['implementation']} | {_time(row['many_median_s'])}"
            f" | {_time(row['one_median_s'])} | {row['ratio']:.2f}x | {goal} |"
        )
    return [*lines, ""]


def _cuda_graphs(run: dict) -> list[str]:
    rows = run.get("cuda_graphs") or []
    if not rows:
        return []
    lines = [
        "## CUDA graphs",
        "",
        "FusedAdadelta (capturable, lr a CUDA tensor) captured once per rotation copy and replayed,"
        " against its eager step and against torch.optim.Adadelta (capturable, foreach, lr a CUDA"
        " tensor) captured the same way; above 1x the graph is faster.",
        "",
        "| workload | params | graph | eager | torch foreach graph | vs eager | vs torch graph |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        eager = row["eager_median_s"]
        torch_graph = row["torch_graph_median_s"]
        lines.append(
            f"| {row['workload']} | {row['dtype']} | {_time(row['graph_median_s'])}"
            f" | {_time(eager) if eager else ''} | {_time(torch_graph) if torch_graph else ''}"
            f" | {_speedup(row['speedup_vs_eager'])} | {_speedup(row['speedup_vs_torch_graph'])} |"
        )
    return [*lines, ""]


def markdown(run: dict) -> str:
    machine, load = run["machine"], run["load_average"]
    lines = [
        f"# One Adadelta step on {machine['device']}",
        "",
        f"`{run['command']}` ({run['date']}); torch {machine['torch']}, CUDA {machine['cuda'] or 'none'},"
        f" {machine['threads']} threads, CPU kernel ISA {machine['cpu_kernel_isa']}. Load average"
        f" (1 minute, other processes on the machine): {load['start']:.2f} at the start,"
        f" {load['end']:.2f} at the end.",
        "",
        *_ceilings(run),
        "",
        *_warnings(run),
        "| workload | elements | params | state | B/elem | implementation | median | GB/s | of ceiling"
        " | of copy | vs foreach | vs compile |",
        "|---|--:|---|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in run["results"]:
        head = f"| {row['workload']} | {row['elements']:,} | {row['dtype']} |"
        if "skipped" in row:
            lines.append(f"{head} | | {row['implementation']} | skipped: {row['skipped']} | | | | | |")
            continue
        bytes_per_element = row["bytes_per_step"] / row["elements"]
        lines.append(
            f"{head} {row['state_dtype']} | {bytes_per_element:.0f} | {row['implementation']}"
            f" | {_time(row['median_s'])} | {row['gb_per_s']:.1f} | {_percent(row['fraction_of_ceiling'])}"
            f" | {_percent(row['fraction_of_copy'])}"
            f" | {_speedup(row['speedup_vs_foreach'])} | {_speedup(row['speedup_vs_compile'])} |"
        )
    lines += [
        "",
        "- **B/elem**: bytes one step must move per element at that implementation's dtypes: param, grad,"
        " square_avg and acc_delta read, param, square_avg and acc_delta written. For bfloat16 params"
        " torch.optim and the reference keep bfloat16 state (14 B/elem); FusedAdadelta runs with"
        " `fp32_state=True` and keeps float32 state (22 B/elem).",
        "- **GB/s** = those bytes / median time; **of ceiling** = GB/s / the step-pattern ceiling, which"
        " moves the same bytes in the same pattern and does nothing else (a step can reach 100%, not"
        " pass it); **of copy** = GB/s / the copy bandwidth.",
        "- **vs foreach**, **vs compile**: median time of torch foreach (torch.compile foreach) on the same"
        " workload and dtype / this row's median time; above 1x is faster.",
        "- Each timed step finds its memory cold: workloads smaller than 4 last-level caches"
        f" ({machine['last_level_cache_bytes'] / 2**20:.0f} MiB here) rotate among enough copies to span 4.",
        "",
        *_host_cost(run),
        *_launch_bound(run),
        *_cuda_graphs(run),
        *_compiled(run),
    ]
    return "\n".join(lines).rstrip("\n")


def plot(run: dict, path: Path) -> None:
    """Achieved bandwidth against workload size, one line per implementation, one panel per dtype."""
    timed = [row for row in run["results"] if "median_s" in row]
    dtypes = list(dict.fromkeys(row["dtype"] for row in timed))
    implementations = list(dict.fromkeys(row["implementation"] for row in timed))
    sizes: dict[int, list[str]] = {}  # workloads of one size (1000x4096 and 4096000) share a tick
    for row in timed:
        names = sizes.setdefault(row["elements"], [])
        if row["workload"] not in names:
            names.append(row["workload"])
    figure, axes = plt.subplots(
        1, len(dtypes), figsize=(6.5 * len(dtypes), 5), squeeze=False, sharey=True, layout="constrained"
    )
    for axis, dtype in zip(axes[0], dtypes, strict=True):
        for implementation in implementations:
            rows = sorted(
                (row["elements"], row["tensors"], row["gb_per_s"])
                for row in timed
                if row["dtype"] == dtype and row["implementation"] == implementation
            )
            if not rows:
                continue
            # The line goes through the workload of fewest tensors at each size; the others of
            # that size (1000x4096 beside 4096000) are hollow markers below or on it.
            fewest: dict[int, tuple[int, float]] = {}
            for elements, tensors, gb_per_s in rows:  # sorted: the fewest tensors come first
                fewest.setdefault(elements, (tensors, gb_per_s))
            line = [(elements, gb_per_s) for elements, (_, gb_per_s) in fewest.items()]
            split = [(e, gb_per_s) for e, tensors, gb_per_s in rows if tensors != fewest[e][0]]
            (drawn,) = axis.plot(*zip(*line, strict=True), marker="o", label=implementation)
            if split:
                axis.plot(
                    *zip(*split, strict=True),
                    linestyle="none",
                    marker="o",
                    markerfacecolor="none",
                    color=drawn.get_color(),
                )
        axis.axhline(run["ceiling"]["gb_per_s"], color="black", label="step-pattern ceiling")
        axis.axhline(run["copy"]["gb_per_s"], color="gray", linestyle="--", label="copy bandwidth")
        axis.set_xscale("log")
        axis.set_xticks(
            list(sizes),
            [f"{' / '.join(names)} ({elements:,})" for elements, names in sizes.items()],
            rotation=30,
            ha="right",
        )
        axis.minorticks_off()
        axis.set_title(f"{dtype} params")
        shared = any(len(names) > 1 for names in sizes.values())
        axis.set_xlabel("workload (elements)" + ("; hollow: the same size in more tensors" if shared else ""))
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("achieved bandwidth (GB/s)")
    figure.suptitle(f"One Adadelta step on {run['machine']['device']}")
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncol=3 * len(dtypes))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(run: dict, out_dir: Path) -> str:
    """Writes step.json, step.md and step.png to out_dir; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "step.json").write_text(json.dumps(run, indent=1) + "\n")
    table = markdown(run)
    (out_dir / "step.md").write_text(table + "\n")
    plot(run, out_dir / "step.png")
    return table
