"""The project's examples, outside the adadelta_ext package and its wheel; their dependencies are the
``demo`` extra. Each runs from the repository root as ``python -m examples.<name>``.

- ``mnist``: the Adadelta tutorial's MNIST run, offline, with the tutorial's
  hand-written step, ``torch.optim.Adadelta`` and ``FusedAdadelta`` side by side.
"""
