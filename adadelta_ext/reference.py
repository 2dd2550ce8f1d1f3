"""The hand-written Adadelta step of the PyTorch tutorial this project started from, kept as a reference.

The tutorial (a notebook: a 784-200-10 MLP on MNIST, ``rho=0.9``) writes the step
itself, in ``adadelta`` below, with ``sqrs`` and ``deltas`` starting as zeros,
``eps = 1e-6`` and no learning rate: it is the update of :class:`FusedAdadelta`
(stated in its docstring, and in ``csrc/adadelta_math.h``) with ``lr=1``,
``weight_decay=0`` and ``maximize=False``. The tutorial rebinds ``param.data``;
this version updates it in place, which changes no value."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

EPS = 1e-6


def init_state(parameters: Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The tutorial's ``sqrs`` and ``deltas``: zeros shaped like each parameter."""
    parameters = list(parameters)
    sqrs = [torch.zeros_like(param) for param in parameters]
    deltas = [torch.zeros_like(param) for param in parameters]
    return sqrs, deltas


@torch.no_grad()
def adadelta(parameters: Iterable[Tensor], sqrs: list[Tensor], deltas: list[Tensor], rho: float) -> None:
    """One step of the tutorial's Adadelta, in place, on every parameter that has a gradient."""
    for param, sqr, delta in zip(parameters, sqrs, deltas, strict=True):
        if param.grad is None:
            continue
        grad = param.grad
        sqr[:] = rho * sqr + (1 - rho) * grad**2
        cur_delta = torch.sqrt(delta + EPS) / torch.sqrt(sqr + EPS) * grad
        delta[:] = rho * delta + (1 - rho) * cur_delta**2
        param.sub_(cur_delta)
