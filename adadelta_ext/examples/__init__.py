"""Runnable examples of adadelta_ext; each is ``python -m adadelta_ext.examples.<name>``.

- ``mnist``: the Adadelta tutorial's MNIST run, offline, with the tutorial's
  hand-written step, ``torch.optim.Adadelta`` and ``FusedAdadelta`` side by side.
"""
