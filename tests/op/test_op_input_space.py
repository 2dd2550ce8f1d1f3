"""Property test (hypothesis) over the input space of adadelta_ext.fused_adadelta_: refused, or right.

test_op_matches_float64_reference.py varies the values the op computes with; this file varies
what the op is handed: the dtype of each tensor (param, grad, square_avg, acc_delta, step), its
layout in memory (contiguous, transposed, strided and offset views, channels_last, expanded, 0-d,
empty), its device (cpu and meta, and cuda where there is one), params that are views of one
buffer (overlapping or not), tensors of two roles sharing memory, lists of unequal length, and the
options (a float or a tensor lr, rho, eps, weight_decay, maximize, grad_scale, found_inf), in and
out of range.

The contract, encoded by `contract_violations` (no violation: the op must accept the case):

- dtypes: param float32, float64, float16, bfloat16, or complex64/complex128 (as pairs of reals);
  grad of the param's dtype, or float32 for a real param; square_avg and acc_delta both of the
  param's dtype, or both float32 for a float16/bfloat16 param; each step a one-element float32 or
  float64 tensor.
- devices: every tensor, a tensor lr, grad_scale and found_inf included, on the params' device
  (meta mixed with cpu is refused); all-meta input is accepted and changes nothing.
- layouts: any strided layout, but no tensor the op writes (param, square_avg, acc_delta, and grad
  when there is a grad_scale) may overlap itself, as an expanded one does; tensors of different
  roles may not share memory, but for a grad without a grad_scale, which is read as it was before
  the step (torch.optim.Adadelta's foreach path). Params may overlap one another: they are then
  stepped one after the other in list order, each seeing the earlier ones' writes
  (torch.optim.Adadelta's for-loop).
- options: lr a float or a one-element real tensor (integers too). No range of lr, rho, eps or
  weight_decay is refused (torch.optim.Adadelta checks them in __init__ only, and steps with a
  negative lr set later). A float lr, eps or weight_decay beyond float32's range is refused, with
  torch's "value cannot be converted to type float without overflow", when any param computes in
  float32 (float32, float16, bfloat16, complex64).

Cases are drawn mostly valid (about 40%), each part now and then replaced by something the contract
refuses: another dtype, device, shape or layout, a list one entry short, an option beyond float32's
range; and now and then an option outside torch.optim.Adadelta's __init__ ranges, which is accepted.
`contract_violations` decides from the drawn case alone, so that a refused valid case fails the test
as surely as an accepted invalid one. Refusals do not depend on the device: a case the contract
refuses is refused with every tensor on meta too (so the op's meta kernel checks as the others do).

The property: the op raises (RuntimeError, TypeError or ValueError) exactly when the contract
refuses the case, with a message naming one of the violations (loosely: it holds one of the
violation's MESSAGE_WORDS) and every byte of every input storage unchanged. Otherwise: with a
nonzero found_inf every byte is unchanged; else each step is increased by exactly 1, no byte
outside the views the op writes changes, and params, square_avgs, acc_deltas (and grads, unscaled,
with a grad_scale) equal the float64 reference within the bound below. That last comparison needs
rho in [0, 1] and eps >= 0: otherwise square_avg + eps can cancel to near zero, where no relative
bound holds (test_op_inputs_torch_accepts.py compares such steps with torch's own).

The reference is the formula of test_op_matches_float64_reference.py (g = grad / grad_scale with
one), applied param by param in place on float64 (complex128) copies of the inputs' storages, so
that overlapping params see one another's writes as they must in the op, with every grad as it was
before the step.

The tolerance, derived as in test_op_matches_float64_reference.py (read its docstring), for one
step from stored inputs: per element of a written tensor X of param i,

    k * ((16 u_c + 2 u_s) * magnitude + spacing)

- u_c: the unit roundoff of the compute type (2^-53 for float64/complex128 params, else 2^-24),
  for the about 16 rounded operations of a step;
- u_s: the unit roundoff of X's dtype, in which X is stored (once); where params overlap also of the
  param's dtype, as a param value stored by one param's step enters the next one's;
- spacing: the subnormal spacing of X's dtype (2^-24 for float16): the absolute error of a rounding
  into subnormals, which the relative term does not cover;
- magnitude: the same recurrence run on absolute values (as that test's `reference_adadelta`;
  |lr| and |weight_decay|, which may be negative), the scale of the terms that were rounded;
- k: how many steps an element can go through: the number of params when they are views of one
  buffer, else 1. A relative error in g reaches the update at most undiminished
  (|d update / d g| <= |update / g|), so the errors of successive steps add up.

That test's term for float16 state that underflowed in one step and feeds the next is not needed
here: states go in as exact inputs and are stored once. Cases whose exact result overflows the dtype
it is stored in are not drawn (`assume`); grad scales are powers of two, so unscaling is exact.

1000 examples take about 20 s on 2 CPU cores; cuda is drawn as a device only where there is one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

import adadelta_ext

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
REAL = (F32, F64, F16, BF16)
FLOATING = (*REAL, torch.complex64, torch.complex128)
COMPUTES_IN_FLOAT64 = (F64, torch.complex128)
INTEGRAL = (torch.int32, torch.int64)
DEVICES = ["cpu", "cuda", "meta"] if torch.cuda.is_available() else ["cpu", "meta"]
HUGE = 1e300  # beyond float32's range
ROLES = ("param", "grad", "square_avg", "acc_delta")
LISTS = ("params", "grads", "square_avgs", "acc_deltas", "state_steps")
OPERATIONS_PER_STEP = 16

# A refusal's message must contain one of the words of one of the case's violations.
MESSAGE_WORDS = {
    "lists": ("length", "same"),
    "dtype": ("type",),
    "step": ("step",),
    "shape": ("shape", "size"),
    "device": ("device", "cpu", "cuda", "meta"),
    "overlap": ("overlap", "memory", "alias", "share"),
    "lr": ("lr",),
    "overflow": ("value cannot be converted to type float without overflow",),
}

# ------------------------------------------------------------------------------------------------
# A case: how to make every argument of one call.
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How to make one tensor; `shape` None: the param's shape."""

    dtype: torch.dtype
    device: str
    layout: str = "contiguous"
    shape: tuple[int, ...] | None = None

    def __repr__(self) -> str:  # one line in hypothesis's falsifying examples
        shape = "" if self.shape is None else f", shape={self.shape}"
        return f"Spec({self.dtype}, {self.device!r}, {self.layout!r}{shape})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@dataclass(frozen=True)
class ParamCase:
    """One param and its grad, state and step (a step's shape: () or (1,), or (2,) to be refused)."""

    shape: tuple[int, ...]
    param: Spec
    grad: Spec
    square_avg: Spec
    acc_delta: Spec
    step: Spec


@dataclass(frozen=True)
class TensorOption:
    """A tensor argument: lr, grad_scale or found_inf."""

    value: float
    spec: Spec


@dataclass(frozen=True)
class Case:
    params: tuple[ParamCase, ...]
    offsets: tuple[int, ...] | None  # params are views of one buffer, at these offsets (may overlap)
    alias: tuple[str, str, int] | None  # two roles of params[0] in one buffer, the second `shift` in
    missing: str | None  # a list passed one entry short
    lr: float | str | TensorOption
    rho: float
    eps: float
    weight_decay: float
    maximize: bool
    grad_scale: TensorOption | None
    found_inf: TensorOption | None
    seed: int

    @property
    def device(self) -> str:
        return self.params[0].param.device


# ------------------------------------------------------------------------------------------------
# Strategies: mostly valid input, each part now and then replaced by something the contract refuses.
# ------------------------------------------------------------------------------------------------


def rarely(draw, percent: int) -> bool:
    """True about `percent` % of the time (less: hypothesis favours simple draws); shrinks to False."""
    return draw(st.integers(0, 99)) >= 100 - percent


def usually(draw, value, others, percent: int):
    """`value`, or each of `others` about `percent` % of the time; shrinks to `value`."""
    for other in others:
        if rarely(draw, percent):
            return other
    return value


SHAPES = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 40)),
    st.tuples(st.integers(1, 5), st.integers(0, 7)),
    st.tuples(*[st.integers(1, 3)] * 4),
)


def layouts(shape: tuple[int, ...]) -> list[str]:
    """The layouts `view_in` can give a tensor of this shape, besides "expanded"."""
    names = ["contiguous", "offset"]
    if shape:
        names.append("strided")
    if len(shape) >= 2:
        names.append("transposed")
    if len(shape) == 4:
        names.append("channels_last")
    return names


def param_case(draw, device: str, dtype: torch.dtype, in_one_buffer: bool) -> ParamCase:
    shape = draw(SHAPES)
    wrong_shapes = [(*shape[:-1], shape[-1] + 1) if shape else (1,), (1, math.prod(shape))]

    def place() -> str:
        return usually(draw, device, [d for d in DEVICES if d != device], 1)

    def spec(role: str, dtype: torch.dtype) -> Spec:
        wrong_shape = draw(st.sampled_from(wrong_shapes)) if role != "param" and rarely(draw, 1) else None
        layout = draw(st.sampled_from(layouts(shape))) if wrong_shape is None else "contiguous"
        if shape and wrong_shape is None:
            # Expanded grads are read only, unless there is a grad_scale: drawn more often.
            layout = usually(draw, layout, ["expanded"], 10 if role == "grad" else 3)
        return Spec(dtype, device if role == "param" and in_one_buffer else place(), layout, wrong_shape)

    def now_and_then_any(dtype: torch.dtype) -> torch.dtype:
        return draw(st.sampled_from(FLOATING + INTEGRAL)) if rarely(draw, 2) else dtype

    if not in_one_buffer:
        dtype = usually(draw, draw(st.sampled_from(FLOATING)) if rarely(draw, 20) else dtype, INTEGRAL, 1)
    # float32 grad and state often (the contract accepts them for some params only), any dtype rarely.
    state_dtype = usually(draw, dtype, [F32], 20)
    return ParamCase(
        shape=shape,
        param=spec("param", dtype),
        grad=spec("grad", now_and_then_any(usually(draw, dtype, [F32], 20))),
        square_avg=spec("square_avg", now_and_then_any(state_dtype)),
        acc_delta=spec("acc_delta", now_and_then_any(state_dtype)),
        step=Spec(
            usually(draw, draw(st.sampled_from([F32, F64])), [F16, torch.int64], 1),
            place(),
            shape=usually(draw, draw(st.sampled_from([(), (1,)])), [(2,)], 2),
        ),
    )


def tensor_option(draw, device: str, dtype: torch.dtype, values: list[float]) -> TensorOption:
    place = usually(draw, device, [d for d in DEVICES if d != device], 2)
    return TensorOption(draw(st.sampled_from(values)), Spec(dtype, place, shape=()))


def lr_option(draw, device: str) -> float | str | TensorOption:
    if rarely(draw, 25):
        dtype = usually(draw, draw(st.sampled_from([F32, F64, torch.int64])), [torch.complex64], 5)
        values = [0.0, 0.5, 2.0, -0.5] if dtype != torch.int64 else [0, 1, 2, -1]
        lr = tensor_option(draw, device, dtype, values)
        shape = usually(draw, draw(st.sampled_from([(), (1,)])), [(2,)], 5)
        return dataclasses.replace(lr, spec=dataclasses.replace(lr.spec, shape=shape))
    return usually(draw, draw(st.one_of(st.just(0.0), st.floats(1e-3, 10.0))), [HUGE, -0.5, "0.1"], 2)


def with_alias(draw, params: tuple[ParamCase, ...], in_one_buffer: bool) -> tuple:
    """(params, alias): two roles of params[0] of one dtype and device made to share a buffer."""
    first = params[0]
    pairs = [
        (a, b)
        for a, b in itertools.combinations(ROLES, 2)
        if getattr(first, a).dtype == getattr(first, b).dtype
        and getattr(first, a).device == getattr(first, b).device != "meta"
        and not (in_one_buffer and a == "param")
    ]
    if not pairs:
        return params, None
    a, b = draw(st.sampled_from(pairs))
    shift = draw(st.integers(0, max(math.prod(first.shape) - 1, 0)))
    contiguous = {role: Spec(getattr(first, role).dtype, getattr(first, role).device) for role in (a, b)}
    return (dataclasses.replace(first, **contiguous), *params[1:]), (a, b, shift)


@st.composite
def cases(draw) -> Case:
    device = usually(draw, draw(st.sampled_from([d for d in DEVICES if d != "meta"])), ["meta"], 10)
    dtype = usually(draw, draw(st.sampled_from(FLOATING)), INTEGRAL, 1)
    count = draw(st.integers(1, 3))
    in_one_buffer = count > 1 and rarely(draw, 25)
    params = tuple(param_case(draw, device, dtype, in_one_buffer) for _ in range(count))
    alias = None
    if rarely(draw, 5):
        params, alias = with_alias(draw, params, in_one_buffer)
    grad_scale = tensor_option(draw, device, F32, [0.5, 4.0]) if rarely(draw, 30) else None
    found_inf = tensor_option(draw, device, F32, [0.0, 1.0]) if rarely(draw, 20) else None
    return Case(
        params=params,
        offsets=tuple(draw(st.integers(0, 40)) for _ in params) if in_one_buffer else None,
        alias=alias,
        missing=draw(st.sampled_from(LISTS)) if rarely(draw, 2) else None,
        lr=lr_option(draw, device),
        rho=usually(draw, draw(st.one_of(st.sampled_from([0.0, 1.0, 0.9]), st.floats(0, 1))), [-0.5, 1.5], 2),
        eps=usually(draw, draw(st.one_of(st.just(1e-6), st.floats(1e-10, 0.1))), [HUGE, -1e-6], 2),
        weight_decay=usually(draw, draw(st.one_of(st.just(0.0), st.floats(0, 1))), [HUGE, -0.1], 2),
        maximize=draw(st.booleans()),
        grad_scale=grad_scale,
        found_inf=found_inf,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# ------------------------------------------------------------------------------------------------
# The contract.
# ------------------------------------------------------------------------------------------------


def overlaps_itself(spec: Spec, shape: tuple[int, ...]) -> bool:
    """An expanded tensor (stride 0 along its last dimension) has elements sharing memory."""
    return spec.layout == "expanded" and shape[-1] > 1 and math.prod(shape) > 0


def contract_violations(case: Case) -> list[tuple[str, str]]:
    """What the contract refuses in `case`, as (a key of MESSAGE_WORDS, what); empty: it accepts it."""
    found = []
    if case.missing:
        found.append(("lists", f"{case.missing} is one entry short"))
    for i, p in enumerate(case.params):
        dtype = p.param.dtype
        if dtype not in FLOATING:
            found.append(("dtype", f"params[{i}] is {dtype}"))
        if p.grad.dtype != dtype and not (dtype in REAL and p.grad.dtype == F32):
            found.append(("dtype", f"grads[{i}] is {p.grad.dtype} for a {dtype} param"))
        states = {p.square_avg.dtype, p.acc_delta.dtype}
        if states != {dtype} and not (dtype in (F16, BF16) and states == {F32}):
            found.append(
                ("dtype", f"the state of params[{i}] ({dtype}) is {p.square_avg.dtype}/{p.acc_delta.dtype}")
            )
        if p.step.dtype not in (F32, F64) or math.prod(p.step.shape) != 1:
            found.append(("step", f"state_steps[{i}] is {p.step.dtype} of shape {p.step.shape}"))
        for role in (*ROLES, "step"):
            if getattr(p, role).device != case.device:
                found.append(("device", f"the {role} of params[{i}] is on {getattr(p, role).device}"))
        for role in ROLES:
            spec = getattr(p, role)
            if spec.shape not in (None, p.shape):
                found.append(("shape", f"the {role} of params[{i}] has shape {spec.shape}, not {p.shape}"))
            if overlaps_itself(spec, p.shape) and (role != "grad" or case.grad_scale is not None):
                found.append(("overlap", f"the {role} of params[{i}] is written and overlaps itself"))
    if case.alias and math.prod(case.params[0].shape) > 0:
        # A read-only grad may share memory with a written tensor: it is read as it was before the step.
        if "grad" not in case.alias[:2] or case.grad_scale is not None:
            found.append(("overlap", f"the {case.alias[0]} and {case.alias[1]} of params[0] share memory"))

    lr = case.lr
    if isinstance(lr, TensorOption):
        if lr.spec.dtype.is_complex or math.prod(lr.spec.shape) != 1:
            found.append(("lr", f"lr is a {lr.spec.dtype} tensor of shape {lr.spec.shape}"))
    elif isinstance(lr, str):
        found.append(("lr", f"lr is {lr!r}"))
    for name, option in (("lr", lr), ("grad_scale", case.grad_scale), ("found_inf", case.found_inf)):
        if isinstance(option, TensorOption) and option.spec.device != case.device:
            found.append(("device", f"{name} is on {option.spec.device}"))
    huge = [name for name in ("lr", "eps", "weight_decay") if getattr(case, name) == HUGE]
    if huge and any(p.param.dtype not in COMPUTES_IN_FLOAT64 for p in case.params):
        found.append(("overflow", f"{huge} beyond float32's range for a param computing in float32"))
    return found


# ------------------------------------------------------------------------------------------------
# Making the arguments, and looking at their memory.
# ------------------------------------------------------------------------------------------------


def extent(shape: tuple[int, ...], layout: str) -> int:
    """How many elements the buffer under a view of this shape and layout has."""
    count = math.prod(shape)
    if layout == "strided":
        return 2 * count
    if layout == "offset":
        return count + 1
    if layout == "expanded":
        return math.prod(shape[:-1])
    return count


def view_in(flat: torch.Tensor, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """A view of the 1-D `flat` (of `extent(shape, layout)` elements) with this shape and layout."""
    if layout == "offset":
        return flat[1:].view(shape)
    if layout == "strided":
        return flat.view(*shape[:-1], 2 * shape[-1])[..., ::2]
    if layout == "transposed":
        return flat.view(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "channels_last":
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    if layout == "expanded":
        return flat.view(*shape[:-1], 1).expand(shape)
    return flat.view(shape)


def build(case: Case) -> tuple[dict[str, list[torch.Tensor]], dict]:
    """The op's arguments for `case`: its five lists, by name, and its keyword options."""
    generator = torch.Generator().manual_seed(case.seed)

    def buffer(count: int, spec: Spec, role: str) -> torch.Tensor:
        values = torch.randn(
            (count, 2) if spec.dtype.is_complex else (count,), generator=generator, dtype=F64
        )
        if role in ("square_avg", "acc_delta"):
            values = values.abs()
        elif role == "step":
            values = values.abs().mul(100).round()
        elif role == "grad" and case.grad_scale is not None:
            values = values * case.grad_scale.value  # grads come scaled
        if spec.dtype.is_complex:
            values = torch.view_as_complex(values)
        return values.to(dtype=spec.dtype, device=spec.device)

    def tensor(p: ParamCase, role: str, flat: torch.Tensor | None = None) -> torch.Tensor:
        spec = getattr(p, role)
        shape = p.shape if spec.shape is None else spec.shape
        if flat is None:
            flat = buffer(extent(shape, spec.layout), spec, role)
        return view_in(flat, shape, spec.layout)

    if case.offsets:
        ends = [o + extent(p.shape, p.param.layout) for o, p in zip(case.offsets, case.params, strict=True)]
        params_buffer = buffer(max(ends), case.params[0].param, "param")
    lists = {name: [] for name in LISTS}
    for i, p in enumerate(case.params):
        tensors = {}
        if case.offsets:
            tensors["param"] = tensor(p, "param", params_buffer[case.offsets[i] : ends[i]])
        if i == 0 and case.alias:
            a, b, shift = case.alias
            count = math.prod(p.shape)
            shared = buffer(count + shift, getattr(p, a), a)
            tensors[a], tensors[b] = shared[:count].view(p.shape), shared[shift : shift + count].view(p.shape)
        for role, name in zip(ROLES, LISTS, strict=False):
            lists[name].append(tensors[role] if role in tensors else tensor(p, role))
        lists["state_steps"].append(buffer(math.prod(p.step.shape), p.step, "step").view(p.step.shape))
    if case.missing:
        lists[case.missing].pop()

    def option(value):
        if isinstance(value, TensorOption):
            return torch.full(value.spec.shape, value.value, dtype=value.spec.dtype, device=value.spec.device)
        return value

    options = {name: option(getattr(case, name)) for name in ("lr", "grad_scale", "found_inf")}
    options.update(rho=case.rho, eps=case.eps, weight_decay=case.weight_decay, maximize=case.maximize)
    return lists, options


def storage_key(t: torch.Tensor) -> tuple:
    return (str(t.device), t.untyped_storage().data_ptr(), t.dtype)


def whole_storage(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """All of t's storage, as a 1-D tensor of t's dtype (or of bytes, with dtype=torch.uint8)."""
    dtype = dtype or t.dtype
    count = t.untyped_storage().nbytes() // dtype.itemsize
    return torch.empty(0, dtype=dtype, device=t.device).set_(t.untyped_storage(), 0, (count,), (1,))


def snapshot(lists: dict[str, list[torch.Tensor]], options: dict) -> dict[tuple, dict]:
    """The bytes of every storage under the arguments (meta tensors have none), with the names on it."""
    named = [(f"{name}[{i}]", t) for name in LISTS for i, t in enumerate(lists[name])]
    named += [(name, value) for name, value in options.items() if isinstance(value, torch.Tensor)]
    saved = {}
    for name, t in named:
        if t.device.type == "meta":
            continue
        key = storage_key(t)
        if key not in saved:
            saved[key] = {
                "tensor": t,
                "bytes": whole_storage(t, torch.uint8).to("cpu", copy=True),
                "names": [],
            }
        saved[key]["names"].append(name)
    return saved


def assert_unchanged(saved: dict[tuple, dict], why: str, written: list[torch.Tensor] = ()) -> None:
    """Every saved storage bit for bit as it was (NaNs too), except the elements of the `written` views."""
    for key, entry in saved.items():
        t = entry["tensor"]
        now = whole_storage(t, torch.uint8).cpu().view(-1, t.element_size())
        changed = (now != entry["bytes"].view(-1, t.element_size())).any(dim=1)
        for w in written:
            if storage_key(w) == key:
                changed.as_strided(w.shape, w.stride(), w.storage_offset()).fill_(False)
        assert not changed.any(), (
            f"{why}, yet {int(changed.sum())} elements of {' and '.join(entry['names'])} changed"
        )


# ------------------------------------------------------------------------------------------------
# The reference and the bound.
# ------------------------------------------------------------------------------------------------


def real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def partwise_abs(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(torch.view_as_real(t).abs()) if t.is_complex() else t.abs()


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype.to_real()).eps / 2


def subnormal_spacing(dtype: torch.dtype) -> float:
    finfo = torch.finfo(dtype.to_real())
    return finfo.smallest_normal * finfo.eps


def written_lists(case: Case) -> tuple[str, ...]:
    """The lists whose tensors the op writes, state_steps aside."""
    return ("params", "square_avgs", "acc_deltas") + (("grads",) if case.grad_scale is not None else ())


def reference(case: Case, lists: dict[str, list[torch.Tensor]]) -> list[tuple]:
    """(name, tensor, expected, magnitude, bound) for each tensor the op writes, steps aside (see the doc)."""
    values, magnitudes = {}, {}

    def twin(t: torch.Tensor, store: dict, transform) -> torch.Tensor:
        """A view of a float64 (complex128) copy of t's storage, one copy per storage."""
        key = storage_key(t)
        if key not in store:
            wide = torch.complex128 if t.is_complex() else F64
            store[key] = transform(whole_storage(t).to("cpu", wide, copy=True))
        return real_view(store[key].as_strided(t.shape, t.stride(), t.storage_offset()))

    lr = case.lr.value if isinstance(case.lr, TensorOption) else case.lr
    rho, eps, weight_decay = case.rho, case.eps, case.weight_decay
    # Every grad as it is before anything is written (a grad may share memory with a written tensor).
    grads = [twin(grad, values, lambda x: x).clone() for grad in lists["grads"]]
    grad_sizes = [twin(grad, magnitudes, partwise_abs).clone() for grad in lists["grads"]]
    for i in range(len(case.params)):
        value = {
            role: twin(lists[name][i], values, lambda x: x) for role, name in zip(ROLES, LISTS, strict=False)
        }
        size = {
            role: twin(lists[name][i], magnitudes, partwise_abs)
            for role, name in zip(ROLES, LISTS, strict=False)
        }
        g, g_size = grads[i], grad_sizes[i]
        if case.grad_scale is not None:
            g = g / case.grad_scale.value
            g_size = g.abs()
            value["grad"].copy_(g)
            size["grad"].copy_(g_size)
        if case.maximize:
            g = -g
        if weight_decay != 0:
            g = g + weight_decay * value["param"]
            g_size = g_size + abs(weight_decay) * size["param"]
        value["square_avg"].copy_(rho * value["square_avg"] + (1 - rho) * g * g)
        size["square_avg"].copy_(rho * size["square_avg"] + (1 - rho) * g_size * g_size)
        denominator = (value["square_avg"] + eps).sqrt()
        update = (value["acc_delta"] + eps).sqrt() / denominator * g
        update_size = (size["acc_delta"] + eps).sqrt() / denominator * g_size
        value["acc_delta"].copy_(rho * value["acc_delta"] + (1 - rho) * update * update)
        size["acc_delta"].copy_(rho * size["acc_delta"] + (1 - rho) * update_size * update_size)
        value["param"].copy_(value["param"] - lr * update)
        size["param"].copy_(size["param"] + abs(lr) * update_size)

    steps = len(case.params) if case.offsets else 1
    results = []
    for i, p in enumerate(case.params):
        compute = F64 if p.param.dtype in COMPUTES_IN_FLOAT64 else F32
        for name in written_lists(case):
            t = lists[name][i]
            stored = unit_roundoff(t.dtype)
            if steps > 1:
                stored = max(stored, unit_roundoff(p.param.dtype))
            relative = OPERATIONS_PER_STEP * unit_roundoff(compute) + 2 * stored
            magnitude = twin(t, magnitudes, None)
            bound = steps * (relative * magnitude + subnormal_spacing(t.dtype))
            results.append((f"{name}[{i}]", t, twin(t, values, None), magnitude, bound))
    return results


def representable(results: list[tuple]) -> bool:
    """Whether every exact result, and the terms that make it, fit the dtype it is stored in."""
    return all(
        bool((magnitude[expected.isfinite()] < torch.finfo(t.dtype.to_real()).max).all())
        for _, t, expected, magnitude, _ in results
    )


def assert_within_bound(name: str, ours: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    ours = real_view(ours).cpu().double()
    finite = expected.isfinite()
    torch.testing.assert_close(ours[~finite], expected[~finite], rtol=0, atol=0, equal_nan=True, msg=name)
    error = (ours - expected).abs()
    outside = finite & ~(error <= bound)
    if outside.any():
        worst = int(torch.where(outside, error - bound, -1).argmax())
        values = [x.reshape(-1)[worst].item() for x in (error, bound, ours, expected)]
        pytest.fail(
            "{}: error {:.3g} exceeds the bound {:.3g} (ours {!r}, reference {!r})".format(name, *values)
        )


# ------------------------------------------------------------------------------------------------
# The property.
# ------------------------------------------------------------------------------------------------


def check_case(case: Case) -> None:
    violations = contract_violations(case)
    event(f"refused ({violations[0][0]})" if violations else f"accepted ({case.device})")
    lists, options = build(case)
    skipped = case.found_inf is not None and case.found_inf.value != 0
    stepped = not violations and case.device != "meta" and not skipped
    # No bound holds where square_avg + eps can cancel (see the module docstring).
    compared = stepped and 0 <= case.rho <= 1 and case.eps >= 0
    results = reference(case, lists) if compared else []
    assume(representable(results))
    saved = snapshot(lists, options)
    steps_before = [step.clone() for step in lists["state_steps"]] if stepped else []
    try:
        adadelta_ext.fused_adadelta_(*lists.values(), **options)
    except (RuntimeError, TypeError, ValueError) as error:
        assert violations, f"refused, though the contract accepts it: {type(error).__name__}: {error}"
        assert_unchanged(saved, f"refused ({error})")
        words = [word for kind, _ in violations for word in MESSAGE_WORDS[kind]]
        assert any(word in str(error).lower() for word in words), (
            f"the message names none of {violations}: {error}"
        )
        return
    assert not violations, f"not refused, though the contract refuses it: {violations}"
    if not stepped:
        assert_unchanged(saved, "with a nonzero found_inf")  # all-meta: nothing to see
        return
    for index, (before, after) in enumerate(zip(steps_before, lists["state_steps"], strict=True)):
        assert torch.equal(after, before + 1), f"state_steps[{index}]: {before.item()} -> {after.item()}"
    written = [t for name in written_lists(case) for t in lists[name]] + lists["state_steps"]
    assert_unchanged(saved, "outside the views the op writes", written)
    for name, ours, expected, _, bound in results:
        assert_within_bound(name, ours, expected, bound)


@settings(derandomize=True, database=None, max_examples=1000, deadline=None)
@given(case=cases())
def test_the_op_refuses_what_the_contract_refuses_and_follows_the_reference_otherwise(case):
    check_case(case)
