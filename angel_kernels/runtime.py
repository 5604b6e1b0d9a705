"""Where a kernel runs: compiled Triton on CUDA, the Triton interpreter on CPU, or the pure-torch reference.

Nothing here queries a GPU at import time. The Triton interpreter is a process-wide switch that Triton reads
when a kernel is decorated, so it must be set (``TRITON_INTERPRET=1``) before ``angel_kernels`` kernels are
imported; the test suite's conftest does that on machines without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["interpreter_active", "reference_forced", "triton_runnable_on"]


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


def dependent_launch_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` may be launched by programmatic dependent launch (CUDA, sm_90 and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def dependent_launch(dependent: bool) -> dict:
    """Triton launch options of a kernel launched by programmatic dependent launch (sm_90+: it may start while the
    previous kernel of the stream finishes, and must ``gdc_wait`` before reading what that kernel wrote)."""
    return {"launch_pdl": True} if dependent else {}
