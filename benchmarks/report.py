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


def markdown(run: dict) -> str:
    machine, copy = run["machine"], run["copy"]
    before, after = copy["before"], copy["after"]
    lines = [
        f"# One Adadelta step on {machine['device']}",
        "",
        f"`{run['command']}` ({run['date']}); torch {machine['torch']}, CUDA {machine['cuda'] or 'none'},"
        f" {machine['threads']} threads, CPU kernel ISA {machine['cpu_kernel_isa']}.",
        "",
        f"Copy bandwidth (`dst.copy_(src)`, two {before['buffer_bytes'] / 2**30:.2f} GiB float32 buffers,"
        f" bytes read + written): **{copy['gb_per_s']:.1f} GB/s**, the faster of"
        f" {before['gb_per_s']:.1f} GB/s before the steps and {after['gb_per_s']:.1f} GB/s after.",
        "",
        "| workload | elements | params | state | B/elem | implementation | median | GB/s | of copy"
        " | vs foreach | vs compile |",
        "|---|--:|---|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for row in run["results"]:
        head = f"| {row['workload']} | {row['elements']:,} | {row['dtype']} |"
        if "skipped" in row:
            lines.append(f"{head} | | {row['implementation']} | skipped: {row['skipped']} | | | | |")
            continue
        bytes_per_element = row["bytes_per_step"] / row["elements"]
        lines.append(
            f"{head} {row['state_dtype']} | {bytes_per_element:.0f} | {row['implementation']}"
            f" | {_time(row['median_s'])} | {row['gb_per_s']:.1f} | {row['fraction_of_copy']:.0%}"
            f" | {_speedup(row['speedup_vs_foreach'])} | {_speedup(row['speedup_vs_compile'])} |"
        )
    lines += [
        "",
        "- **B/elem**: bytes one step must move per element at that implementation's dtypes: param, grad,"
        " square_avg and acc_delta read, param, square_avg and acc_delta written. For bfloat16 params"
        " torch.optim and the reference keep bfloat16 state (14 B/elem); FusedAdadelta runs with"
        " `fp32_state=True` and keeps float32 state (22 B/elem).",
        "- **GB/s** = those bytes / median time; **of copy** = GB/s / the copy bandwidth. On CPU the copy"
        " reads each destination line before writing it (write-allocate) and an in-place step does not,"
        " so a step can pass 100%.",
        "- **vs foreach**, **vs compile**: median time of torch foreach (torch.compile foreach) on the same"
        " workload and dtype / this row's median time; above 1x is faster.",
        "- Each timed step finds its memory cold: workloads smaller than 4 last-level caches"
        f" ({machine['last_level_cache_bytes'] / 2**20:.0f} MiB here) rotate among enough copies to span 4.",
    ]
    return "\n".join(lines)


def plot(run: dict, path: Path) -> None:
    """Achieved bandwidth against workload size, one line per implementation, one panel per dtype."""
    timed = [row for row in run["results"] if "median_s" in row]
    dtypes = list(dict.fromkeys(row["dtype"] for row in timed))
    implementations = list(dict.fromkeys(row["implementation"] for row in timed))
    sizes = {row["elements"]: row["workload"] for row in timed}
    figure, axes = plt.subplots(
        1, len(dtypes), figsize=(6.5 * len(dtypes), 5), squeeze=False, sharey=True, layout="constrained"
    )
    for axis, dtype in zip(axes[0], dtypes, strict=True):
        for implementation in implementations:
            points = sorted(
                (row["elements"], row["gb_per_s"])
                for row in timed
                if row["dtype"] == dtype and row["implementation"] == implementation
            )
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=implementation)
        axis.axhline(run["copy"]["gb_per_s"], color="black", linestyle="--", label="copy bandwidth")
        axis.set_xscale("log")
        axis.set_xticks(
            list(sizes),
            [f"{name} ({elements:,})" for elements, name in sizes.items()],
            rotation=30,
            ha="right",
        )
        axis.minorticks_off()
        axis.set_title(f"{dtype} params")
        axis.set_xlabel("workload (elements)")
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
