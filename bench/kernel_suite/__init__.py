"""bench/kernel_bench.py's parts: measure (shapes, settings, a row and its measurement), report (printing and the
JSON), runner (each case on its own, the time budget, SIGTERM) and one module of cases per op."""
