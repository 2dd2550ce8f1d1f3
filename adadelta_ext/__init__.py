"""adadelta_ext: a fused Adadelta optimizer for PyTorch (C++/CUDA), a drop-in for torch.optim.Adadelta."""

from ._ops import backends, cpu_kernel_isa, cpu_kernel_isas, fused_adadelta_
from .optimizer import FusedAdadelta

__version__ = "0.1.0"

__all__ = ["FusedAdadelta", "__version__", "backends", "cpu_kernel_isa", "cpu_kernel_isas", "fused_adadelta_"]
