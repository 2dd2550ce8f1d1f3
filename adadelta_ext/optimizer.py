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
# Beside them for float16/bfloat16 params: the Kahan compensation buffer (kahan_sum=True) and the
# seed of the stochastic rounding (stochastic_round=True). torch.optim.Adadelta ignores both.
_KAHAN_KEY = "kahan_comp"
_SEED_KEY = "stochastic_round_seed"


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


def _layout_differs(param: Tensor, state: Tensor) -> bool:
    """Whether a state tensor of param's shape is laid out otherwise than state made for it now."""
    if state.stride() == param.stride():
        return False
    # State of a param that is not dense (a view) is contiguous, not of the param's strides:
    # compare with what preserve_format makes, on meta (no memory to allocate or fill).
    layout = torch.empty_like(param, device="meta", memory_format=torch.preserve_format)
    return layout.stride() != state.stride()


def _scalar_dtype() -> torch.dtype:
    # The dtype torch.optim keeps `step` in.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# Implementation choices rather than hyperparameters: attributes, kept out of param_groups so that
# state_dict() has torch.optim.Adadelta's layout.
_OPTIMIZER_OPTIONS = ("fp32_state", "kahan_sum", "stochastic_round")


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
    - Pure float16/bfloat16 training that keeps up with float32, where updates
      are smaller than half the spacing of a weight's dtype around it (lost,
      every step, by round-to-nearest). For float16/bfloat16 params only (no
      effect on others), one of:

      - ``kahan_sum=True`` applies each update with Kahan summation: what
        rounding the param lost is kept in ``state["kahan_comp"]`` (the param's
        dtype: +2 bytes of memory and +4 of traffic per element) and added to
        the next update. Deterministic.
      - ``stochastic_round=True`` rounds each param up or down at random, with
        probability by distance, so updates are kept on average. No memory;
        the random bits hash (seed, step, element index), the seed drawn from
        torch's default generator into ``state["stochastic_round_seed"]``.

      Both keys are saved in ``state_dict()`` and ignored by
      :class:`torch.optim.Adadelta`; state without them (a torch checkpoint)
      gets a fresh buffer or seed at the next step.
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
        kahan_sum: bool = False,
        stochastic_round: bool = False,
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
        if kahan_sum and stochastic_round:
            raise ValueError("kahan_sum and stochastic_round exclude each other: choose one")
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
        self.fp32_state = fp32_state
        self.kahan_sum = kahan_sum
        self.stochastic_round = stochastic_round
        self._kept = None  # see NOTE [Kept calls]
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps defaults, state and param_groups only:
        # copy.deepcopy and pickle would otherwise drop these options.
        options = {name: getattr(self, name) for name in _OPTIMIZER_OPTIONS}
        return {**super().__getstate__(), **options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name in _OPTIMIZER_OPTIONS:
            self.__dict__.setdefault(name, False)
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
        # Params whose existing state this step gave a compensation buffer or seed, and, two
        # tensors each, (param, compensation) for compensation buffers it converted.
        completed: list[Tensor] = []
        replaced_compensations: list[Tensor] = []
        try:
            calls = []
            group_calls = []
            for group in self.param_groups:
                lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
                self._init_group(group, *lists, created, replaced, completed, replaced_compensations)
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
            for p in completed:
                self.state[p].pop(_KAHAN_KEY if self.kahan_sum else _SEED_KEY)
            for index in range(0, len(replaced_compensations), 2):
                p, previous = replaced_compensations[index : index + 2]
                self.state[p][_KAHAN_KEY] = previous
            raise
        if not torch.compiler.is_compiling():
            self._keep_calls(group_calls)
        return loss

    # NOTE [Kept calls]
    # Building the op's lists costs Python work per param (its grad, its state, checks that the
    # state still fits it) and converting them to C++ more: microseconds per param, most of a
    # step for many small params. So after a step the lists stay in C++ (KeptStepLists,
    # csrc/kept_step_lists.cpp), and the next step reuses them while nothing they came from
    # changed: the same state dict and number of entries, the same options (fp32_state, kahan_sum,
    # stochastic_round), the same params in every group (by identity), grads on the same params,
    # and every param's dtype, device, shape and strides (checked in C++, which also reads the
    # grads). Anything else takes the full path, which
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
            for (params, _, square_avgs, acc_deltas, state_steps), options in calls:
                if not all(type(p) is torch.nn.Parameter or type(p) is Tensor for p in params):
                    return  # DTensor (its grad is not its local tensor's) or another subclass
                if any(p.is_complex() for p in params):
                    return  # outside torch.compile's graph: the full path
                lists = torch.classes.adadelta_ext.KeptStepLists(
                    params,
                    square_avgs,
                    acc_deltas,
                    state_steps,
                    options.get("compensations", []),
                    options.get("stochastic_round_seeds", []),
                )
                kept_lists.append((lists, params[0].device))
            kept_groups.append((tuple(group["params"]), without_grad, kept_lists))
        options = tuple(getattr(self, name) for name in _OPTIMIZER_OPTIONS)
        self._kept = (self.state, len(self.state), options, kept_groups)

    def _step_kept_calls(self) -> bool:
        """Steps with the kept calls if they still hold (see NOTE [Kept calls]); False if not."""
        if self._kept is None:
            return False
        state, state_size, options, kept_groups = self._kept
        if (
            state is not self.state
            or len(state) != state_size
            or options != tuple(getattr(self, name) for name in _OPTIMIZER_OPTIONS)
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
        # As the full path: with several calls, every one is checked before any changes a tensor.
        # A call returns False, having done nothing, if its lists no longer hold; no user code runs
        # between the checks and the steps, so only the first pass can find that.
        for check_only in (True, False) if len(calls) > 1 else (False,):
            for lists, options in calls:
                lr = options["lr"]
                if not lists.call(
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
                ):
                    return False
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
        completed: list[Tensor],
        replaced_compensations: list[Tensor],
    ) -> None:
        """Fills the lists with the group's params that have grads and their tensors.

        Named and called as in torch.optim.Adadelta: torch.compile then treats
        these tensors as static, so mode="reduce-overhead" can capture the step
        in a CUDA graph. Missing state is created, and state whose param changed
        dtype, device or memory format since is converted, each recorded in
        `created` or `replaced` (see step). Sparse grads, mismatched shapes or dtypes are left to the op,
        which checks every tensor before it changes any. With kahan_sum or
        stochastic_round, a float16/bfloat16 param's state without a compensation
        buffer or seed (made before the option, or by torch.optim.Adadelta) gets a
        fresh one (`completed`); a compensation buffer is converted with its param
        (`replaced_compensations`).
        """
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            new = not state
            if new:
                created.append(p)
                state["step"] = torch.zeros((), dtype=_scalar_dtype(), device=p.device)
                state["square_avg"] = self._state_like(p)
                state["acc_delta"] = self._state_like(p)
            elif self._state_needs_converting(p, state["square_avg"]):
                replaced.extend((p, state["step"], *(state[key] for key in _STATE_KEYS)))
                state["step"] = state["step"].to(p.device)
                for key in _STATE_KEYS:
                    state[key] = self._state_like(p, state[key])
            if p.dtype in _REDUCED_PRECISION:
                self._init_rounding_state(p, state, new, completed, replaced_compensations)
            params.append(p)
            grads.append(p.grad)
            square_avgs.append(state["square_avg"])
            acc_deltas.append(state["acc_delta"])
            state_steps.append(state["step"])

    def _init_rounding_state(
        self,
        p: Tensor,
        state: dict[str, Any],
        new: bool,
        completed: list[Tensor],
        replaced_compensations: list[Tensor],
    ) -> None:
        """A float16/bfloat16 param's compensation buffer (kahan_sum) or seed (stochastic_round)."""
        if self.kahan_sum:
            compensation = state.get(_KAHAN_KEY)
            if compensation is None:
                state[_KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not new:
                    completed.append(p)
            elif compensation.shape == p.shape and (
                compensation.dtype != p.dtype
                or compensation.device != p.device
                or _layout_differs(p, compensation)
            ):
                replaced_compensations.extend((p, compensation))
                state[_KAHAN_KEY] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(
                    compensation
                )
        elif self.stochastic_round and _SEED_KEY not in state:
            # From torch's default generator, so torch.manual_seed governs it.
            state[_SEED_KEY] = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
            if not new:
                completed.append(p)

    def _state_needs_converting(self, param: Tensor, square_avg: Tensor) -> bool:
        """Whether param changed dtype, device or memory format since its state was made.

        (State of another shape is left to the op, which names the mismatch.)
        """
        if square_avg.shape != param.shape:
            return False
        if square_avg.dtype != self._state_dtype(param) or square_avg.device != param.device:
            return True
        return _layout_differs(param, square_avg)

    def _kernel_calls(
        self, group: dict[str, Any], lists: tuple[list[Tensor], ...]
    ) -> Iterator[tuple[tuple[list[Tensor], ...], dict[str, Any]]]:
        """The op calls for one param group's lists: (tensor lists, options), one per device, and,
        with kahan_sum or stochastic_round, one for the device's float16/bfloat16 params, which
        take their compensation buffers or seeds, and one for the rest."""
        originals = lists[0]
        if any(isinstance(p, DTensor) for p in originals):
            lists = tuple([_local(t) for t in tensors] for tensors in lists)
        rounding = self.kahan_sum or self.stochastic_round

        # One call per device, not Optimizer._group_tensors_by_device_and_dtype's one per
        # (device, dtype): the op takes mixed dtypes in one pass, and an error then names a
        # param by its index in the group, not in a per-dtype sublist.
        keys = [(p.device, rounding and p.dtype in _REDUCED_PRECISION) for p in lists[0]]
        distinct = list(dict.fromkeys(keys))
        per_call = [(distinct[0], lists, range(len(keys)))]
        if len(distinct) > 1:
            per_call = []
            for key in distinct:
                indices = [i for i, k in enumerate(keys) if k == key]
                per_call.append((key, tuple([t[i] for i in indices] for t in lists), indices))

        for (device, rounded), tensors, indices in per_call:
            options = self._call_options(group, device)
            if rounded:
                states = [self.state[originals[i]] for i in indices]
                if self.kahan_sum:
                    options["compensations"] = [_local(state[_KAHAN_KEY]) for state in states]
                else:
                    options["stochastic_round_seeds"] = [state[_SEED_KEY] for state in states]
            yield tensors, options

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
