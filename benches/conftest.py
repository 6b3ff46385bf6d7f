"""pytest-benchmark suites. Run with `pytest benches --benchmark-enable` (timings) on any machine;
on a GPU the kernels are compiled, on a CPU the torch path runs (TRITON_INTERPRET is not set here)."""
