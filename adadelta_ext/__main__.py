"""`python -m adadelta_ext`: what this build of adadelta_ext has."""

import torch

import adadelta_ext


def main() -> None:
    print(f"adadelta_ext {adadelta_ext.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"backends: {', '.join(adadelta_ext.backends())}")
    print(f"CPU kernel instruction set: {adadelta_ext.cpu_kernel_isa()}")
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
