"""Performance study of adadelta_ext: `python -m benchmarks.step` (see benchmarks/README.md)."""
