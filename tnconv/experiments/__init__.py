"""Experiments of the RSDTR paper on CIFAR-10, runnable without tnconv shipping any dataset.

* :mod:`tnconv.experiments.reduction` -- parameter / FLOP reductions per eps
  (``reduction_table``), also ``python -m tnconv.experiments.reduction``.
* :mod:`tnconv.experiments.cifar` -- compress and fine-tune on a local CIFAR-10 folder,
  ``python -m tnconv.experiments.cifar --data DIR ...`` (``main(argv)`` returns the exit code).
* :mod:`tnconv.experiments.augment` -- CIFAR training augmentation on tensors.

The submodules are not imported here, so that ``python -m`` runs them without importing them
twice.
"""
