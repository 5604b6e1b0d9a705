"""Benchmarks of angel-kernels against the peers users would otherwise run (one script per kernel family)."""
