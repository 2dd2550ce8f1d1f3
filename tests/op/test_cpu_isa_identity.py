"""Every instruction-set build of the CPU kernel (DEFAULT, AVX2, AVX-512, as far as this CPU runs
them) gives bit-identical results: the same float32/float64/bfloat16/float16 steps, and 16-bit
steps with Kahan summation and stochastic rounding, in children forced onto each build as torch
forces its own kernels (ATEN_CPU_CAPABILITY)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import adadelta_ext

# Runs FusedAdadelta on data drawn with numpy (torch's own random kernels differ
# between instruction sets) and saves the results to the file named in argv[1].
ISA_CHILD = """
import sys
import numpy as np
import torch
import adadelta_ext

rng = np.random.default_rng(0)
results = {"isa": adadelta_ext.cpu_kernel_isa()}
runs = [(dtype, {}) for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]
runs += [(dtype, {option: True}) for option in ("kahan_sum", "stochastic_round")
         for dtype in (torch.bfloat16, torch.float16)]
for dtype, options in runs:
    sizes = (1, 7, 33, 1000, 70001)
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n)).to(dtype)) for n in sizes]
    optimizer = adadelta_ext.FusedAdadelta(params, lr=0.5, weight_decay=0.1, **options)
    torch.manual_seed(0)  # the stochastic rounding seeds
    for _ in range(5):
        for p in params:
            p.grad = torch.from_numpy(rng.standard_normal(p.shape)).to(dtype)
        optimizer.step()
    state = [value for p in params for value in optimizer.state[p].values() if torch.is_tensor(value)]
    results[f"{dtype} {options}"] = [p.detach() for p in params] + state
torch.save(results, sys.argv[1])
"""


def test_every_cpu_kernel_build_gives_identical_results(tmp_path):
    """Every instruction-set build of the CPU kernel (forced as torch forces its own) rounds alike."""
    isas = adadelta_ext.cpu_kernel_isas()
    if len(isas) == 1:
        pytest.skip(f"this CPU runs only the {isas[0]} kernel")
    results = {}
    for isa in isas:
        path = tmp_path / f"{isa}.pt"
        environment = {**os.environ, "ATEN_CPU_CAPABILITY": isa.lower()}
        subprocess.run([sys.executable, "-c", ISA_CHILD, str(path)], env=environment, check=True)
        results[isa] = torch.load(path)
        assert results[isa].pop("isa") == isa, "the kernel for the forced instruction set must run"
    for isa in isas[1:]:
        for key, tensors in results["DEFAULT"].items():
            for default_tensor, isa_tensor in zip(tensors, results[isa][key], strict=True):
                assert torch.equal(default_tensor, isa_tensor), f"{isa} differs from DEFAULT for {key}"
