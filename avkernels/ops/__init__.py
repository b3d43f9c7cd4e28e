"""The ``avkernels::`` ops, one folder per op family (:mod:`.batch_norm`, :mod:`.masking`), each
with its schema, plain-PyTorch reference, Triton kernels and launch code, autograd and
registration; :mod:`._library` defines ops from their signatures and :mod:`.checks` holds the
argument checks every Python entry point makes. The C++ kernels are in ``csrc/ops/``."""
