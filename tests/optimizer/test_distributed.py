"""FusedAdadelta in torch.distributed training: DDP, and FSDP2 (fully_shard, DTensor params).

Two processes on this CPU with the gloo backend, started with torch.multiprocessing
(spawn), meeting through a file store in the run's own temporary folder (no port to
find, so nothing another process can take first); a run that does not finish within
RUN_TIMEOUT_S is killed and the test fails, so a hang cannot stall CI.

What must be equal, and how exactly:
- Data parallel training averages the ranks' gradients. Given those averaged
  gradients, FusedAdadelta's update is deterministic and elementwise, so every
  rank ends bit for bit where one process ends that steps FusedAdadelta with the
  same gradients (rtol=0, atol=0). For FSDP2 this also shows that stepping each
  rank's shard alone (DTensor params go through their local shards) is exact.
- Against one process training torch.optim.Adadelta on the whole batch, the
  averaged gradient is rounded differently (mean of per-rank means, summed by
  the all-reduce, versus one mean) and torch rounds its update in another order:
  assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5) there.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from optim_testing import small_model
from torch import nn

from adadelta_ext import FusedAdadelta

WORLD_SIZE = 2
STEPS = 4
BATCH = 8  # the whole batch; each rank trains on BATCH // WORLD_SIZE samples of it
KWARGS = {"lr": 0.5, "rho": 0.9, "weight_decay": 0.1}
RUN_TIMEOUT_S = 90
COLLECTIVE_TIMEOUT = timedelta(seconds=60)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch was built without gloo"
)


# --------------------------------------------------------------------------------------------
# Running workers.
# --------------------------------------------------------------------------------------------


def run_on_ranks(worker, tmp_path) -> list[dict]:
    """Runs worker(rank) on WORLD_SIZE processes; returns what each rank saved in tmp_path
    (a fresh folder per run, which also holds the run's file store)."""
    context = mp.start_processes(
        _worker_entry,
        args=(worker, str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the distributed run did not finish within {RUN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def _worker_entry(rank: int, worker, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'store')}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        result = worker(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def whole_batch() -> torch.Tensor:
    return torch.randn(BATCH, 2, 6, 6, generator=torch.Generator().manual_seed(1))


def rank_batch(rank: int) -> torch.Tensor:
    per_rank = BATCH // WORLD_SIZE
    return whole_batch()[rank * per_rank : (rank + 1) * per_rank]


def loss_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs).square().mean()


# --------------------------------------------------------------------------------------------
# Single-process references.
# --------------------------------------------------------------------------------------------


def replay_fused(model: nn.Module, grads_per_step: list[list[torch.Tensor]]) -> FusedAdadelta:
    """FusedAdadelta in one process, stepped with the given grads instead of computed ones."""
    optimizer = FusedAdadelta(model.parameters(), **KWARGS)
    for grads in grads_per_step:
        for p, grad in zip(model.parameters(), grads, strict=True):
            p.grad = grad.clone()
        optimizer.step()
    return optimizer


def train_torch_on_whole_batch(model: nn.Module) -> torch.optim.Adadelta:
    optimizer = torch.optim.Adadelta(model.parameters(), **KWARGS)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, whole_batch()).backward()
        optimizer.step()
    return optimizer


def state_values(optimizer: torch.optim.Optimizer, params) -> list[dict[str, torch.Tensor]]:
    return [{key: optimizer.state[p][key] for key in ("step", "square_avg", "acc_delta")} for p in params]


# --------------------------------------------------------------------------------------------
# DDP.
# --------------------------------------------------------------------------------------------


def ddp_worker(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(small_model(), gradient_as_bucket_view=True)
    optimizer = FusedAdadelta(model.parameters(), **KWARGS)
    averaged_grads = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, rank_batch(rank)).backward()
        averaged_grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    params = list(model.module.parameters())
    return {
        "params": [p.detach().clone() for p in params],
        "state": state_values(optimizer, params),
        "averaged_grads": averaged_grads,
    }


def assert_equals_fused_steps_on_averaged_grads(rank0: dict, model: torch.nn.Module) -> None:
    """Rank 0's params and state equal, bit for bit, one process stepping FusedAdadelta on averaged grads."""
    optimizer = replay_fused(model, rank0["averaged_grads"])
    torch.testing.assert_close(rank0["params"], list(model.parameters()), rtol=0, atol=0)
    torch.testing.assert_close(rank0["state"], state_values(optimizer, model.parameters()), rtol=0, atol=0)


def assert_matches_torch_on_the_whole_batch(rank0: dict, model: torch.nn.Module) -> None:
    """Averaging across ranks rounds unlike one mean over the batch: float32 default tolerance."""
    optimizer = train_torch_on_whole_batch(model)
    torch.testing.assert_close(rank0["params"], list(model.parameters()))
    torch.testing.assert_close(rank0["state"], state_values(optimizer, model.parameters()))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    """One DDP run (FusedAdadelta, 2 ranks, gradient_as_bucket_view=True), shared by the DDP tests."""
    return run_on_ranks(ddp_worker, tmp_path_factory.mktemp("ddp"))


def test_ddp_replicas_stay_bit_identical(ddp_results):
    first, *others = ddp_results
    for other in others:
        torch.testing.assert_close(other["params"], first["params"], rtol=0, atol=0)
        torch.testing.assert_close(other["state"], first["state"], rtol=0, atol=0)


def test_ddp_equals_one_process_stepping_the_averaged_grads_exactly(ddp_results):
    assert_equals_fused_steps_on_averaged_grads(ddp_results[0], small_model())


def test_ddp_matches_torch_adadelta_on_the_whole_batch(ddp_results):
    assert_matches_torch_on_the_whole_batch(ddp_results[0], small_model())


# --------------------------------------------------------------------------------------------
# FSDP2: fully_shard runs on CPU with gloo, so it is tested directly; its params, grads and
# optimizer state are DTensors sharded on dim 0.
# --------------------------------------------------------------------------------------------


def sharded_model() -> nn.Module:
    """small_model() and a Linear(2, 1): its weight (1, 2) and bias (1,) leave rank 1 an empty shard;
    the other params split unevenly (3 rows into 2 + 1, 5 into 3 + 2)."""
    torch.manual_seed(0)
    return nn.Sequential(small_model(), nn.Linear(2, 1))


def fsdp_worker(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    model = sharded_model()
    for module in [*model[0], model[1]]:
        if any(True for _ in module.parameters()):
            fully_shard(module)
    fully_shard(model)
    optimizer = FusedAdadelta(model.parameters(), **KWARGS)
    averaged_grads = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, rank_batch(rank)).backward()
        averaged_grads.append([p.grad.full_tensor() for p in model.parameters()])
        optimizer.step()

    params = list(model.parameters())
    for p in params:
        state = optimizer.state[p]
        for key in ("square_avg", "acc_delta"):
            assert isinstance(state[key], DTensor) and state[key].placements == (Shard(0),), key
        assert state["step"].item() == STEPS
    return {
        "local_shard_sizes": [p.to_local().numel() for p in params],
        "params": [p.full_tensor() for p in params],
        "state": [
            {"step": optimizer.state[p]["step"]}
            | {key: optimizer.state[p][key].full_tensor() for key in ("square_avg", "acc_delta")}
            for p in params
        ],
        "averaged_grads": averaged_grads,
    }


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict]:
    """One FSDP2 run (fully_shard per layer and at the root, FusedAdadelta, 2 ranks)."""
    return run_on_ranks(fsdp_worker, tmp_path_factory.mktemp("fsdp"))


def test_fsdp_shards_the_params_and_the_state_unevenly_with_an_empty_shard(fsdp_results):
    sizes = [result["local_shard_sizes"] for result in fsdp_results]
    full_sizes = [p.numel() for p in sharded_model().parameters()]
    assert [sum(per_param) for per_param in zip(*sizes, strict=True)] == full_sizes
    assert 0 in sizes[1], "rank 1 holds an empty shard of Linear(2, 1)"


def test_fsdp_equals_one_process_stepping_the_averaged_grads_exactly(fsdp_results):
    assert_equals_fused_steps_on_averaged_grads(fsdp_results[0], sharded_model())


def test_fsdp_matches_torch_adadelta_on_the_whole_batch(fsdp_results):
    assert_matches_torch_on_the_whole_batch(fsdp_results[0], sharded_model())
