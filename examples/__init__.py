"""The project's examples, outside the adadelta_ext package and its wheel; their dependencies are the
``demo`` extra. Each runs from the repository root as ``python -m examples.<name>``.

- ``mnist``: the Adadelta tutorial's MNIST run, offline, with the tutorial's
  hand-written step, ``torch.optim.Adadelta`` and ``FusedAdadelta`` side by side.
- ``pure_16bit_training``: a byte-level language model on the Python standard
  library's source, trained in float32 and in pure bfloat16 with round-to-nearest,
  ``kahan_sum`` and ``stochastic_round``.
"""
