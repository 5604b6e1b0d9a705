"""The graph timer (``angel_kernels.tuning.timing``) and ``tune_kernel``'s use of it.

CPU tier: argument checks, the interpreter / no-CUDA guards (nothing is run or timed there), rotation sizing, graph
sizing, and how ``tune_kernel`` hands rotating calls to its bench. GPU tier: the timer measures on CUDA.
"""
import math

import pytest
import torch

from angel_kernels.tuning import GraphCaptureError, KernelConfig, TunedConfigStore, time_calls, tune_kernel
from angel_kernels.tuning import timing as T


def _counting():
    ran = []
    return ran, (lambda: ran.append(1))


# ---------------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("calls, exc, match", [
    (lambda: None, TypeError, "not a single callable"),
    ([], ValueError, "calls is empty"),
    ((), ValueError, "calls is empty"),
    ("abc", TypeError, "got str"),
    (iter([lambda: None]), TypeError, "got list_iterator"),
    ([lambda: None, 3], TypeError, r"calls\[1\] is int"),
], ids=["one-callable", "empty-list", "empty-tuple", "str", "iterator", "non-callable-item"])
def test_bad_calls_are_clear_errors(calls, exc, match):
    with pytest.raises(exc, match=match):
        time_calls(calls)


@pytest.mark.parametrize("kwargs, match", [
    (dict(warmup=-1), "warmup"),
    (dict(warmup=1.5), "warmup"),
    (dict(target_replay_us=0), "target_replay_us"),
    (dict(target_total_ms=math.nan), "target_total_ms"),
    (dict(max_calls=0), "max_calls"),
    (dict(min_samples=0), "min_samples"),
    (dict(min_samples=10, max_samples=5), "min_samples <= max_samples"),
])
def test_bad_parameters_are_clear_errors_before_anything_runs(kwargs, match):
    ran, call = _counting()
    with pytest.raises(ValueError, match=match):
        time_calls([call], **kwargs)
    assert ran == []


def test_calls_are_checked_and_listed():
    f, g = (lambda: 1), (lambda: 2)
    assert T.check_calls((f, g)) == [f, g]


# --------------------------------------------------------------------------------------------------- the guards
def test_refuses_the_interpreter_without_running_anything(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ran, call = _counting()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        time_calls([call, call])
    assert ran == []


def test_refuses_a_machine_without_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran, call = _counting()
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        time_calls([call])
    assert ran == []


def test_tune_kernel_default_timer_refuses_cpu_before_any_config_runs(tmp_path):
    made = []
    with pytest.raises(RuntimeError, match="default timer needs a CUDA device"):
        tune_kernel(TunedConfigStore(tmp_path), "toy", "k", [KernelConfig(16, 64, 64)],
                    lambda cfg: made.append(cfg) or (lambda: None), "cpu")
    assert made == []


def test_tune_kernel_default_timer_refuses_the_interpreter_on_cuda(tmp_path, monkeypatch):
    """Under the interpreter every config would fail to time and be dropped one by one: refuse up front."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    made = []
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tune_kernel(TunedConfigStore(tmp_path), "toy", "k", [KernelConfig(16, 64, 64)],
                    lambda cfg: made.append(cfg) or (lambda: None), "cuda")
    assert made == []


# ----------------------------------------------------------------------------------------- rotation and sizing
def test_rotation_exceeds_twice_l2():
    l2 = 50 * 2**20
    for set_bytes in (1, 8_650_000, 16_800_000, 60_500_000, 2**30):
        n = T.rotation_count(set_bytes, l2)
        assert 1 <= n <= T.MAX_INPUT_SETS
        assert n == T.MAX_INPUT_SETS or n * set_bytes >= T.ROTATION_L2_FACTOR * l2
        assert n == 1 or (n - 1) * set_bytes < T.ROTATION_L2_FACTOR * l2  # no more sets than needed
    assert T.rotation_count(16_800_000, l2) == 7  # a 4096×4096 int8 weight (the w8a16 tune docstring)
    assert T.rotation_count(10, 0) == 1  # no L2 to defeat (CPU)
    assert T.rotation_count(10, l2, max_sets=3) == 3
    with pytest.raises(ValueError, match="max_sets"):
        T.rotation_count(10, l2, max_sets=0)


def test_no_l2_on_cpu():
    assert T.l2_bytes("cpu") == 0


@pytest.mark.parametrize("est_us, n_sets, expect", [
    (10.0, 1, 200),    # 2 ms of 10 µs calls
    (10.0, 7, 203),    # rounded up to whole passes over 7 sets
    (0.5, 1, 256),     # capped
    (0.5, 64, 256),    # capped, still whole passes
    (5000.0, 3, 3),    # one pass at least
    (0.0, 2, 256),     # a zero estimate does not divide by zero
])
def test_calls_per_replay(est_us, n_sets, expect):
    calls = T.calls_per_replay(est_us, n_sets, T.TARGET_REPLAY_US, T.MAX_CALLS_PER_REPLAY)
    assert calls == expect and calls % n_sets == 0


def test_sample_count_bounds():
    assert T.sample_count(2000.0, 150.0) == T.MAX_SAMPLES  # 75 replays of 2 ms fit 150 ms: capped at 50
    assert T.sample_count(3000.0, 150.0) == 50
    assert T.sample_count(10_000.0, 150.0) == 15
    assert T.sample_count(1e6, 150.0) == T.MIN_SAMPLES


# ------------------------------------------------------------------------------- tune_kernel with rotating calls
def test_tune_kernel_checks_the_first_set_and_benches_every_set(tmp_path):
    a, b = KernelConfig(16, 64, 64), KernelConfig(16, 128, 64)
    checked, benched = [], []

    def make_call(cfg):
        return [lambda i=i: (cfg, i) for i in range(3)]  # one call per input set

    def bench(calls):
        benched.append([c() for c in calls])
        return 1.0 if calls[0]()[0] == b else 2.0

    best, timings = tune_kernel(TunedConfigStore(tmp_path), "toy", "k", [a, b], make_call, "cpu",
                                check=checked.append, bench=bench)
    assert best == b and timings == {a: 2.0, b: 1.0}
    assert checked == [(a, 0), (b, 0)]  # only set 0 is checked
    assert benched == [[(a, 0), (a, 1), (a, 2)], [(b, 0), (b, 1), (b, 2)]]


def test_tune_kernel_single_call_reaches_bench_as_a_list(tmp_path):
    seen = []
    cfg = KernelConfig(16, 64, 64)
    tune_kernel(TunedConfigStore(tmp_path), "toy", "k", [cfg], lambda c: (lambda: "out"), "cpu",
                bench=lambda calls: seen.append(calls) or 1.0)
    assert len(seen) == 1 and isinstance(seen[0], list) and [c() for c in seen[0]] == ["out"]


def test_tune_kernel_says_why_every_config_failed(tmp_path):
    bad_list, wrong, no_graph = KernelConfig(16, 32, 64), KernelConfig(16, 64, 64), KernelConfig(16, 128, 64)

    def make_call(cfg):
        if cfg == bad_list:
            return []
        return lambda: cfg

    def check(result):
        if result == wrong:
            raise ValueError("relative error 0.5")

    def bench(calls):
        raise GraphCaptureError("CUDA graph capture failed (toy)")

    with pytest.raises(RuntimeError, match="every config failed") as info:
        tune_kernel(TunedConfigStore(tmp_path), "toy", "k", [bad_list, wrong, no_graph], make_call, "cpu",
                    check=check, bench=bench)
    msg = str(info.value)
    assert "calls is empty" in msg and "relative error 0.5" in msg and "GraphCaptureError" in msg


# ------------------------------------------------------------------------------------------------------ GPU tier
def _copies(n_sets, bytes_each, device="cuda"):
    srcs = [torch.empty(bytes_each, dtype=torch.uint8, device=device).random_(0, 256) for _ in range(n_sets)]
    dsts = [torch.empty_like(s) for s in srcs]
    return [lambda s=s, d=d: d.copy_(s) for s, d in zip(srcs, dsts)]


@pytest.mark.gpu
def test_gpu_timer_measures_graph_replays():
    """Copies of 64 MB (bandwidth-bound, ~40 µs on H100) over 4 sets: graph method, whole passes, sane spread;
    twice the bytes per call takes about twice the time (what a ranking relies on)."""
    one = time_calls(_copies(4, 64 << 20))
    assert one.method == "graph" and one.note == ""
    assert one.calls_per_sample % 4 == 0 and T.MIN_SAMPLES <= one.samples <= T.MAX_SAMPLES
    assert 0 < one.p20_us <= one.median_us <= one.p80_us
    assert one.calls_per_sample * one.median_us >= 500  # a replay lasts ≥ ~1 ms (0.5 ms with slack)
    two = time_calls(_copies(4, 128 << 20))
    assert 1.6 < two.median_us / one.median_us < 2.4, (one, two)


@pytest.mark.gpu
def test_gpu_launch_bound_calls_still_fill_a_millisecond():
    """A call whose host side (100 µs busy wait) outlasts its ~11 µs copy: the eager estimate sizes the graph for
    ~20 calls, 0.2 ms; the timer re-sizes from the graph's own time so a replay lasts ≥ ~1 ms."""
    import time

    def slow_host(copy):
        def call():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 1e-4:
                pass
            copy()
        return call

    t = time_calls([slow_host(c) for c in _copies(4, 16 << 20)])
    assert t.method == "graph" and t.median_us < 50, t  # the busy wait is not captured
    assert t.calls_per_sample * t.median_us >= 1000, t


@pytest.mark.gpu
def test_gpu_capture_failure_is_a_clear_error_or_eager_fallback():
    x = torch.ones(1 << 20, device="cuda")

    def syncs():  # .item() synchronizes with the host: not capturable
        return (x * 2).sum().item()

    with pytest.raises(GraphCaptureError, match="capture failed"):
        time_calls([syncs], target_total_ms=5.0)
    eager = time_calls([syncs], eager_fallback=True, target_total_ms=5.0)
    assert eager.method == "eager" and "graph capture failed" in eager.note and eager.median_us > 0
    assert float((x + 1).sum()) == 2 * (1 << 20)  # the CUDA context survived the failed captures
    assert torch.randn(4, device="cuda").isfinite().all()  # and the CUDA generator left capture mode


@pytest.mark.gpu
def test_gpu_tune_kernel_default_timer_ranks_by_graph_time(tmp_path):
    """Default bench on CUDA: the config doing a quarter of the work wins, over rotating sets."""
    small, big = KernelConfig(16, 64, 64), KernelConfig(16, 256, 64)
    sets = {small: _copies(2, 16 << 20), big: _copies(2, 64 << 20)}
    store = TunedConfigStore(tmp_path)
    best, timings = tune_kernel(store, "toy", "k", [big, small], lambda cfg: sets[cfg], "cuda")
    assert best == small and timings[big] > 2 * timings[small], timings
    assert store.lookup("toy", "k", "cuda") == small
