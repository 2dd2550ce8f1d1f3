"""A step updates params and state in place as autograd expects of an in-place op: it bumps the
version counter of every tensor it writes, so a backward through a changed param is refused
(issue 9, defect 2: the step's updates were invisible to autograd)."""

from __future__ import annotations

import pytest
import torch
from optim_testing import OP_OPTIONS, op_lists
from torch import nn

import adadelta_ext
from adadelta_ext import FusedAdadelta


def test_autograd_refuses_a_backward_through_a_param_the_step_changed():
    w = nn.Parameter(torch.randn(3))
    loss = (w * w).sum()
    loss.backward(retain_graph=True)
    FusedAdadelta([w]).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("grad_scale", [None, 2.0])
def test_the_op_bumps_the_version_of_every_tensor_it_writes(grad_scale):
    """Params, square_avgs, acc_deltas and steps; grads only when unscaled (with a grad_scale)."""
    lists = op_lists()
    versions = {name: [t._version for t in tensors] for name, tensors in lists.items()}
    options = dict(OP_OPTIONS, grad_scale=None if grad_scale is None else torch.tensor(grad_scale))
    adadelta_ext.fused_adadelta_(*lists.values(), **options)
    bumped = {
        name: [t._version - v for t, v in zip(tensors, versions[name], strict=True)]
        for name, tensors in lists.items()
    }
    grads_bumped = 0 if grad_scale is None else 1
    assert bumped == {
        "params": [1],
        "grads": [grads_bumped],
        "square_avgs": [1],
        "acc_deltas": [1],
        "state_steps": [1],
    }


def test_the_op_bumps_the_version_of_the_compensations_it_writes():
    """Kahan summation writes each compensation buffer: its version moves with its param's."""
    lists = op_lists(dtype=torch.bfloat16, state_dtype=torch.float32)
    compensations = [torch.zeros_like(p) for p in lists["params"]]
    versions = [c._version for c in compensations]
    adadelta_ext.fused_adadelta_(*lists.values(), **OP_OPTIONS, compensations=compensations)
    assert [c._version - v for c, v in zip(compensations, versions, strict=True)] == [1]


def test_a_refused_call_leaves_every_version_where_it_was():
    """The versions are bumped before the op runs (NOTE [Versions bumped first] in
    csrc/fused_adadelta.cpp); a call the checks refuse puts them back, as it changes nothing else."""
    lists = op_lists(shapes=[(3,), (3,)], dtype=torch.bfloat16, state_dtype=torch.float32)
    lists["acc_deltas"][1] = lists["acc_deltas"][1].double()  # refused: not square_avgs[1]'s dtype
    compensations = [torch.zeros_like(p) for p in lists["params"]]
    tensors = [*(t for ts in lists.values() for t in ts), *compensations]
    for tensor in tensors:
        tensor.add_(0)  # versions other than 0, which a reset to 0 would not show
    versions = [t._version for t in tensors]
    options = dict(OP_OPTIONS, grad_scale=torch.tensor(2.0))  # grads are written too
    with pytest.raises(RuntimeError, match=r"acc_deltas\[1\]"):
        adadelta_ext.fused_adadelta_(*lists.values(), **options, compensations=compensations)
    assert [t._version for t in tensors] == versions
