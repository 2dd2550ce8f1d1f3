"""Pure bfloat16 training with FusedAdadelta: round-to-nearest, kahan_sum=True and stochastic_round=True.

    python -m examples.pure_16bit_training [--quick] [--out-dir DIR] [--steps N] [--lr LR] ...

run from the repository root, on the CPU. ``--quick`` is a few dozen steps on a
tiny slice of the data, for the tests.

In pure bfloat16 training the weights themselves are bfloat16, and an update
smaller than half the spacing of bfloat16 around a weight is lost to
round-to-nearest, every step. Adadelta's first updates are about
``lr * sqrt(eps)`` (1e-3 at lr=1, eps=1e-6), and a bfloat16 weight near 0.5 has
a spacing of about 2e-3. ``FusedAdadelta(kahan_sum=True)`` keeps what rounding
lost in a bfloat16 compensation buffer and adds it to the next update;
``FusedAdadelta(stochastic_round=True)`` rounds up or down at random so that
updates are kept on average.

The task is a character-level (byte-level) language model of the Python
standard library's own source: the ``*.py`` files under
``Path(os.__file__).parent`` (test folders and site-packages left out), in
sorted order, concatenated, the first ``--data-bytes`` of them. The last
``--val-fraction`` of those bytes (other files than the training bytes) is
held out. The model is an MLP over the previous ``--context`` bytes:
embedding, linear, LayerNorm, GELU, linear to 256 logits.

Four runs train from the same float32 initial weights (cast to bfloat16 for
three of them) on the same batches: ``float32``, ``bfloat16`` (round to
nearest), ``bfloat16 + kahan_sum`` and ``bfloat16 + stochastic_round``. The
bfloat16 runs are pure bfloat16: weights, grads, optimizer state and
activations, up to the logits; the cross-entropy is computed in float32 from
the bfloat16 logits. torch is seeded before each run, so the stochastic
rounding seeds (drawn from torch's default generator) are the same every time.

Writes ``results.json``, ``loss_curves.png`` and ``report.md`` to ``--out-dir``.
The results depend on the Python version (its standard library is the data);
``results.json`` records it with a hash of the bytes used.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import adadelta_ext
from adadelta_ext import FusedAdadelta
from examples._cli import positive_int

VOCAB = 256  # bytes are the tokens
# Folders of the standard library whose files are not its source: tests, and installed packages.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
DEFAULT_OUT_DIR = Path("examples/results/pure_16bit_training")

# Name -> (dtype of the model, FusedAdadelta's options). The order is the order of the runs.
RUNS: dict[str, tuple[torch.dtype, dict[str, bool]]] = {
    "float32": (torch.float32, {}),
    "bfloat16": (torch.bfloat16, {}),
    "bfloat16 + kahan_sum": (torch.bfloat16, {"kahan_sum": True}),
    "bfloat16 + stochastic_round": (torch.bfloat16, {"stochastic_round": True}),
}


@dataclass(frozen=True)
class Config:
    """What a run depends on besides its data."""

    steps: int = 4000
    batch_size: int = 128
    context: int = 16  # bytes the model sees before the one it predicts
    embed_dim: int = 16
    hidden: int = 256
    lr: float = 1.0
    rho: float = 0.9
    eps: float = 1e-6
    seed: int = 0  # initial weights, batch order, stochastic rounding seeds
    log_every: int = 50  # steps per point of the smoothed training loss curve
    eval_every: int = 500  # steps between validation losses on the curve's validation subset
    curve_val_windows: int = 4096  # validation windows for the periodic validation loss
    val_windows: int = 32768  # validation windows for the final validation metrics (at most)


@dataclass(frozen=True)
class Corpus:
    """The bytes of the standard library's source, split into training and validation bytes."""

    train: Tensor  # int64 byte values
    val: Tensor
    source: str
    num_files: int
    sha256: str  # of the bytes used, train and val together

    @property
    def num_bytes(self) -> int:
        return len(self.train) + len(self.val)


@dataclass
class RunResult:
    name: str
    dtype: str
    options: dict[str, bool]
    logged_steps: list[int] = field(default_factory=list)  # the last step of each log_every block
    logged_losses: list[float] = field(default_factory=list)  # mean training loss over that block
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)  # on the curve's validation subset
    final_train_loss: float = math.nan  # mean over the last log_every steps
    val_loss: float = math.nan  # nats per byte, on the final validation windows
    val_accuracy: float = math.nan  # next-byte accuracy
    num_params: int = 0
    bytes_per_param: float = math.nan
    memory_breakdown: dict[str, int] = field(default_factory=dict)  # bytes, by tensor
    median_step_ms: float = math.nan  # optimizer.step() alone
    median_iteration_ms: float = math.nan  # batch, forward, loss, backward and step
    seconds: float = math.nan

    @property
    def val_perplexity(self) -> float:
        return math.exp(self.val_loss)


# --- data ---------------------------------------------------------------------------------------


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files, sorted by path, without tests or installed packages."""
    root = Path(os.__file__).parent if root is None else root
    files = [
        path
        for path in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def load_corpus(num_bytes: int, val_fraction: float, root: Path | None = None) -> Corpus:
    """The first ``num_bytes`` of the concatenated files; the last ``val_fraction`` of them held out."""
    root = Path(os.__file__).parent if root is None else root
    chunks: list[bytes] = []
    size = 0
    files = stdlib_source_files(root)
    used = 0
    for path in files:
        if size >= num_bytes:
            break
        chunk = path.read_bytes() + b"\n"
        chunks.append(chunk)
        size += len(chunk)
        used += 1
    data = b"".join(chunks)[:num_bytes]
    if len(data) < num_bytes:
        raise SystemExit(f"error: {root} holds only {len(data):,} bytes of source; asked for {num_bytes:,}")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = len(tokens) - int(len(tokens) * val_fraction)
    return Corpus(
        train=tokens[:split],
        val=tokens[split:],
        source=f"first {len(data):,} bytes of {used} *.py files (of {len(files)}) under {root}",
        num_files=used,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def windows(tokens: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """The ``context`` bytes from each start, and the byte after them."""
    positions = starts[:, None] + torch.arange(context)
    return tokens[positions], tokens[starts + context]


def val_starts(corpus: Corpus, context: int, count: int) -> Tensor:
    """``count`` validation windows (or all there are), evenly spread over the validation bytes."""
    available = len(corpus.val) - context
    count = min(count, available)
    return torch.linspace(0, available - 1, count).long()


# --- model --------------------------------------------------------------------------------------


class ByteMLP(nn.Module):
    """The next byte from the previous ``context`` bytes: embedding, linear, LayerNorm, GELU, linear."""

    def __init__(self, context: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed_dim)
        self.hidden = nn.Linear(context * embed_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.embed(inputs).flatten(1)
        return self.out(nn.functional.gelu(self.norm(self.hidden(x))))


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    # In float32 from the model's (bfloat16) logits: the loss and its log-softmax are not the model.
    return nn.functional.cross_entropy(logits.float(), targets)


@torch.no_grad()
def evaluate(model: nn.Module, corpus: Corpus, starts: Tensor, context: int) -> tuple[float, float]:
    """Mean cross-entropy (nats per byte) and next-byte accuracy over the windows at ``starts``."""
    loss_sum, correct = 0.0, 0
    for chunk in starts.split(4096):
        inputs, targets = windows(corpus.val, chunk, context)
        logits = model(inputs)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
    return loss_sum / len(starts), correct / len(starts)


def optimizer_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held per kind of tensor: params, grads and each optimizer.state key (tensors only)."""
    memory: dict[str, int] = {"param": 0, "grad": 0}
    for param in model.parameters():
        memory["param"] += param.numel() * param.element_size()
        if param.grad is not None:
            memory["grad"] += param.grad.numel() * param.grad.element_size()
        for key, value in optimizer.state[param].items():
            if torch.is_tensor(value):
                memory[key] = memory.get(key, 0) + value.numel() * value.element_size()
    return memory


# --- training -----------------------------------------------------------------------------------


def train(
    initial: nn.Module,
    corpus: Corpus,
    config: Config,
    name: str,
    *,
    log: Callable[[str], None] = print,
) -> RunResult:
    """One run of RUNS from a copy of ``initial``, on the batches every run gets."""
    dtype, options = RUNS[name]
    model = copy.deepcopy(initial).to(dtype)
    torch.manual_seed(config.seed)  # the stochastic rounding seeds are drawn from it at the first step
    optimizer = FusedAdadelta(model.parameters(), lr=config.lr, rho=config.rho, eps=config.eps, **options)
    batches = torch.Generator().manual_seed(config.seed + 1)  # afresh per run: the same batches
    curve_starts = val_starts(corpus, config.context, config.curve_val_windows)
    final_starts = val_starts(corpus, config.context, config.val_windows)
    num_starts = len(corpus.train) - config.context
    result = RunResult(name=name, dtype=str(dtype).removeprefix("torch."), options=options)
    step_seconds: list[float] = []
    iteration_seconds: list[float] = []
    block_losses: list[float] = []
    run_start = time.perf_counter()
    for step in range(1, config.steps + 1):
        start = time.perf_counter()
        starts = torch.randint(num_starts, (config.batch_size,), generator=batches)
        inputs, targets = windows(corpus.train, starts, config.context)
        loss = cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        step_start = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        step_seconds.append(end - step_start)
        iteration_seconds.append(end - start)
        block_losses.append(loss.item())
        if step % config.log_every == 0 or step == config.steps:
            result.logged_steps.append(step)
            result.logged_losses.append(statistics.fmean(block_losses))
            result.final_train_loss = result.logged_losses[-1]
            block_losses = []
        if step % config.eval_every == 0 or step == config.steps:
            result.eval_steps.append(step)
            result.eval_losses.append(evaluate(model, corpus, curve_starts, config.context)[0])
            log(
                f"{name}: step {step}/{config.steps}, train loss {result.logged_losses[-1]:.4f},"
                f" val loss {result.eval_losses[-1]:.4f}"
            )
    result.seconds = time.perf_counter() - run_start
    result.val_loss, result.val_accuracy = evaluate(model, corpus, final_starts, config.context)
    result.memory_breakdown = optimizer_memory(model, optimizer)
    result.num_params = sum(param.numel() for param in model.parameters())
    result.bytes_per_param = sum(result.memory_breakdown.values()) / result.num_params
    result.median_step_ms = statistics.median(step_seconds) * 1e3
    result.median_iteration_ms = statistics.median(iteration_seconds) * 1e3
    return result


def run_all(
    corpus: Corpus, config: Config, names: Sequence[str] = tuple(RUNS), *, log: Callable[[str], None] = print
) -> list[RunResult]:
    """Every run in ``names`` from the same float32 initial weights."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG as it was
        torch.manual_seed(config.seed)
        initial = ByteMLP(config.context, config.embed_dim, config.hidden)
        return [train(initial, corpus, config, name, log=log) for name in names]


# --- outputs ------------------------------------------------------------------------------------


def run_json(run: RunResult) -> dict[str, Any]:
    return {
        "name": run.name,
        "dtype": run.dtype,
        "options": run.options,
        "final_train_loss": run.final_train_loss,
        "val_loss": run.val_loss,
        "val_perplexity": run.val_perplexity,
        "val_accuracy": run.val_accuracy,
        "bytes_per_param": run.bytes_per_param,
        "memory_bytes": run.memory_breakdown,
        "median_step_ms": run.median_step_ms,
        "median_iteration_ms": run.median_iteration_ms,
        "train_seconds": run.seconds,
        "logged_steps": run.logged_steps,
        "logged_losses": run.logged_losses,
        "eval_steps": run.eval_steps,
        "eval_losses": run.eval_losses,
    }


def machine_description() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "adadelta_ext_kernel": adadelta_ext.cpu_kernel_isa(),
    }


def results_json(
    runs: list[RunResult],
    corpus: Corpus,
    config: Config,
    args: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Every number of the runs, with what produced them."""
    return {
        "args": args,
        "config": asdict(config),
        "torch_version": torch.__version__,
        "adadelta_ext_version": adadelta_ext.__version__,
        "python_version": platform.python_version(),
        **machine_description(),
        **extra,
        "data": {
            "source": corpus.source,
            "sha256": corpus.sha256,
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
        },
        "model": f"ByteMLP(context={config.context}, embed_dim={config.embed_dim}, hidden={config.hidden})",
        "num_params": runs[0].num_params if runs else 0,
        "loss": "cross-entropy in float32 from the model's logits (bfloat16 in the bfloat16 runs)",
        "runs": [run_json(run) for run in runs],
    }


def format_table(runs: list[RunResult]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| run | final train loss | val loss (nats/byte) | val perplexity | val next-byte accuracy"
        " | bytes/param (param+grad+state) | median step (ms) | median iteration (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.final_train_loss:.4f} | {run.val_loss:.4f} | {run.val_perplexity:.3f}"
            f" | {run.val_accuracy:.2%} | {run.bytes_per_param:.2f} | {run.median_step_ms:.3f}"
            f" | {run.median_iteration_ms:.2f} |"
        )
    return "\n".join(lines)


def gap_summary(runs: list[RunResult]) -> list[str]:
    """Each bfloat16 run's val loss against float32's, and the part of plain bfloat16's gap it closes."""
    by_name = {run.name: run for run in runs}
    if "float32" not in by_name:
        return []
    reference = by_name["float32"].val_loss
    plain = by_name.get("bfloat16")
    lines = []
    for run in runs:
        if run.name == "float32":
            continue
        line = f"- {run.name}: val loss {run.val_loss - reference:+.4f} nats/byte against float32"
        if plain is not None and run is not plain and plain.val_loss != reference:
            closed = (plain.val_loss - run.val_loss) / (plain.val_loss - reference)
            line += f", {closed:.0%} of plain bfloat16's gap closed"
        lines.append(line + ".")
    return lines


# Per run: a line style that shows through the others where curves coincide (float32 and kahan_sum do).
PLOT_STYLES: dict[str, dict[str, Any]] = {
    "float32": {"color": "black", "linewidth": 5, "alpha": 0.3},
    "bfloat16": {"color": "C3", "linewidth": 1.5},
    "bfloat16 + kahan_sum": {"color": "C0", "linewidth": 1.5},
    "bfloat16 + stochastic_round": {"color": "C2", "linewidth": 1.5, "linestyle": ":"},
}


def plot_losses(runs: list[RunResult], config: Config, path: Path) -> None:
    """Top: smoothed training loss (lines) and periodic validation loss (markers) of every run.
    Bottom: each run's losses minus float32's, where the differences show."""
    # Figure without pyplot renders a PNG with Agg and leaves the caller's matplotlib backend alone.
    figure = Figure(figsize=(9, 8))
    axes, difference_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    reference = next((run for run in runs if run.name == "float32"), None)
    for run in runs:
        style = PLOT_STYLES.get(run.name, {})
        axes.plot(run.logged_steps, run.logged_losses, label=f"{run.name} (train)", **style)
        axes.plot(run.eval_steps, run.eval_losses, marker="o", label=f"{run.name} (val)", **style)
        if reference is not None and run is not reference:
            train_difference = [
                a - b for a, b in zip(run.logged_losses, reference.logged_losses, strict=True)
            ]
            val_difference = [a - b for a, b in zip(run.eval_losses, reference.eval_losses, strict=True)]
            difference_axes.plot(run.logged_steps, train_difference, label=f"{run.name} (train)", **style)
            difference_axes.plot(
                run.eval_steps, val_difference, marker="o", label=f"{run.name} (val)", **style
            )
    axes.set_ylabel(f"cross-entropy, nats/byte\n(train: mean of {config.log_every} steps; val: markers)")
    axes.set_title(
        f"Byte-level MLP on the Python standard library, FusedAdadelta lr={config.lr}, rho={config.rho},"
        f" eps={config.eps:g}, batch {config.batch_size}",
        fontsize=10,
    )
    # The early steps dwarf the differences: show from the end of the first tenth.
    tail = [loss for run in runs for loss in run.logged_losses[len(run.logged_losses) // 10 :]]
    tail += [loss for run in runs for loss in run.eval_losses]
    if tail:
        low, high = min(tail), max(tail)
        axes.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    axes.legend(loc="upper right", fontsize=8, ncols=2)
    axes.grid(True, alpha=0.3)
    difference_axes.axhline(0, color="black", linewidth=0.8)
    difference_axes.set_xlabel("step")
    difference_axes.set_ylabel("minus float32's, nats/byte")
    if reference is not None:
        difference_axes.legend(loc="upper left", fontsize=8, ncols=2)
    difference_axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_report(results: dict[str, Any], runs: list[RunResult], path: Path) -> None:
    """report.md: the command, the machine, the table and the plot. The reading is for a person to add."""
    load_before, load_after = results["load_average_before"], results["load_average_after"]
    lines = [
        "# Pure bfloat16 training with FusedAdadelta",
        "",
        "Made with",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- Machine: {results['platform']}, {results['cpu_count']} CPUs, {results['torch_threads']}"
        f" torch thread(s), adadelta_ext CPU kernel {results['adadelta_ext_kernel']}.",
        f"- torch {results['torch_version']}, adadelta_ext {results['adadelta_ext_version']},"
        f" Python {results['python_version']}.",
        f"- Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)};"
        f" after: {', '.join(f'{x:.2f}' for x in load_after)}.",
        f"- Data: {results['data']['source']}; {results['data']['train_bytes']:,} training bytes,"
        f" {results['data']['val_bytes']:,} validation bytes (sha256 {results['data']['sha256'][:16]}...).",
        f"- Model: {results['model']}, {results['num_params']:,} parameters. {results['loss'].capitalize()}.",
        f"- Total wall time: {results['total_seconds']:.0f} s.",
        "",
        format_table(runs),
        "",
        *gap_summary(runs),
        "",
        "Bytes per parameter count every tensor the optimizer holds per param (param, grad, each"
        " optimizer.state tensor, the scalar `step` counters included) divided by the number of"
        " parameters. Validation metrics are over the held-out bytes; perplexity is per byte.",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    path.write_text("\n".join(lines))


# --- command line -------------------------------------------------------------------------------


QUICK = {"steps": 40, "log_every": 10, "eval_every": 20, "curve_val_windows": 256, "val_windows": 512}
DATA_BYTES = 2_000_000
QUICK_DATA_BYTES = 200_000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.pure_16bit_training", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a few dozen steps on a tiny slice, for tests")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--steps", type=positive_int, help=f"default {Config.steps} ({QUICK['steps']} quick)")
    parser.add_argument("--batch-size", type=positive_int, default=Config.batch_size)
    parser.add_argument("--context", type=positive_int, default=Config.context)
    parser.add_argument("--embed-dim", type=positive_int, default=Config.embed_dim)
    parser.add_argument("--hidden", type=positive_int, default=Config.hidden)
    parser.add_argument("--lr", type=float, default=Config.lr)
    parser.add_argument("--rho", type=float, default=Config.rho)
    parser.add_argument("--eps", type=float, default=Config.eps)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument(
        "--data-bytes", type=positive_int, help=f"default {DATA_BYTES:,} ({QUICK_DATA_BYTES:,} quick)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch intra-op threads (default 1: on a busy 2-core machine, 2 threads wait on each other)",
    )
    parser.add_argument(
        "--runs", nargs="+", choices=list(RUNS), default=list(RUNS), metavar="RUN", help=f"of {list(RUNS)}"
    )
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    quick = QUICK if args.quick else {}
    steps = args.steps if args.steps is not None else quick.get("steps", Config.steps)
    return Config(
        **{key: value for key, value in quick.items() if key != "steps"},
        steps=steps,
        batch_size=args.batch_size,
        context=args.context,
        embed_dim=args.embed_dim,
        hidden=args.hidden,
        lr=args.lr,
        rho=args.rho,
        eps=args.eps,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the command line; returns what it wrote to results.json."""
    args = parse_args(argv)
    config = config_from_args(args)
    data_bytes = args.data_bytes or (QUICK_DATA_BYTES if args.quick else DATA_BYTES)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        load_before = os.getloadavg()
        start = time.perf_counter()
        corpus = load_corpus(data_bytes, args.val_fraction)
        print(f"data: {corpus.source}")
        runs = run_all(corpus, config, args.runs)
        total_seconds = time.perf_counter() - start
        command_args = sys.argv[1:] if argv is None else list(argv)
        extra = {
            "command": shlex.join(["python", "-m", "examples.pure_16bit_training", *command_args]),
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "total_seconds": total_seconds,
        }
        json_args = {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        }
        results = results_json(runs, corpus, config, json_args, extra)
    finally:
        torch.set_num_threads(threads)
    print(format_table(runs))
    print("\n".join(gap_summary(runs)))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_losses(runs, config, args.out_dir / "loss_curves.png")
    write_report(results, runs, args.out_dir / "report.md")
    print(f"wrote results.json, loss_curves.png and report.md to {args.out_dir}")
    return results


if __name__ == "__main__":
    main()
