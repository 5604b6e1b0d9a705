"""Zeroed int32 counters for kernels whose last program to finish does the final step (the split-K GEMM tiles):
each program adds one with acq_rel semantics, the last to arrive reads the others' partials and sets the counter
back to zero, so every launch leaves the counters it used at zero.

One buffer per device and stream, shared by the kernels and grown on demand: launches on one stream never
overlap, launches on two streams (micro-batches overlapped on separate streams) may.
"""
import torch

_BUFFERS: dict = {}


def launch_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters for a launch on ``device``'s current stream."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _BUFFERS[key] = buf
    return buf
