"""The tutorial's hand-written Adadelta step, kept as the reference the tests compare with.

From ``seed-adadelta-tutorial.py.txt`` (see the project's ``REFERENCE.md``): for
each parameter ``theta`` with gradient ``g``, and state ``s`` (``sqrs``) and
``delta`` (``deltas``) that start as zeros,

    s      = rho * s + (1 - rho) * g**2
    g'     = sqrt(delta + eps) / sqrt(s + eps) * g
    delta  = rho * delta + (1 - rho) * g'**2
    theta  = theta - g'

with ``eps = 1e-6`` and no learning rate. It is ``torch.optim.Adadelta`` with
``lr=1, weight_decay=0, maximize=False``. The tutorial rebinds ``param.data``;
this version updates it in place, which changes no value.
"""

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
