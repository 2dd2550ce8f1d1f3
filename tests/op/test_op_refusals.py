"""adadelta_ext.fused_adadelta_ called directly with what it does not support: a RuntimeError,
never a crash or a silent no-op, and not one byte of any input changed.

Most cases spoil the second of two entries, so that the first, which the kernel would otherwise
update, shows that every entry is checked before anything is written. Cases from the regressions
of issue 9 say which of its defects they cover.
"""

from __future__ import annotations

import re

import pytest
import torch
from optim_testing import (
    DEVICES,
    OP_OPTIONS,
    assert_unchanged,
    lazily_conjugated,
    lazily_negated,
    op_lists,
    snapshot,
)

import adadelta_ext
from adadelta_ext._ops import check_fused_adadelta

TWO_ENTRIES = [(3, 2), (3, 2)]


def one_grad_fewer(lists, options):
    lists["grads"].pop()


def integer_params(lists, options):
    lists["params"] = [p.long() for p in lists["params"]]
    lists["grads"] = [g.long() for g in lists["grads"]]


def grad_of_other_dtype(lists, options):
    lists["grads"][1] = lists["grads"][1].double()


def grad_of_a_dtype_without_kernel(lists, options):
    # Issue 9, defect 7: float32 grads of another param dtype are accepted, not these.
    lists["grads"][1] = lists["grads"][1].half()


def state_of_other_dtype(lists, options):
    lists["square_avgs"][1] = lists["square_avgs"][1].double()


def float64_params_with_state_of(state_dtype):
    # Issue 9, defect 1: float64 params with float32 state (after `model.double()`) corrupted the heap.
    def spoil(lists, options):
        lists["params"][1], lists["grads"][1] = lists["params"][1].double(), lists["grads"][1].double()
        lists["square_avgs"][1] = lists["square_avgs"][1].to(state_dtype)
        lists["acc_deltas"][1] = lists["acc_deltas"][1].to(state_dtype)

    return spoil


def state_of_other_shape(lists, options):
    lists["acc_deltas"][1] = lists["acc_deltas"][1].t()


def state_sharing_memory_with_its_param(lists, options):
    # Issue 9, defect 4: square_avg is the param itself.
    lists["square_avgs"][1] = lists["params"][1]


def expanded_grad_with_grad_scale(lists, options):
    # Issue 9, defect 10: unscaling writes the grad, and an expanded one was refused only after writing.
    lists["grads"][1] = torch.ones(1, device=lists["grads"][1].device).expand(3, 2)
    options["grad_scale"] = torch.tensor(2.0, device=lists["grads"][1].device)


def grad_sharing_memory_with_its_param_with_grad_scale(lists, options):
    # Without grad_scale a grad is read through a copy (NOTE [Grads read through a copy]); with one,
    # the grad is written: unscaling it would write the param.
    lists["grads"][1] = lists["params"][1]
    options["grad_scale"] = torch.tensor(2.0, device=lists["grads"][1].device)


# NOTE [Repeated entries]: an entry may repeat another whole, and be stepped twice, but not in part.


def param_listed_twice_with_grad_scale(lists, options):
    # Its grad would be unscaled twice.
    for tensors in lists.values():
        tensors[1] = tensors[0]
    options["grad_scale"] = torch.tensor(2.0, device=lists["grads"][1].device)


def param_listed_twice_with_an_acc_delta_of_its_own(lists, options):
    for name, tensors in lists.items():
        if name != "acc_deltas":
            tensors[1] = tensors[0]


def square_entry_and_its_transpose(lists, options):
    # One range for each tensor and its transpose: the entries share memory, but are not one.
    for name, tensors in lists.items():
        square = tensors[0].new_ones(3, 3)
        tensors[0], tensors[1] = (square, square.t()) if name != "state_steps" else (tensors[0],) * 2


# Either state of entries 0 and 1, named in the order of their addresses.
SQUARE_STATE_SHARED = r"(square_avgs|acc_deltas)\[[01]\] and \1\[[01]\] share memory"


def integer_step(lists, options):
    lists["state_steps"][1] = lists["state_steps"][1].long()


def step_of_two_elements(lists, options):
    lists["state_steps"][1] = lists["state_steps"][1].repeat(2)


def tensor_lr_of_two_elements(lists, options):
    options["lr"] = torch.tensor([0.1, 0.2], device=lists["params"][0].device)


def integer_grad_scale(lists, options):
    options["grad_scale"] = torch.tensor(2, device=lists["params"][0].device)


def param_requiring_grad_in_grad_mode(lists, options):
    # The op has no derivative: autograd could not follow its update (tests run in grad mode).
    lists["params"][1].requires_grad_()


def state_requiring_grad_in_grad_mode(lists, options):
    lists["acc_deltas"][1].requires_grad_()


def compensation_for_a_float32_param(lists, options):
    options["compensations"] = [torch.zeros_like(p) for p in lists["params"]]


def compensation_of_other_dtype(lists, options):
    bfloat16_params(lists)
    options["compensations"] = [torch.zeros_like(p) for p in lists["params"]]
    options["compensations"][1] = options["compensations"][1].float()


def compensation_sharing_memory_with_its_param(lists, options):
    bfloat16_params(lists)
    options["compensations"] = [torch.zeros_like(p) for p in lists["params"]]
    options["compensations"][1] = lists["params"][1]


def one_seed_fewer(lists, options):
    bfloat16_params(lists)
    options["stochastic_round_seeds"] = [1]


def seed_for_a_float32_param(lists, options):
    options["stochastic_round_seeds"] = [1, 2]


def compensations_and_seeds(lists, options):
    bfloat16_params(lists)
    options["compensations"] = [torch.zeros_like(p) for p in lists["params"]]
    options["stochastic_round_seeds"] = [1, 2]


# A written tensor behind a lazy bit (NOTE [Grads behind a lazy bit] in csrc/fused_adadelta.cpp):
# writing through the negative or conjugate bit would store the values negated or conjugated, and
# a ZeroTensor has no memory.


def param_with_the_negative_bit(lists, options):
    lists["params"][1] = lazily_negated(lists["params"][1])


def step_with_the_negative_bit(lists, options):
    lists["state_steps"][1] = lazily_negated(lists["state_steps"][1])


def square_avg_with_the_conjugate_bit(lists, options):
    for name in lists:
        lists[name] = [t.to(torch.complex64) if name != "state_steps" else t for t in lists[name]]
    lists["square_avgs"][1] = lazily_conjugated(lists["square_avgs"][1])


def acc_delta_that_is_a_zero_tensor(lists, options):
    acc_delta = lists["acc_deltas"][1]
    lists["acc_deltas"][1] = torch._efficientzerotensor(acc_delta.shape, device=acc_delta.device)


def compensation_with_the_negative_bit(lists, options):
    bfloat16_params(lists)
    options["compensations"] = [torch.zeros_like(p) for p in lists["params"]]
    options["compensations"][1] = lazily_negated(options["compensations"][1])


def grad_with_the_negative_bit_with_grad_scale(lists, options):
    # Decided: unscaling a resolved copy would leave the caller's grad scaled.
    lists["grads"][1] = lazily_negated(lists["grads"][1])
    options["grad_scale"] = torch.tensor(2.0, device=lists["grads"][1].device)


def zero_tensor_grad_with_grad_scale(lists, options):
    # As torch, whose GradScaler.unscale_ refuses to write a ZeroTensor.
    grad = lists["grads"][1]
    lists["grads"][1] = torch._efficientzerotensor(grad.shape, device=grad.device)
    options["grad_scale"] = torch.tensor(2.0, device=grad.device)


LAZY_BIT_MISUSES = {
    "param_with_the_negative_bit": (
        param_with_the_negative_bit,
        r"params\[1\] is written but has the negative bit set",
    ),
    "step_with_the_negative_bit": (
        step_with_the_negative_bit,
        r"state_steps\[1\] is written but has the negative bit set",
    ),
    "square_avg_with_the_conjugate_bit": (
        square_avg_with_the_conjugate_bit,
        r"square_avgs\[1\] is written but has the conjugate bit set",
    ),
    "acc_delta_that_is_a_zero_tensor": (
        acc_delta_that_is_a_zero_tensor,
        r"acc_deltas\[1\] is written but is a ZeroTensor",
    ),
    "compensation_with_the_negative_bit": (
        compensation_with_the_negative_bit,
        r"compensations\[1\] is written but has the negative bit set",
    ),
    "grad_with_the_negative_bit_with_grad_scale": (
        grad_with_the_negative_bit_with_grad_scale,
        r"grads\[1\] is written but has the negative bit set",
    ),
    "zero_tensor_grad_with_grad_scale": (
        zero_tensor_grad_with_grad_scale,
        r"grads\[1\] is written but is a ZeroTensor",
    ),
}


def bfloat16_params(lists):
    for name in ("params", "grads"):
        lists[name] = [t.bfloat16() for t in lists[name]]
    for name in ("square_avgs", "acc_deltas"):
        lists[name] = [t.float() for t in lists[name]]


OP_MISUSES = {
    "one_grad_fewer": (one_grad_fewer, "must have the same length, got 2, 1, 2, 2 and 2"),
    "integer_params": (integer_params, r"params\[0\] has dtype Long"),
    "grad_of_other_dtype": (
        grad_of_other_dtype,
        r"grads\[1\] has dtype Double but params\[1\] has dtype Float",
    ),
    "grad_of_a_dtype_without_kernel": (
        grad_of_a_dtype_without_kernel,
        r"grads\[1\] has dtype Half but params\[1\] has dtype Float",
    ),
    "state_of_other_dtype": (
        state_of_other_dtype,
        r"square_avgs\[1\] and acc_deltas\[1\] must both have the dtype",
    ),
    "float64_params_with_float32_state": (
        float64_params_with_state_of(torch.float32),
        r"square_avgs\[1\] and acc_deltas\[1\] must both have the dtype",
    ),
    "float64_params_with_float16_state": (
        float64_params_with_state_of(torch.float16),
        r"square_avgs\[1\] and acc_deltas\[1\] must both have the dtype",
    ),
    "state_of_other_shape": (
        state_of_other_shape,
        r"acc_deltas\[1\] has shape \[2, 3\] but params\[1\] has shape \[3, 2\]",
    ),
    "state_sharing_memory_with_its_param": (
        state_sharing_memory_with_its_param,
        r"params\[1\] and square_avgs\[1\] share memory",
    ),
    "expanded_grad_with_grad_scale": (
        expanded_grad_with_grad_scale,
        r"grads\[1\] is written but has elements that share memory",
    ),
    "grad_sharing_memory_with_its_param_with_grad_scale": (
        grad_sharing_memory_with_its_param_with_grad_scale,
        r"params\[1\] and grads\[1\] share memory",
    ),
    "param_listed_twice_with_grad_scale": (
        param_listed_twice_with_grad_scale,
        r"params\[0\] and params\[1\] are one param with one grad and state \(a param listed twice\): "
        "grad_scale would unscale its grad twice",
    ),
    "param_listed_twice_with_an_acc_delta_of_its_own": (
        param_listed_twice_with_an_acc_delta_of_its_own,
        r"square_avgs\[[01]\] and square_avgs\[[01]\] share memory",
    ),
    "square_entry_and_its_transpose": (
        square_entry_and_its_transpose,
        SQUARE_STATE_SHARED,
    ),
    "integer_step": (integer_step, r"state_steps\[1\] must be a one-element float32 or float64 tensor"),
    "step_of_two_elements": (
        step_of_two_elements,
        r"state_steps\[1\] must be a one-element float32 or float64 tensor",
    ),
    "tensor_lr_of_two_elements": (tensor_lr_of_two_elements, "lr must have one element, got 2"),
    "integer_grad_scale": (integer_grad_scale, "grad_scale must be a floating-point tensor"),
    "param_requiring_grad_in_grad_mode": (
        param_requiring_grad_in_grad_mode,
        r"params\[1\] requires grad and grad mode is on, but the op has no derivative",
    ),
    "compensation_for_a_float32_param": (
        compensation_for_a_float32_param,
        r"params\[0\] has dtype Float; Kahan summation is for float16 and bfloat16 params",
    ),
    "compensation_of_other_dtype": (
        compensation_of_other_dtype,
        r"compensations\[1\] has dtype Float but params\[1\] has dtype BFloat16",
    ),
    "compensation_sharing_memory_with_its_param": (
        compensation_sharing_memory_with_its_param,
        r"params\[1\] and compensations\[1\] share memory",
    ),
    "one_seed_fewer": (one_seed_fewer, "stochastic_round_seeds must have one entry per param, got 1 for 2"),
    "seed_for_a_float32_param": (
        seed_for_a_float32_param,
        r"params\[0\] has dtype Float; stochastic rounding is for float16 and bfloat16 params",
    ),
    "compensations_and_seeds": (compensations_and_seeds, "exclude each other"),
    "state_requiring_grad_in_grad_mode": (
        state_requiring_grad_in_grad_mode,
        r"acc_deltas\[1\] requires grad and grad mode is on",
    ),
    **LAZY_BIT_MISUSES,
}


@pytest.mark.parametrize("misuse", list(OP_MISUSES), ids=list(OP_MISUSES))
@pytest.mark.parametrize("device", DEVICES)
def test_op_called_with_mismatched_lists_raises_runtime_error_and_changes_nothing(device, misuse):
    spoil, message = OP_MISUSES[misuse]
    lists, options = op_lists(TWO_ENTRIES, device=device), dict(OP_OPTIONS)
    spoil(lists, options)
    before = snapshot(lists)

    with pytest.raises(RuntimeError, match=message):
        adadelta_ext.fused_adadelta_(*lists.values(), **options)

    assert_unchanged(lists, before)


@pytest.mark.parametrize("misuse", list(LAZY_BIT_MISUSES), ids=list(LAZY_BIT_MISUSES))
@pytest.mark.parametrize("device", DEVICES)
def test_the_check_op_refuses_a_written_tensor_behind_a_lazy_bit_as_the_op_does(device, misuse):
    """check_fused_adadelta writes nothing, so torch's fallbacks at the lazy bits' keys would hand
    it such tensors resolved, and it would pass what the op refuses: FusedAdadelta, which checks
    every call first, would then have written an earlier call's params before a later one raised."""
    spoil, message = LAZY_BIT_MISUSES[misuse]
    lists, options = op_lists(TWO_ENTRIES, device=device), dict(OP_OPTIONS)
    spoil(lists, options)
    before = snapshot(lists)
    with pytest.raises(RuntimeError, match=message):
        check_fused_adadelta(*lists.values(), **options)
    assert_unchanged(lists, before)


def test_a_call_that_passed_is_checked_again_once_a_tensor_moves():
    """The shared-memory check repeats the outcome of an identical call that passed (NOTE
    [Shared-memory checks, remembered]); the same lists with one tensor moved onto another's memory
    are checked anew, and refused."""
    lists = op_lists(TWO_ENTRIES)
    adadelta_ext.fused_adadelta_(*lists.values(), **OP_OPTIONS)
    lists["acc_deltas"][1].set_(lists["square_avgs"][0])
    before = snapshot(lists)
    with pytest.raises(RuntimeError, match=r"square_avgs\[0\] and acc_deltas\[1\] share memory"):
        adadelta_ext.fused_adadelta_(*lists.values(), **OP_OPTIONS)
    assert_unchanged(lists, before)


def test_a_call_with_repeated_entries_is_not_remembered():
    """Whether entries repeat follows from more than their ranges (NOTE [Shared-memory checks,
    remembered]): entry 1 repeating entry 0 passes; the same with entry 1 transposed has the same
    ranges, and is refused."""
    lists = op_lists([(3, 3), (3, 3)])
    for tensors in lists.values():
        tensors[1] = tensors[0]
    adadelta_ext.fused_adadelta_(*lists.values(), **OP_OPTIONS)
    for name, tensors in lists.items():
        if name != "state_steps":
            tensors[1] = tensors[0].t()
    before = snapshot(lists)
    with pytest.raises(RuntimeError, match=SQUARE_STATE_SHARED):
        adadelta_ext.fused_adadelta_(*lists.values(), **OP_OPTIONS)
    assert_unchanged(lists, before)


def test_the_check_op_reads_no_data_for_writing():
    """check_fused_adadelta changes nothing, not even how memory is held: a copy-on-write param
    stays copy-on-write. Only the op itself takes its written tensors' data for writing (NOTE
    [Checks list by list]), which gives such a param memory of its own."""
    lists = op_lists(TWO_ENTRIES)
    lists["params"][0] = torch._lazy_clone(lists["params"][0])
    check_fused_adadelta(*lists.values(), **OP_OPTIONS)
    assert torch._C._is_cow_tensor(lists["params"][0])
    adadelta_ext.fused_adadelta_(*lists.values(), **OP_OPTIONS)
    assert not torch._C._is_cow_tensor(lists["params"][0])


def test_an_expanded_grad_is_read_without_grad_scale():
    """Issue 9, defect 10, the other side: without grad_scale the grad is only read, so an expanded
    one is accepted and gives exactly what the same values, materialized, give."""
    lists = op_lists()
    lists["grads"][0] = torch.tensor([0.5]).expand(16)
    materialized = snapshot(lists)
    adadelta_ext.fused_adadelta_(*lists.values(), **OP_OPTIONS)
    adadelta_ext.fused_adadelta_(*materialized.values(), **OP_OPTIONS)
    torch.testing.assert_close(lists, materialized, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["grad", "step", "lr"])
def test_a_meta_tensor_among_cpu_inputs_is_refused(where):
    """Issue 9, defect 8: a meta tensor among the inputs made the call a silent no-op."""
    lists, options = op_lists(), dict(OP_OPTIONS)
    if where == "grad":
        lists["grads"][0] = lists["grads"][0].to("meta")
        message = r"grads\[0\] is on meta but params\[0\] is on cpu"
    elif where == "step":
        lists["state_steps"][0] = lists["state_steps"][0].to("meta")
        message = r"state_steps\[0\] must be a one-element float32 or float64 tensor on cpu"
    else:
        options["lr"] = torch.tensor(0.5, device="meta")
        message = "lr is on meta but the params are on cpu"
    cpu_tensors = {name: [t for t in tensors if not t.is_meta] for name, tensors in lists.items()}
    before = snapshot(cpu_tensors)
    with pytest.raises(RuntimeError, match=message):
        adadelta_ext.fused_adadelta_(*lists.values(), **options)
    assert_unchanged(cpu_tensors, before)


def test_op_with_empty_lists_raises_like_torchs_fused_ops():
    """No tensor to pick a kernel by: the dispatcher raises NotImplementedError (a RuntimeError),
    as it does for torch._fused_adam_([], ...). FusedAdadelta.step() makes no such call."""
    empty_lists: list[list[torch.Tensor]] = [[] for _ in range(6)]
    with pytest.raises(RuntimeError, match="There were no tensor arguments to this function"):
        adam_options = {"beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "eps": 1e-8, "amsgrad": False}
        torch._fused_adam_(*empty_lists, lr=0.1, maximize=False, **adam_options)
    with pytest.raises(RuntimeError, match="There were no tensor arguments to this function"):
        adadelta_ext.fused_adadelta_(*empty_lists[:5], **OP_OPTIONS)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "misuse",
    [
        "params_on_two_devices",
        "grad_on_other_device",
        "state_on_other_device",
        "step_on_other_device",
        "lr_on_other_device",
    ],
)
def test_op_called_with_tensors_on_mixed_devices_raises_runtime_error_and_changes_nothing(misuse):
    lists, options = op_lists(TWO_ENTRIES, device="cuda"), dict(OP_OPTIONS)
    if misuse == "params_on_two_devices":
        for name in lists:
            lists[name][1] = lists[name][1].cpu()
        message = r"params\[1\] is on cpu but params\[0\] is on cuda:0"
    elif misuse == "grad_on_other_device":
        lists["grads"][1] = lists["grads"][1].cpu()
        message = r"grads\[1\] is on cpu but params\[1\] is on cuda:0"
    elif misuse == "state_on_other_device":
        lists["square_avgs"][1] = lists["square_avgs"][1].cpu()
        message = r"square_avgs\[1\] is on cpu but params\[1\] is on cuda:0"
    elif misuse == "step_on_other_device":
        lists["state_steps"][1] = lists["state_steps"][1].cpu()
        message = re.escape("state_steps[1] must be a one-element float32 or float64 tensor on cuda:0")
    else:
        options["lr"] = torch.tensor(0.5)
        message = "lr is on cpu but the params are on cuda:0"
    before = snapshot(lists)

    with pytest.raises(RuntimeError, match=message):
        adadelta_ext.fused_adadelta_(*lists.values(), **options)

    assert_unchanged(lists, before)
