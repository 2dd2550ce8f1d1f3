"""The compiled ops and their Python entry points.

Importing this module loads ``adadelta_ext._C``, which registers
``torch.ops.adadelta_ext.fused_adadelta_`` (and its ``tensor_lr`` overload)
with a CPU kernel, a CUDA kernel where the package was built with CUDA, and a
meta kernel (the checks alone) that torch.compile traces with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.adadelta_ext.*)

_OP = "adadelta_ext::fused_adadelta_"


def backends() -> list[str]:
    """The devices this build has a fused Adadelta kernel for, e.g. ``["cpu", "cuda"]``."""
    return [
        key.lower() for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key)
    ]


def cpu_kernel_isa() -> str:
    """The instruction set the CPU kernel runs with: ``"AVX512"``, ``"AVX2"`` or ``"DEFAULT"``."""
    return torch.ops.adadelta_ext.cpu_kernel_isa()


def cpu_kernel_isas() -> list[str]:
    """The CPU kernel's builds this process can run, ascending, e.g. ``["DEFAULT", "AVX2"]``.

    Those built up to :func:`cpu_kernel_isa`; ``ATEN_CPU_CAPABILITY`` picks any of them.
    """
    return torch.ops.adadelta_ext.cpu_kernel_isas()


def fused_adadelta_(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    round_lr_product: bool = False,
    compensations: list[Tensor] | None = None,
    stochastic_round_seeds: list[int] | None = None,
) -> None:
    """One fused Adadelta step over tensors of one device, in place.

    The functional form of :class:`adadelta_ext.FusedAdadelta`: each list
    holds one entry per param, and every tensor is on the same device. ``lr``
    may be a one-element tensor on that device (read there, so a CUDA graph can
    capture it); ``round_lr_product`` then computes ``param + update * (-lr)``
    with two roundings, as ``torch.optim.Adadelta(capturable=True)`` does,
    rather than one fused multiply-add. With ``grad_scale``, grads are
    unscaled as ``GradScaler.unscale_`` does and stored back; with a nonzero
    ``found_inf`` nothing at all changes. For float16/bfloat16 params,
    ``compensations`` (one buffer of the param's shape and dtype per param)
    applies the update with Kahan summation, and ``stochastic_round_seeds``
    (one integer per param) rounds the param stochastically; at most one of the
    two. Every argument is checked before anything changes (see
    ``check_fused_adadelta``).
    """
    lr_options = {"round_lr_product": round_lr_product} if isinstance(lr, Tensor) else {}
    _overload(torch.ops.adadelta_ext.fused_adadelta_, lr)(
        params,
        grads,
        square_avgs,
        acc_deltas,
        state_steps,
        lr=lr,
        rho=rho,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
        **lr_options,
        compensations=compensations,
        stochastic_round_seeds=stochastic_round_seeds,
    )


def check_fused_adadelta(*tensor_lists: list[Tensor], **options: Any) -> None:
    """Raises what ``fused_adadelta_(*tensor_lists, **options)`` would raise, changing nothing.

    An optimizer that makes several calls (param groups, devices) checks them
    all first, so that a bad call refuses the whole step.
    """
    _overload(torch.ops.adadelta_ext.check_fused_adadelta, options["lr"])(*tensor_lists, **options)


def _overload(packet: torch._ops.OpOverloadPacket, lr: float | Tensor) -> torch._ops.OpOverload:
    return packet.tensor_lr if isinstance(lr, Tensor) else packet.default
