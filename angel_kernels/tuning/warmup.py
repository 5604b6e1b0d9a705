"""The warm-up phase: benchmark candidate configs for one problem and record the fastest.

Serving code never calls this; it looks configs up in the store and falls back to a heuristic default.
Call it once per deployment (or offline per GPU, then ship the JSON) with the shapes of the model.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence, Union

import torch

from .prune import KernelConfig
from .store import TunedConfigStore
from .timing import check_calls, check_timer_usable, graph_median_us

_log = logging.getLogger(__name__)

Call = Callable[[], object]
# make_call(cfg): one call, or one call per rotating input set (same work, different tensors: see timing.py)
MakeCall = Callable[[KernelConfig], Union[Call, Sequence[Call]]]

_REASONS_SHOWN = 3


def tune_kernel(
    store: TunedConfigStore,
    kernel: str,
    key: str,
    configs: Sequence[KernelConfig],
    make_call: MakeCall,
    device: torch.device | str,
    *,
    check: Callable[[object], None] | None = None,
    bench: Callable[[list[Call]], float] | None = None,
) -> tuple[KernelConfig, dict[KernelConfig, float]]:
    """Time every config, record the fastest in ``store``; returns the winner and every admitted config's µs.

    ``make_call(cfg)`` returns an argument-free callable, or a list of them over rotating input sets whose total
    size exceeds L2 (``timing.rotation_count``) so that repeats cannot be served from it. The first call's result
    goes to ``check``, which raises for a wrong result: such a config, or one that fails to compile or to run,
    does not compete. ``bench(calls) -> µs`` gets the list of calls; by default it is ``timing.graph_median_us``
    (CUDA-graph replay over the sets, median µs per call), which needs a CUDA device and refuses the Triton
    interpreter: CPU tests pass a fake ``bench``.
    """
    if not configs:
        raise ValueError(f"{kernel} {key}: no configs to tune (all pruned?)")
    if bench is None:
        if torch.device(device).type != "cuda":
            raise RuntimeError(f"{kernel} {key}: the default timer needs a CUDA device, got {device!r}; "
                               "pass bench= to time elsewhere")
        check_timer_usable()  # before any config runs: under the interpreter every config would "fail" below
        bench = _graph_bench_on(torch.device(device))
    timings: dict[KernelConfig, float] = {}
    failures: dict[KernelConfig, str] = {}
    for cfg in configs:
        try:
            made = make_call(cfg)
            calls = [made] if callable(made) else check_calls(made)
            result = calls[0]()
            if check is not None:
                check(result)
            us = float(bench(calls))
        except Exception as e:  # a config that does not compile, is wrong or cannot be timed does not compete
            failures[cfg] = f"{type(e).__name__}: {str(e).strip()[:200]}"
            _log.warning("%s %s: %s does not compete: %s", kernel, key, cfg.as_dict(), failures[cfg])
            continue
        timings[cfg] = us
        _log.info("%s %s: %.1f µs %s", kernel, key, us, cfg.as_dict())
    if not timings:
        shown = "; ".join(f"{cfg.as_dict()} -> {why}" for cfg, why in list(failures.items())[:_REASONS_SHOWN])
        more = f" (and {len(failures) - _REASONS_SHOWN} more)" if len(failures) > _REASONS_SHOWN else ""
        raise RuntimeError(f"{kernel} {key}: every config failed: {shown}{more}")
    best = min(timings, key=timings.__getitem__)
    store.record(kernel, key, best, device)
    return best, timings


def _graph_bench_on(device: torch.device) -> Callable[[list[Call]], float]:
    """``graph_median_us`` with ``device`` current (events, streams and graphs belong to the current device)."""

    def bench(calls: list[Call]) -> float:
        with torch.cuda.device(device):
            return graph_median_us(calls)

    return bench
