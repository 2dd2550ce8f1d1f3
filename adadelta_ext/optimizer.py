"""FusedAdadelta: torch.optim.Adadelta with the whole step in one fused kernel call."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim.adadelta import adadelta as torch_adadelta
from torch.optim.optimizer import Optimizer, ParamsT, _get_capturable_supported_devices

from ._C import step_gathered
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
# How step_gathered rounds float16/bfloat16 params (csrc/gathered_step.cpp's Rounding).
_NEAREST, _KAHAN, _STOCHASTIC = 0, 1, 2


def _local(tensor: Tensor) -> Tensor:
    """The tensor the kernel updates in place for a param, grad or state tensor.

    A DTensor (as FSDP2's fully_shard and tensor parallelism make) is updated
    through its local shard; Adadelta is elementwise, so shards step alone.
    Complex tensors go to the op as they are: it updates them as pairs of reals.
    """
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


# NOTE [Under torch.compile]
# The op is already one fused kernel: tracing it into a graph gains nothing, and costs per tensor
# at every call (dynamo's guards, inductor's size and stride asserts on each of the five lists'
# tensors, the lists rebuilt for the op) and at compile time (1,000 params: 45 s on an H200, then
# 3.3 ms a step against 0.5-0.7 eagerly). So by default a compiled step leaves the graph (one graph
# break) and runs the eager step, C++ path included: the compiled step then costs the eager one
# plus the break. With capturable=True, the step is traced into the graph instead, as torch's
# capturable optimizers are: what mode="reduce-overhead" needs to capture it in a CUDA graph with
# the rest, and what fullgraph=True needs. The constructor's capturable decides (self.defaults):
# dynamo sets the groups' own flag on CUDA for its own reasons.
@torch.compiler.disable(
    reason="FusedAdadelta's step runs outside the graph unless it is constructed with capturable=True,"
    " which mode='reduce-overhead' and fullgraph=True need (NOTE [Under torch.compile])"
)
def _step_outside_the_graph(optimizer: FusedAdadelta) -> None:
    """A step under torch.compile with capturable=False: eager, out of the graph."""
    if not optimizer._step_gathered_in_cpp():
        optimizer._step_in_python()


@torch.compiler.disable(reason="inductor cannot compile a mutating custom op over complex tensors")
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

    - ``differentiable=True`` steps with torch.optim.Adadelta's own unfused step
      (autograd cannot differentiate the fused kernel), on this optimizer's state;
      ``fp32_state``, ``kahan_sum``, ``stochastic_round`` and GradScaler are refused with it.
    - The param groups are marked ``fused``, as those of torch's fused optimizers:
      ``load_state_dict`` then puts ``step`` on the param's device, as float32.

    Not supported, with a clear error: sparse gradients. ``foreach`` is accepted
    for compatibility and has no effect on the fused step.
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
        if differentiable and (fp32_state or kahan_sum or stochastic_round):
            raise ValueError(
                "differentiable=True steps with torch.optim.Adadelta's unfused step, which has no"
                " fp32_state, kahan_sum or stochastic_round"
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
            # Marks the groups as torch's fused optimizers are marked: Optimizer.load_state_dict
            # then moves `step` to the param's device, where the kernel increments it.
            "fused": True,
        }
        self.fp32_state = fp32_state
        self.kahan_sum = kahan_sum
        self.stochastic_round = stochastic_round
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
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)
            group.setdefault("fused", True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict of FusedAdadelta or torch.optim.Adadelta.

        Optimizer.load_state_dict casts square_avg and acc_delta to each param's
        dtype and device, as torch does for every optimizer. Then ``step`` goes
        to the param's device as a floating-point tensor, and the state to the
        dtype and layout this optimizer keeps; with ``fp32_state``, float32 state
        saved for a float16/bfloat16 param is kept as saved rather than rounded
        on the way in. That runs as the last load_state_dict pre-hook and the
        first post-hook, for this call only (copy.deepcopy and pickling drop
        hooks): so it sees what the user's pre-hooks made of the state dict, and
        the user's post-hooks see its result. As in torch, a malformed entry (a
        state without ``square_avg``, say) loads as it is, and the next step
        names it.
        """
        float32_state: dict[Tensor, dict[str, Tensor]] = {}

        def keep_float32_state(optimizer: Optimizer, loaded: dict[str, Any]) -> None:
            float32_state.update(self._saved_float32_state(loaded))

        def convert_loaded_state(optimizer: Optimizer) -> None:
            self._convert_loaded_state(float32_state)

        pre_hook = self.register_load_state_dict_pre_hook(keep_float32_state)
        post_hook = self.register_load_state_dict_post_hook(convert_loaded_state, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre_hook.remove()
            post_hook.remove()

    def _saved_float32_state(self, state_dict: dict[str, Any]) -> dict[Tensor, dict[str, Tensor]]:
        """With fp32_state: the float32 square_avg and acc_delta in a state dict, by param."""
        if not self.fp32_state:
            return {}
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        float32_state = {}
        # Mismatched group sizes are load_state_dict's own error, raised after this.
        for saved_id, param in zip(saved_ids, params, strict=False):
            saved = state_dict["state"].get(saved_id)
            if isinstance(saved, dict) and all(
                torch.is_tensor(saved.get(key)) and saved[key].dtype == torch.float32 for key in _STATE_KEYS
            ):
                float32_state[param] = {key: saved[key] for key in _STATE_KEYS}
        return float32_state

    def _convert_loaded_state(self, float32_state: dict[Tensor, dict[str, Tensor]]) -> None:
        """Each loaded state as this optimizer keeps it (see load_state_dict); entries that are
        not what a state holds are left for the next step to name."""
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not isinstance(state, dict):
                    continue
                step = state.get("step")
                if isinstance(step, (int, float)) and not isinstance(step, bool):
                    step = torch.tensor(float(step), dtype=_scalar_dtype())
                if torch.is_tensor(step) and step.numel() == 1:
                    # An integer step (torch's for-loop path takes one) counts on in floating point.
                    dtype = step.dtype if step.is_floating_point() else _scalar_dtype()
                    state["step"] = step.to(device=param.device, dtype=dtype)
                saved = float32_state.get(param, state)
                for key in _STATE_KEYS:
                    # State of another shape is left for step() to name the mismatch.
                    if torch.is_tensor(saved.get(key)) and saved[key].shape == param.shape:
                        state[key] = self._state_like(param, saved[key])

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
        if self.defaults["differentiable"]:
            with torch.enable_grad():
                self._differentiable_step()
        elif not torch.compiler.is_compiling():
            if not self._step_gathered_in_cpp():
                self._step_in_python()
        elif self.defaults["capturable"]:
            self._step_in_python()  # traced into the graph
        else:
            _step_outside_the_graph(self)  # see NOTE [Under torch.compile]
        return loss

    def _step_in_python(self) -> None:
        """The step with its op calls built in Python: where the C++ path cannot take it (see NOTE
        [Gathered in C++]), and where torch.compile traces it."""
        # Undone if the step is refused: the params whose state this step created, and, four
        # tensors each, (param, step, square_avg, acc_delta) for state it converted.
        # (Tensors only: torch.compile runs _init_group outside the trace and wraps what it adds.)
        created: list[Tensor] = []
        replaced: list[Tensor] = []
        # Params whose existing state this step gave a compensation buffer or seed, and, two
        # tensors each, (param, compensation) for compensation buffers it converted or dropped.
        completed: list[Tensor] = []
        replaced_compensations: list[Tensor] = []
        try:
            calls = []
            for group in self.param_groups:
                lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
                self._init_group(group, *lists, created, replaced, completed, replaced_compensations)
                if lists[0]:
                    calls.extend(self._kernel_calls(group, lists))
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

    # NOTE [Gathered in C++]
    # Building the op's lists in Python costs about 2 µs per param (its grad, its state, checks
    # that the state still fits it, then converting each list to C++): most of a step for many
    # small params. So an eager step first hands the param groups and the state dict to
    # adadelta_ext._C.step_gathered (csrc/gathered_step.cpp), which reads every param, grad and
    # state entry as they are at this step, in C++, and calls the op. Nothing is kept between
    # steps, so nothing can go stale: a param swapped (torch.utils.swap_tensors), a state
    # replaced or cleared, a grad set from another thread are all seen, and no tensor is held
    # after the step. It takes only the common case: every param a plain tensor on its group's
    # device whose state needs no creating or converting (see _init_group). Anything else
    # returns False, having changed nothing, and the step takes the Python path below, which
    # is also the one torch.compile traces. tests/optimizer/test_gathered_step.py holds the two
    # paths to each other.
    def _step_gathered_in_cpp(self) -> bool:
        """Steps through adadelta_ext._C.step_gathered if it can (see NOTE [Gathered in C++])."""
        if type(self.state) not in (dict, defaultdict):
            return False
        groups = []
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            device = params[0].device
            if group["capturable"] and device.type not in _get_capturable_supported_devices(False):
                return False  # the Python path raises torch's error
            options = self._call_options(group, device)
            groups.append(
                (
                    params,
                    device,
                    options["lr"],
                    options["rho"],
                    options["eps"],
                    options["weight_decay"],
                    options["maximize"],
                    options["grad_scale"],
                    options["found_inf"],
                    options.get("round_lr_product", False),
                )
            )
        rounding = _KAHAN if self.kahan_sum else _STOCHASTIC if self.stochastic_round else _NEAREST
        return step_gathered(groups, self.state, self.fp32_state, rounding)

    def _differentiable_step(self) -> None:
        """differentiable=True: torch.optim.Adadelta's own unfused step, through which autograd
        differentiates; on this optimizer's state."""
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("FusedAdadelta(differentiable=True) does not support torch.amp.GradScaler")
        for group in self.param_groups:
            lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
            self._init_group(group, *lists, [], [], [], [])
            if not lists[0]:
                continue
            torch_adadelta(
                *lists,
                capturable=group["capturable"],
                lr=group["lr"],
                rho=group["rho"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                foreach=group["foreach"],
                maximize=group["maximize"],
                differentiable=True,
                has_complex=any(p.is_complex() for p in lists[0]),
            )

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
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            self._check_loaded_state(group, index, state)
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
            elif _KAHAN_KEY in state and self.kahan_sum:
                # Left from when the param was float16/bfloat16 (before model.float(), say): what it
                # held belongs to a rounding that no longer happens, and must not come back.
                replaced_compensations.extend((p, state.pop(_KAHAN_KEY)))
            params.append(p)
            grads.append(p.grad)
            square_avgs.append(state["square_avg"])
            acc_deltas.append(state["acc_delta"])
            state_steps.append(state["step"])

    def _check_loaded_state(self, group: dict[str, Any], index: int, state: Any) -> None:
        """Raises, naming the param, if its state is not what a step can use (a malformed
        checkpoint loads as it is, as in torch; see load_state_dict)."""
        if isinstance(state, dict):
            kahan = (_KAHAN_KEY,) if self.kahan_sum and _KAHAN_KEY in state else ()
            keys = ("step", *_STATE_KEYS, *kahan)
            if not state or all(torch.is_tensor(state.get(key)) for key in keys):
                return  # made at this step, or a state to step
        where = f"FusedAdadelta: the state of param_groups[{self._group_index(group)}]['params'][{index}]"
        if not isinstance(state, dict):
            raise TypeError(f"{where} is a {type(state).__name__}, not a dict")
        for key in keys:
            if key not in state:
                raise KeyError(f"{where} has no {key!r}: it needs step, square_avg and acc_delta")
            if not torch.is_tensor(state[key]):
                raise TypeError(f"{where} has {key!r} of type {type(state[key]).__name__}, not a tensor")

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
            self._check_capturable_device(group, device)
            options = self._call_options(group, device)
            if rounded:
                states = [self.state[originals[i]] for i in indices]
                if self.kahan_sum:
                    options["compensations"] = [_local(state[_KAHAN_KEY]) for state in states]
                else:
                    options["stochastic_round_seeds"] = [state[_SEED_KEY] for state in states]
            yield tensors, options

    def _group_index(self, group: dict[str, Any]) -> int:
        """Where `group` is in param_groups, for error messages (by identity: groups hold tensors)."""
        return next(index for index, other in enumerate(self.param_groups) if other is group)

    def _check_capturable_device(self, group: dict[str, Any], device: torch.device) -> None:
        """Raises torch.optim.Adadelta's error for capturable=True on a device that cannot capture
        (as torch, not while compiling: the compiler checks CUDA graphs itself)."""
        if group["capturable"] and not torch.compiler.is_compiling():
            devices = _get_capturable_supported_devices(supports_xla=False)
            if device.type not in devices:
                raise AssertionError(
                    f"If capturable=True, params and state_steps must be on supported devices: {devices}."
                    f" param_groups[{self._group_index(group)}] has params on {device}."
                )

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
