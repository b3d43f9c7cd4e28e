"""avkernels benchmarks (pytest-benchmark): run with `pytest benchmarks/ --benchmark-only`."""
