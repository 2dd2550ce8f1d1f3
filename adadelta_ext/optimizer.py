"""FusedAdadelta: torch.optim.Adadelta with the whole step in one fused kernel call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._ops import check_fused_adadelta_inputs, fused_adadelta_

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed

    class DTensor:  # type: ignore[no-redef]
        """Stands in for torch.distributed.tensor.DTensor: nothing is an instance."""


_REDUCED_PRECISION = (torch.float16, torch.bfloat16)
_STATE_KEYS = ("square_avg", "acc_delta")


def _kernel_view(tensor: Tensor) -> Tensor:
    """The plain real tensor the kernel updates in place for a param, grad or state tensor.

    A DTensor (as FSDP2's fully_shard and tensor parallelism make) is updated
    through its local shard; Adadelta is elementwise, so shards step alone.
    A complex tensor is updated as pairs of reals, as torch.optim does.
    """
    if isinstance(tensor, DTensor):
        tensor = tensor._local_tensor
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _scalar_dtype() -> torch.dtype:
    # The dtype torch.optim keeps `step` in.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class FusedAdadelta(Optimizer):
    r"""Adadelta (Zeiler, 2012) whose step runs as one fused C++/CUDA pass.

    A drop-in for :class:`torch.optim.Adadelta`: the same arguments, defaults,
    errors, state keys (``step``, ``square_avg``, ``acc_delta``) and
    ``state_dict`` layout, so a checkpoint moves between the two both ways.
    Per element, with ``g`` the gradient:

    .. math::
        g &\leftarrow -g \text{ if maximize} \\
        g &\leftarrow g + \lambda\theta \text{ if } \lambda \ne 0 \\
        v &\leftarrow \rho v + (1 - \rho) g^2 \\
        \Delta &\leftarrow \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}}\, g \\
        u &\leftarrow \rho u + (1 - \rho) \Delta^2 \\
        \theta &\leftarrow \theta - \gamma \Delta

    where :math:`v` is ``square_avg``, :math:`u` is ``acc_delta``,
    :math:`\gamma` is ``lr`` and :math:`\lambda` is ``weight_decay``. One pass
    reads param, grad, square_avg and acc_delta and writes param, square_avg
    and acc_delta; float16 and bfloat16 params compute in float32.

    Beyond :class:`torch.optim.Adadelta`:

    - ``step`` counters live on their param's device (as in torch's fused Adam),
      and the kernel increments them, so no step needs the host.
    - :class:`torch.amp.GradScaler` hands ``grad_scale`` and ``found_inf`` to the
      kernel, which unscales grads in the same pass and skips the whole step
      (params, state and counters) when an inf was found, without a host sync.
    - ``fp32_state=True`` keeps ``square_avg`` and ``acc_delta`` in float32 for
      float16/bfloat16 params: more accurate, twice the state memory.

    Not supported, with a clear error: sparse gradients, ``differentiable=True``.
    ``foreach`` is accepted for compatibility and has no effect.
    """

    # GradScaler then sets self.grad_scale and self.found_inf before step().
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        fp32_state: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if differentiable:
            raise ValueError(
                "FusedAdadelta does not support differentiable=True; use torch.optim.Adadelta for that"
            )
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
        }
        # An implementation choice, not a hyperparameter: kept out of param_groups
        # so that state_dict() has torch.optim.Adadelta's layout.
        self.fp32_state = fp32_state
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(FusedAdadelta._keep_float32_state)
        self.register_load_state_dict_post_hook(FusedAdadelta._place_loaded_state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fp32_state", False)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    @staticmethod
    def _keep_float32_state(optimizer: FusedAdadelta, state_dict: dict[str, Any]) -> None:
        """Before load_state_dict casts the state to each param's dtype: keep float32 state for fp32_state.

        Without this, a float32 square_avg saved for a bfloat16 param would be
        rounded to bfloat16 and back on the way in.
        """
        optimizer._float32_state_being_loaded = {}
        if not optimizer.fp32_state:
            return
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in optimizer.param_groups for p in group["params"])
        # Mismatched group sizes are load_state_dict's own error, raised after this hook.
        for saved_id, param in zip(saved_ids, params, strict=False):
            saved = state_dict["state"].get(saved_id, {})
            if all(
                torch.is_tensor(saved.get(key)) and saved[key].dtype == torch.float32 for key in _STATE_KEYS
            ):
                optimizer._float32_state_being_loaded[param] = {key: saved[key] for key in _STATE_KEYS}

    @staticmethod
    def _place_loaded_state(optimizer: FusedAdadelta) -> None:
        """After load_state_dict: `step` on the param's device, state in the dtype this optimizer keeps.

        Optimizer.load_state_dict has already cast square_avg and acc_delta to
        the param's dtype and device, as torch does for every optimizer.
        """
        float32_state = optimizer.__dict__.pop("_float32_state_being_loaded", {})
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizer.state.get(param)
                if not state:
                    continue
                step = state["step"]
                if not torch.is_tensor(step):
                    step = torch.tensor(float(step), dtype=_scalar_dtype())
                state["step"] = step.to(device=param.device)
                for key in _STATE_KEYS:
                    value = float32_state.get(param, state)[key]
                    state[key] = value.to(device=param.device, dtype=optimizer._state_dtype(param))

    def _state_dtype(self, param: Tensor) -> torch.dtype:
        if self.fp32_state and param.dtype in _REDUCED_PRECISION:
            return torch.float32
        return param.dtype

    def _check_graph_capture(self) -> None:
        # As torch.optim does: a capture with capturable=False would bake host values into the graph.
        if torch.compiler.is_compiling() or not torch.cuda.is_available():
            return
        if torch.cuda.is_current_stream_capturing() and not all(
            group["capturable"] for group in self.param_groups
        ):
            raise RuntimeError(
                "Attempting CUDA graph capture of step() for an instance of FusedAdadelta"
                " but param_groups' capturable is False."
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        self._check_graph_capture()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        created: list[Tensor] = []  # params whose state this step made, removed if the step is refused
        groups_lists = []
        for group in self.param_groups:
            lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
            self._init_group(group, *lists, created)
            groups_lists.append(lists)
        try:
            calls = [
                call
                for group, lists in zip(self.param_groups, groups_lists, strict=True)
                if lists[0]
                for call in self._kernel_calls(group, lists)
            ]
            if len(calls) > 1:
                # Several devices: check every call's tensors before changing any.
                for tensors, _ in calls:
                    check_fused_adadelta_inputs(*tensors)
            for tensors, options in calls:
                fused_adadelta_(*tensors, **options)
        except BaseException:
            for p in created:
                del self.state[p]
            raise
        return loss

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        square_avgs: list[Tensor],
        acc_deltas: list[Tensor],
        state_steps: list[Tensor],
        created: list[Tensor],
    ) -> None:
        """Fills the lists with the group's params that have grads and their tensors, creating missing state.

        Named and called as in torch.optim.Adadelta: torch.compile then treats
        these tensors as static, so mode="reduce-overhead" can capture the step
        in a CUDA graph. Sparse grads, mismatched shapes or dtypes are left to
        the op, which checks every tensor before it changes any.
        """
        params.extend(p for p in group["params"] if p.grad is not None)
        new_params = [p for p in params if not self.state[p]]
        for p in new_params:
            self._init_state(p)
        created.extend(new_params)
        states = [self.state[p] for p in params]
        grads.extend(p.grad for p in params)
        square_avgs.extend(state["square_avg"] for state in states)
        acc_deltas.extend(state["acc_delta"] for state in states)
        state_steps.extend(state["step"] for state in states)

    def _init_state(self, param: Tensor) -> None:
        state = self.state[param]
        state["step"] = torch.zeros((), dtype=_scalar_dtype(), device=param.device)
        state_dtype = self._state_dtype(param)
        state["square_avg"] = torch.zeros_like(param, dtype=state_dtype, memory_format=torch.preserve_format)
        state["acc_delta"] = torch.zeros_like(param, dtype=state_dtype, memory_format=torch.preserve_format)

    def _kernel_calls(
        self, group: dict[str, Any], lists: tuple[list[Tensor], ...]
    ) -> Iterator[tuple[tuple[list[Tensor], ...], dict[str, Any]]]:
        """The op calls for one param group's lists: (tensor lists, options), one per device."""
        *tensor_lists, steps = lists
        params = tensor_lists[0]
        if any(p.is_complex() or isinstance(p, DTensor) for p in params):
            tensor_lists = [[_kernel_view(t) for t in tensors] for tensors in tensor_lists]

        devices = list(dict.fromkeys(p.device for p in params))
        if len(devices) == 1:
            per_device = {devices[0]: (*tensor_lists, steps)}
        else:
            per_device = {device: ([], [], [], [], []) for device in devices}
            for index, p in enumerate(params):
                for values, tensors in zip(per_device[p.device], (*tensor_lists, steps), strict=True):
                    values.append(tensors[index])

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for device, tensors in per_device.items():
            lr = group["lr"]
            if isinstance(lr, Tensor) and lr.device != device:
                lr = lr.item()
            yield (
                tensors,
                {
                    "lr": lr,
                    "rho": group["rho"],
                    "eps": group["eps"],
                    "weight_decay": group["weight_decay"],
                    "maximize": group["maximize"],
                    "grad_scale": None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                    "found_inf": None if found_inf is None else found_inf.to(device, non_blocking=True),
                },
            )
