"""CUDA-graph timing over rotating input sets: the one timer of the tuner and of the benchmark harness.

Why not Triton's ``do_bench`` (eager launches, L2 flushed between calls): for the 10–50 µs decode kernels its
launch overhead and flush add ~15 µs of noise per sample, as large as the differences between configs. Ranked
that way, a w4a16 tune picked a config the harness then measured at 21.4 µs (6144×4096 M=1) where the untuned
heuristic config measured 13.0 µs. Here the launches are captured once into a CUDA graph and only GPU time between
two events is measured; L2 is defeated by cycling over input sets whose total size exceeds it, not by flushing.

``time_calls(calls)``: ``calls[i]()`` runs the timed op on input set ``i`` (same work, different tensors).
1. warm up eagerly (compiles and autotunes outside the capture), then estimate the per-call time from one eager
   pass with CUDA events (an upper bound: it includes the host launch overhead);
2. capture whole passes over the sets into one CUDA graph, ``TARGET_REPLAY_US`` of calls by that estimate. Eager
   launches are queued asynchronously, so the estimate is max(kernel time, host launch time): exact for kernels
   that outlast their launch, too high for shorter ones (a 13 µs w4a16 decode kernel launches in ~50 µs on H100),
   whose first graph is then timed once and captured again with enough passes. A replay thus lasts ~1–2 ms
   (at most ``MAX_CALLS_PER_REPLAY`` calls), so the graph's own launch (a few µs) stays near 0.5 % of a sample;
3. replay once more, then time ``samples`` replays with events (``TARGET_TOTAL_MS`` in all, 5 to 50 of them) and
   report median / p20 / p80 µs per call.
A call that cannot be captured (it synchronizes with the host, say) raises ``GraphCaptureError``, unless
``eager_fallback=True`` asks for event timing of the same eager call sequence instead (host overhead included;
``method`` says which). Either way the CUDA random generator is left usable (a failed capture would otherwise
break every later random op).

Nothing here runs at import time; timing refuses the Triton interpreter (it would time Python) and machines
without CUDA.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from ..runtime import interpreter_active

__all__ = [
    "CallTiming",
    "GraphCaptureError",
    "l2_bytes",
    "rotation_count",
    "time_calls",
    "graph_median_us",
]

# Fallback when the device does not report its L2 size: H100 has 50 MB; larger keeps rotation on the safe side.
DEFAULT_L2_BYTES = 64 * 1024 * 1024
# The input sets cycled by one graph total at least this many L2 sizes (one set alone may already exceed it).
ROTATION_L2_FACTOR = 2.0
MAX_INPUT_SETS = 64
# A CUDA graph holds ~2 ms of calls by the eager estimate; each measurement spends ~150 ms replaying it.
TARGET_REPLAY_US = 2000.0
TARGET_TOTAL_MS = 150.0
MAX_CALLS_PER_REPLAY = 256
MIN_SAMPLES, MAX_SAMPLES = 5, 50


class GraphCaptureError(RuntimeError):
    """The calls could not be captured into a CUDA graph (host synchronization, pinned allocation, ...).
    ``reason``: the underlying error as "Type: message"."""

    def __init__(self, reason: str):
        super().__init__(f"CUDA graph capture failed ({reason}); a call that synchronizes with the host (.item(), "
                         ".cpu(), a data-dependent shape) cannot be graph-timed")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class CallTiming:
    """µs per call: median and the 20th / 80th percentiles of ``samples`` timed replays of
    ``calls_per_sample`` calls each. ``method``: "graph", or "eager" when capture failed and eager timing was
    allowed (``note`` says why)."""

    median_us: float
    p20_us: float
    p80_us: float
    method: str
    calls_per_sample: int
    samples: int
    note: str = ""


# ------------------------------------------------------------------------------------------ rotating input sets
def l2_bytes(device: torch.device | str | None = None) -> int:
    """L2 size of a CUDA device (50 MB on H100), ``DEFAULT_L2_BYTES`` where torch does not report it; 0 for any
    other device (nothing to defeat: one input set is enough there)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        size = int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 0)
    except Exception:  # noqa: BLE001 - a size query must not stop a measurement: rotate for the fallback size
        size = 0
    return size if size > 0 else DEFAULT_L2_BYTES


def rotation_count(bytes_per_set: int, l2: int, *, factor: float = ROTATION_L2_FACTOR,
                   max_sets: int = MAX_INPUT_SETS) -> int:
    """How many input sets to cycle so that together they exceed ``factor`` × ``l2`` bytes (1 when one set
    already does, or when ``l2`` is 0), at most ``max_sets``."""
    if max_sets < 1:
        raise ValueError(f"max_sets must be >= 1, got {max_sets}")
    need = math.ceil(factor * l2 / max(int(bytes_per_set), 1))
    return max(1, min(max_sets, need))


# ------------------------------------------------------------------------------------------------------ timing
def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty sequence (numpy's default method)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def calls_per_replay(est_us: float, n_sets: int, target_us: float, max_calls: int) -> int:
    """Calls in one graph: about ``target_us`` by the estimate, at most ``max_calls``, whole passes over the sets."""
    calls = int(min(max_calls, max(1, math.ceil(target_us / max(est_us, 1e-3)))))
    return max(n_sets, math.ceil(calls / n_sets) * n_sets)


def sample_count(sample_us: float, target_ms: float, min_samples: int = MIN_SAMPLES,
                 max_samples: int = MAX_SAMPLES) -> int:
    return int(min(max_samples, max(min_samples, math.ceil(target_ms * 1e3 / max(sample_us, 1e-3)))))


def check_calls(calls) -> list:
    """``calls`` as a list of argument-free callables; a clear error for anything else."""
    if callable(calls):
        raise TypeError("calls must be a sequence of argument-free callables, one per input set "
                        "(pass [fn] for a single set), not a single callable")
    if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
        raise TypeError(f"calls must be a sequence of argument-free callables, got {type(calls).__name__}")
    calls = list(calls)
    if not calls:
        raise ValueError("calls is empty: give at least one callable (one per rotating input set)")
    bad = [i for i, c in enumerate(calls) if not callable(c)]
    if bad:
        raise TypeError(f"calls[{bad[0]}] is {type(calls[bad[0]]).__name__}, not a callable")
    return calls


def _check_params(warmup, target_replay_us, target_total_ms, max_calls, min_samples, max_samples) -> None:
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    for name, v in (("target_replay_us", target_replay_us), ("target_total_ms", target_total_ms)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if not isinstance(max_calls, int) or max_calls < 1:
        raise ValueError(f"max_calls must be an int >= 1, got {max_calls!r}")
    if not (isinstance(min_samples, int) and isinstance(max_samples, int) and 1 <= min_samples <= max_samples):
        raise ValueError(f"need 1 <= min_samples <= max_samples, got {min_samples!r}, {max_samples!r}")


def check_timer_usable() -> None:
    """Raise unless compiled kernels can be timed here: the interpreter would time Python, and a CPU has no
    CUDA graphs or events."""
    if interpreter_active():
        raise RuntimeError("time_calls: TRITON_INTERPRET=1 runs kernels in the Triton interpreter, whose times say "
                           "nothing about the GPU; pass a fake bench (CPU tests) or unset TRITON_INTERPRET")
    if not torch.cuda.is_available():
        raise RuntimeError("time_calls needs a CUDA device (CUDA graphs and events); none is available")


def capture_graph(body: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    """Capture body() into a CUDA graph after a warm-up on a side stream (as torch's docs require)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    torch.cuda.synchronize()
    return g


def _reset_after_failed_capture() -> None:
    """A capture that fails never runs torch's capture epilogue, so the default CUDA generator stays in capture
    mode and every later random op outside a graph fails ("Offset increment outside graph capture encountered
    unexpectedly"): a trivial capture that completes runs the epilogue and clears it."""
    try:
        torch.cuda.synchronize()
        x = torch.zeros(1, device="cuda")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            x.add_(1)
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - best effort: the capture's own error is the one worth reporting
        pass


def capture_or_raise(body: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    """``capture_graph``, with any failure cleaned up and raised as ``GraphCaptureError``."""
    try:
        return capture_graph(body)
    except Exception as e:  # noqa: BLE001 - any capture failure is reported the same way
        _reset_after_failed_capture()
        raise GraphCaptureError(f"{type(e).__name__}: {str(e)[:200]}") from e


def _elapsed_us(fn: Callable[[], None]) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3


def time_calls(
    calls: Sequence[Callable[[], object]],
    *,
    use_graph: bool = True,
    eager_fallback: bool = False,
    warmup: int = 2,
    target_replay_us: float = TARGET_REPLAY_US,
    target_total_ms: float = TARGET_TOTAL_MS,
    max_calls: int = MAX_CALLS_PER_REPLAY,
    min_samples: int = MIN_SAMPLES,
    max_samples: int = MAX_SAMPLES,
) -> CallTiming:
    """µs per call of ``calls[i]()``, cycling i over the input sets, on the current CUDA device and stream.

    ``use_graph=False`` times the eager call sequence (host overhead included). ``GraphCaptureError`` when the
    calls cannot be captured, unless ``eager_fallback``. See the module doc for the method.
    """
    calls = check_calls(calls)
    _check_params(warmup, target_replay_us, target_total_ms, max_calls, min_samples, max_samples)
    check_timer_usable()
    n = len(calls)

    def run_seq(count: int) -> None:
        for i in range(count):
            calls[i % n]()

    run_seq(max(warmup, 1) * n)
    torch.cuda.synchronize()
    est = _elapsed_us(lambda: run_seq(n)) / n  # eager: an upper bound (host overhead), only sizes the graph
    per_replay = calls_per_replay(est, n, target_replay_us, max_calls)

    method, note, replay = "eager", "", None
    if use_graph:
        try:
            graph = capture_or_raise(lambda: run_seq(per_replay))
            graph.replay()
            replay_us = _elapsed_us(graph.replay)
            # Launch-bound calls: the eager estimate was the host launch time (~50 µs for a 13 µs w4a16 decode
            # kernel on H100): re-size from the graph's own time so a replay lasts ~target_replay_us.
            resized = calls_per_replay(replay_us / per_replay, n, target_replay_us, max_calls)
            if replay_us < 0.5 * target_replay_us and resized > per_replay:
                del graph
                per_replay = resized
                graph = capture_or_raise(lambda: run_seq(per_replay))
        except GraphCaptureError as e:
            if not eager_fallback:
                raise
            note = f"graph capture failed ({e.reason}); eager timing"
        else:
            replay = graph.replay
            method = "graph"
    if replay is None:
        def replay():
            run_seq(per_replay)

    replay()
    torch.cuda.synchronize()
    sample_us = _elapsed_us(replay)
    samples = [_elapsed_us(replay) / per_replay
               for _ in range(sample_count(sample_us, target_total_ms, min_samples, max_samples))]
    return CallTiming(_quantile(samples, 0.5), _quantile(samples, 0.2), _quantile(samples, 0.8), method,
                      per_replay, len(samples), note)


def graph_median_us(calls: Sequence[Callable[[], object]]) -> float:
    """The tuner's default bench: median µs per call under CUDA-graph replay (no eager fallback: a config that
    cannot be captured cannot serve under CUDA graphs either, so it does not compete)."""
    return time_calls(calls).median_us
