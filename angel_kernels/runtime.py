"""Where a kernel runs: compiled Triton on CUDA, the Triton interpreter on CPU, or the pure-torch reference.

Nothing here queries a GPU at import time. The Triton interpreter is a process-wide switch that Triton reads
when a kernel is decorated, so it must be set (``TRITON_INTERPRET=1``) before ``angel_kernels`` kernels are
imported; the test suite's conftest does that on machines without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["arrival_counters", "interpreter_active", "reference_forced", "triton_runnable_on"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def interpreter_active() -> bool:
    """True when Triton kernels are interpreted on the CPU (``TRITON_INTERPRET=1``)."""
    return _env_flag("TRITON_INTERPRET")


def reference_forced() -> bool:
    """``ANGEL_KERNELS_REFERENCE=1`` routes every op to its pure-torch reference (debugging, CPU serving)."""
    return _env_flag("ANGEL_KERNELS_REFERENCE")


def triton_runnable_on(device: torch.device) -> tuple[bool, str]:
    """``can_implement`` answer shared by every Triton candidate: a CUDA device, or the CPU under the interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
        return True, ""
    return False, f"Triton kernels need a CUDA device or TRITON_INTERPRET=1 (tensors on {device})"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device, default: int) -> int:
    """Streaming multiprocessors of a CUDA device; ``default`` elsewhere (the interpreter has none, and a config
    space can be listed for a CUDA device on a machine without one)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return default


# Arrival counters of the kernels whose last program to finish combines the others' results (split-K GEMMs,
# decode splits): one zeroed int32 buffer per (pool, device), grown on demand; every launch leaves the counters it
# used at zero (launches on one stream never overlap; two streams running such kernels at once would share them).
# Made outside CUDA-graph capture: a buffer first zeroed inside a captured graph holds garbage for every other
# graph until that one replays (vLLM warms up eagerly before it captures).
_COUNTERS: dict = {}


def arrival_counters(device: torch.device, n: int, pool: str, minimum: int = 4096) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters of ``pool`` on ``device`` (at least ``minimum`` when first made)."""
    buf = _COUNTERS.get((pool, device))
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{pool}: {n} arrival counters are needed for the first time during CUDA-graph capture; run the"
                " same shapes once outside the capture first (warm-up)"
            )
        buf = torch.zeros(max(n, minimum), dtype=torch.int32, device=device)
        _COUNTERS[(pool, device)] = buf
    return buf
