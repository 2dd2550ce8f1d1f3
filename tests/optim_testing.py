"""What the test files share: the devices under test and ways to build twin optimizers."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

# Every test parametrized over DEVICES runs on CUDA too when a GPU is present, and
# shows as skipped (with the reason) where there is none.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def small_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model with 2-D weights, 1-D biases and a 4-D conv kernel."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 2),
    ).to(device=device, dtype=dtype)


def model_input(model: nn.Module, batch: int = 4) -> torch.Tensor:
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 2, 6, 6, generator=generator).to(device=param.device, dtype=param.dtype)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """`steps` full training steps on fixed data: forward, backward, optimizer.step()."""
    inputs = model_input(model)
    for _ in range(steps):
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


def twin_models(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return model, copy.deepcopy(model)


def save_and_load(state_dict: dict) -> dict:
    """A state dict through torch.save/torch.load, so that no tensor is shared with the original."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
