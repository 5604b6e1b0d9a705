"""Autotuning without tuning on the hot path.

- ``buckets``: the keys configs are stored under (M is bucketed, never raw).
- ``prune``: drop configs that cannot work (shared memory, ``BLOCK_K <= group_size``) before benchmarking.
- ``store``: tuned configs per GPU as JSON with version metadata, shipped in ``configs/`` and loaded lazily.
- ``timing``: CUDA-graph timing over rotating input sets (shared with the benchmark harness).
- ``warmup``: the explicit entry point that benchmarks candidates and records the winners.
Under the Triton interpreter every kernel uses one fixed config (``interpreter_config``).
"""
from .buckets import m_bucket, M_BUCKETS
from .prune import KernelConfig, prune_configs, smem_bytes
from .store import TunedConfigStore, default_store, gpu_slug
from .timing import CallTiming, GraphCaptureError, l2_bytes, rotation_count, time_calls
from .warmup import tune_kernel

__all__ = [
    "M_BUCKETS",
    "m_bucket",
    "KernelConfig",
    "prune_configs",
    "smem_bytes",
    "TunedConfigStore",
    "default_store",
    "gpu_slug",
    "CallTiming",
    "GraphCaptureError",
    "l2_bytes",
    "rotation_count",
    "time_calls",
    "tune_kernel",
]
