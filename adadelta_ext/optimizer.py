"""FusedAdadelta: torch.optim.Adadelta with the whole step in one fused kernel call."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._ops import check_fused_adadelta, fused_adadelta_

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed

    class DTensor:  # type: ignore[no-redef]
        """Stands in for torch.distributed.tensor.DTensor: nothing is an instance."""


_REDUCED_PRECISION = (torch.float16, torch.bfloat16)
_STATE_KEYS = ("square_avg", "acc_delta")


def _local(tensor: Tensor) -> Tensor:
    """The tensor the kernel updates in place for a param, grad or state tensor.

    A DTensor (as FSDP2's fully_shard and tensor parallelism make) is updated
    through its local shard; Adadelta is elementwise, so shards step alone.
    Complex tensors go to the op as they are: it updates them as pairs of reals.
    """
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


@torch.compiler.disable
def _fused_adadelta_outside_the_graph(*tensor_lists: list[Tensor], **options: Any) -> None:
    """The op for complex params, never traced by torch.compile: a graph break.

    inductor (torch 2.13) fails on any mutating custom op over complex tensors
    ("auto_functionalized_v2 was not removed"), viewed as real or not. Gating
    on torch.compiler.is_compiling() would not do: after the graph break, dynamo
    runs step() eagerly and compiles the frames it calls one by one.
    """
    fused_adadelta_(*tensor_lists, **options)


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
    - Grads of another dtype than their param (torch's ``grad_dtype``, e.g.
      float32 grads on bfloat16 weights) are read as they are, in the same pass.
    - State follows its param: if the param's dtype, device or memory format
      changes (``model.double()``, ``model.to(memory_format=torch.channels_last)``),
      the state is converted at the next step, so the kernel keeps its fast path.
    - Every group is checked before any changes: a refused step changes nothing.

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
        self._kept = None  # see NOTE [Kept calls]
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps defaults, state and param_groups only:
        # copy.deepcopy and pickle would otherwise drop fp32_state.
        return {**super().__getstate__(), "fp32_state": self.fp32_state}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fp32_state", False)
        self._kept = None
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict of FusedAdadelta or torch.optim.Adadelta.

        Optimizer.load_state_dict casts square_avg and acc_delta to each param's
        dtype and device, as torch does for every optimizer. Then ``step`` goes
        to the param's device and the state to the dtype and layout this
        optimizer keeps; with ``fp32_state``, float32 state saved for a
        float16/bfloat16 param is kept as saved rather than rounded on the way in.
        (An override rather than load_state_dict hooks, which copy.deepcopy and
        pickling drop.)
        """
        float32_state = self._saved_float32_state(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                step = state["step"]
                if not torch.is_tensor(step):
                    step = torch.tensor(float(step), dtype=_scalar_dtype())
                state["step"] = step.to(device=param.device)
                saved = float32_state.get(param, state)
                for key in _STATE_KEYS:
                    # State of another shape is left for step() to name the mismatch.
                    if saved[key].shape == param.shape:
                        state[key] = self._state_like(param, saved[key])

    def _saved_float32_state(self, state_dict: dict[str, Any]) -> dict[Tensor, dict[str, Tensor]]:
        """With fp32_state: the float32 square_avg and acc_delta in a state dict, by param."""
        if not self.fp32_state:
            return {}
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        float32_state = {}
        # Mismatched group sizes are load_state_dict's own error, raised after this.
        for saved_id, param in zip(saved_ids, params, strict=False):
            saved = state_dict["state"].get(saved_id, {})
            if all(
                torch.is_tensor(saved.get(key)) and saved[key].dtype == torch.float32 for key in _STATE_KEYS
            ):
                float32_state[param] = {key: saved[key] for key in _STATE_KEYS}
        return float32_state

    def _state_dtype(self, param: Tensor) -> torch.dtype:
        if self.fp32_state and param.dtype in _REDUCED_PRECISION:
            return torch.float32
        return param.dtype

    def _state_like(self, param: Tensor, value: Tensor | None = None) -> Tensor:
        """A state tensor for param: its device and memory format, this optimizer's state dtype.

        Zeros, or `value` converted. In the param's own layout (as torch.optim
        creates state, with preserve_format), so that the kernel walks all four
        tensors as one flat array instead of through copies.
        """
        state = torch.empty_like(param, dtype=self._state_dtype(param), memory_format=torch.preserve_format)
        return state.zero_() if value is None else state.copy_(value)

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
        if not torch.compiler.is_compiling() and self._step_kept_calls():
            return loss

        # Undone if the step is refused: the params whose state this step created, and, four
        # tensors each, (param, step, square_avg, acc_delta) for state it converted.
        # (Tensors only: torch.compile runs _init_group outside the trace and wraps what it adds.)
        created: list[Tensor] = []
        replaced: list[Tensor] = []
        try:
            calls = []
            group_calls = []
            for group in self.param_groups:
                lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
                self._init_group(group, *lists, created, replaced)
                group_calls.append(list(self._kernel_calls(group, lists)) if lists[0] else [])
                calls.extend(group_calls[-1])
            if len(calls) > 1:
                # Several groups or devices: check every call before any changes a tensor.
                for tensors, options in calls:
                    check_fused_adadelta(*tensors, **options)
            for tensors, options in calls:
                if any(p.is_complex() for p in tensors[0]):
                    _fused_adadelta_outside_the_graph(*tensors, **options)
                else:
                    fused_adadelta_(*tensors, **options)
        except BaseException:
            for p in created:
                del self.state[p]
            for index in range(0, len(replaced), 4):
                p, *previous = replaced[index : index + 4]
                self.state[p].update(zip(("step", *_STATE_KEYS), previous, strict=True))
            raise
        if not torch.compiler.is_compiling():
            self._keep_calls(group_calls)
        return loss

    # NOTE [Kept calls]
    # Building the op's lists costs Python work per param (its grad, its state, checks that the
    # state still fits it) and converting them to C++ more: microseconds per param, most of a
    # step for many small params. So after a step the lists stay in C++ (KeptStepLists,
    # csrc/kept_step_lists.cpp), and the next step reuses them while nothing they came from
    # changed: the same state dict and number of entries, the same params in every group (by
    # identity), grads on the same params, and every param's dtype, device, shape and strides
    # (checked in C++, which also reads the grads). Anything else takes the full path, which
    # builds them anew. A state tensor replaced other than through load_state_dict (which makes a
    # new state dict) is not seen: change state in place, or through load_state_dict.
    def _keep_calls(self, group_calls: list[list[tuple[tuple[list[Tensor], ...], dict[str, Any]]]]) -> None:
        """Keeps this step's op calls for the next step, where they can be kept (see NOTE [Kept calls])."""
        self._kept = None
        kept_groups = []
        for group, calls in zip(self.param_groups, group_calls, strict=True):
            stepped = {id(p) for tensors, _ in calls for p in tensors[0]}
            without_grad = tuple(p for p in group["params"] if id(p) not in stepped)
            kept_lists = []
            for (params, _, square_avgs, acc_deltas, state_steps), _ in calls:
                if not all(type(p) is torch.nn.Parameter or type(p) is Tensor for p in params):
                    return  # DTensor (its grad is not its local tensor's) or another subclass
                if any(p.is_complex() for p in params):
                    return  # outside torch.compile's graph: the full path
                lists = torch.classes.adadelta_ext.KeptStepLists(params, square_avgs, acc_deltas, state_steps)
                kept_lists.append((lists, params[0].device))
            kept_groups.append((tuple(group["params"]), without_grad, kept_lists))
        self._kept = (self.state, len(self.state), self.fp32_state, kept_groups)

    def _step_kept_calls(self) -> bool:
        """Steps with the kept calls if they still hold (see NOTE [Kept calls]); False if not."""
        if self._kept is None:
            return False
        state, state_size, fp32_state, kept_groups = self._kept
        if (
            state is not self.state
            or len(state) != state_size
            or fp32_state != self.fp32_state
            or len(kept_groups) != len(self.param_groups)
        ):
            return False
        calls = []
        for group, (params, without_grad, kept_lists) in zip(self.param_groups, kept_groups, strict=True):
            group_params = group["params"]
            if len(group_params) != len(params) or not all(map(operator.is_, group_params, params)):
                return False
            if any(p.grad is not None for p in without_grad):
                return False
            calls += [(lists, self._call_options(group, device)) for lists, device in kept_lists]
        if not all(lists.ready() for lists, _ in calls):
            return False
        # As the full path: with several calls, every one is checked before any changes a tensor.
        for check_only in (True, False) if len(calls) > 1 else (False,):
            for lists, options in calls:
                lr = options["lr"]
                lists.call(
                    check_only,
                    0.0 if isinstance(lr, Tensor) else lr,
                    lr if isinstance(lr, Tensor) else None,
                    options["rho"],
                    options["eps"],
                    options["weight_decay"],
                    options["maximize"],
                    options["grad_scale"],
                    options["found_inf"],
                    options.get("round_lr_product", False),
                )
        return True

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        square_avgs: list[Tensor],
        acc_deltas: list[Tensor],
        state_steps: list[Tensor],
        created: list[Tensor],
        replaced: list[Tensor],
    ) -> None:
        """Fills the lists with the group's params that have grads and their tensors.

        Named and called as in torch.optim.Adadelta: torch.compile then treats
        these tensors as static, so mode="reduce-overhead" can capture the step
        in a CUDA graph. Missing state is created, and state whose param changed
        dtype, device or memory format since is converted, each recorded in
        `created` or `replaced` (see step). Sparse grads, mismatched shapes or dtypes are left to the op,
        which checks every tensor before it changes any.
        """
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                created.append(p)
                state["step"] = torch.zeros((), dtype=_scalar_dtype(), device=p.device)
                state["square_avg"] = self._state_like(p)
                state["acc_delta"] = self._state_like(p)
            elif self._state_needs_converting(p, state["square_avg"]):
                replaced.extend((p, state["step"], *(state[key] for key in _STATE_KEYS)))
                state["step"] = state["step"].to(p.device)
                for key in _STATE_KEYS:
                    state[key] = self._state_like(p, state[key])
            params.append(p)
            grads.append(p.grad)
            square_avgs.append(state["square_avg"])
            acc_deltas.append(state["acc_delta"])
            state_steps.append(state["step"])

    def _state_needs_converting(self, param: Tensor, square_avg: Tensor) -> bool:
        """Whether param changed dtype, device or memory format since its state was made.

        (State of another shape is left to the op, which names the mismatch.)
        """
        if square_avg.shape != param.shape:
            return False
        if square_avg.dtype != self._state_dtype(param) or square_avg.device != param.device:
            return True
        if square_avg.stride() == param.stride():
            return False
        # State of a param that is not dense (a view) is contiguous, not of the param's strides:
        # compare with what preserve_format makes, on meta (no memory to allocate or fill).
        layout = torch.empty_like(param, device="meta", memory_format=torch.preserve_format)
        return layout.stride() != square_avg.stride()

    def _kernel_calls(
        self, group: dict[str, Any], lists: tuple[list[Tensor], ...]
    ) -> Iterator[tuple[tuple[list[Tensor], ...], dict[str, Any]]]:
        """The op calls for one param group's lists: (tensor lists, options), one per device."""
        if any(isinstance(p, DTensor) for p in lists[0]):
            lists = tuple([_local(t) for t in tensors] for tensors in lists)
        params = lists[0]

        # One call per device, not Optimizer._group_tensors_by_device_and_dtype's one per
        # (device, dtype): the op takes mixed dtypes in one pass, and an error then names a
        # param by its index in the group, not in a per-dtype sublist.
        devices = list(dict.fromkeys(p.device for p in params))
        per_device = [(devices[0], lists)]
        if len(devices) > 1:
            per_device = []
            for device in devices:
                indices = [i for i, p in enumerate(params) if p.device == device]
                per_device.append((device, tuple([t[i] for i in indices] for t in lists)))

        for device, tensors in per_device:
            yield tensors, self._call_options(group, device)

    def _call_options(self, group: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The op's options for the group's params on `device`."""
        # torch.optim.Adadelta's own roundings: a tensor lr (on any device) under capturable is
        # applied as param + update * (-lr), anything else as one fused multiply-add.
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device != device:
            lr = lr.to(device) if group["capturable"] else lr.item()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        return {
            "lr": lr,
            **({"round_lr_product": group["capturable"]} if isinstance(lr, Tensor) else {}),
            "rho": group["rho"],
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "maximize": group["maximize"],
            "grad_scale": None if grad_scale is None else grad_scale.to(device, non_blocking=True),
            "found_inf": None if found_inf is None else found_inf.to(device, non_blocking=True),
        }
