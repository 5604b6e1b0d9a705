"""The warm-up phase: benchmark candidate configs for one problem and record the fastest.

Serving code never calls this; it looks configs up in the store and falls back to a heuristic default.
Call it once per deployment (or offline per GPU, then ship the JSON) with the shapes of the model.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .prune import KernelConfig
from .store import TunedConfigStore


def tune_kernel(
    store: TunedConfigStore,
    kernel: str,
    key: str,
    configs: Sequence[KernelConfig],
    make_call: Callable[[KernelConfig], Callable[[], object]],
    device: torch.device | str,
    *,
    check: Callable[[object], None] | None = None,
    bench: Callable[[Callable[[], object]], float] | None = None,
) -> tuple[KernelConfig, dict[KernelConfig, float]]:
    """Time ``make_call(cfg)()`` for every config (median µs, CUDA events), record the fastest in ``store``.

    ``check`` validates each config's output before it may win (a config that computes garbage, or fails to
    compile, is skipped). ``bench(call) -> µs`` defaults to Triton's ``do_bench`` median. Returns the winner
    and all timings.
    """
    if bench is None:
        bench = _do_bench_median_us

    if not configs:
        raise ValueError(f"{kernel} {key}: no configs to tune (all pruned?)")
    timings: dict[KernelConfig, float] = {}
    for cfg in configs:
        try:
            call = make_call(cfg)
            result = call()
            if check is not None:
                check(result)
            us = bench(call)
        except Exception:  # a config that does not compile or is wrong simply does not compete
            continue
        timings[cfg] = us
    if not timings:
        raise RuntimeError(f"{kernel} {key}: every config failed")
    best = min(timings, key=timings.__getitem__)
    store.record(kernel, key, best, device)
    return best, timings


def _do_bench_median_us(call: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(call, warmup=5, rep=20, return_mode="median") * 1e3
