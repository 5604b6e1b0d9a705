"""Shared benchmark harness: providers, refcheck, CUDA-graph timing with L2-proof input rotation, floors, results.

One script per kernel family (``bench_gemm.py``, ``bench_attention.py``) declares its cases, a floor model
(bytes that must move, FLOPs that must run) and a list of providers; ``run_family`` does the rest:

1. each provider's ``available()`` → (ok, reason): peers that cannot be imported are skipped with the reason;
2. per case, ``supports(case)`` → (ok, reason), then ``prepare(case, device)`` builds fresh random inputs (several
   input sets, rotated so that their total size exceeds L2 and repeats cannot be served from it), and a reference;
3. refcheck before timing: output vs an fp32 reference, relative error ‖out − ref‖ / ‖ref‖; NaN/inf fails;
   a provider failing it gets a ``refcheck_failed`` row and is not timed;
4. timing (``bench_us``, on ``angel_kernels.tuning.timing``, the tuner's timer too): several calls per CUDA graph
   cycling over the input sets, replayed many times, each replay timed with CUDA events; median / p20 / p80 µs
   per call; eager event timing when capture fails;
5. floors measured in the same process (copy bandwidth, fp16 and int8 tensor-core peaks): the floor of a case
   is max(bytes / bandwidth, flops / peak) and each row reports the % of it reached;
6. rows are written after every case to ``<out>/<gpu-slug>/<family>.json`` (a killed run keeps what it had),
   floors to ``<out>/<gpu-slug>/floors.json``, and a table (cases × providers, µs, plus floors) is printed.

Nothing here touches CUDA at import time; torch is imported lazily so the pure-Python parts (slug, rows, tables,
floor math) load in CPU tests without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
# Staged third-party peers (git-ignored, see stage_peers.sh) and the vLLM glue package.
EXTRA_PATHS = ("integration", ".peers/vllm", ".peers/gemlite")

# Fallbacks when the device does not report its L2 size: H100 has 50 MB; larger keeps rotation on the safe side.
DEFAULT_L2_BYTES = 64 * 1024 * 1024
# The input sets cycled by one graph total at least this many L2 sizes (one set alone may already exceed it).
ROTATION_L2_FACTOR = 2.0
MAX_INPUT_SETS = 64
# A CUDA graph holds ~2 ms of calls; each measurement spends ~150 ms replaying it (≥ 5 samples).
TARGET_GRAPH_US = 2000.0
TARGET_TOTAL_MS = 150.0
MAX_CALLS_PER_GRAPH = 256
MIN_SAMPLES, MAX_SAMPLES = 5, 50
DEFAULT_TOL = 2e-2

STATUS_OK = "ok"
STATUS_REFCHECK_FAILED = "refcheck_failed"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"

ROW_KEYS = (
    "family", "case", "case_str", "provider", "status", "median_us", "p20_us", "p80_us", "floor_us", "floor_kind",
    "pct_of_floor", "rel_err", "timing", "gpu", "torch", "triton", "git_sha", "time",
)


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------
def setup_paths(root: Path = REPO_ROOT) -> None:
    """Put the repo root, the vLLM glue and the staged peers (when present) first on sys.path."""
    for rel in reversed(("",) + EXTRA_PATHS):
        p = str(root / rel) if rel else str(root)
        if (rel == "" or (root / rel).is_dir()) and p not in sys.path:
            sys.path.insert(0, p)


def slugify(name: str) -> str:
    """Lower-case, runs of anything but [a-z0-9] become one '-': "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - metadata must never stop a run
        pass
    return "cpu"


def gpu_slug(name: Optional[str] = None) -> str:
    return slugify(gpu_name() if name is None else name)


def git_sha(root: Path = REPO_ROOT) -> str:
    """$ANGEL_GIT_SHA when set, else `git rev-parse HEAD` when the tree is a checkout, else "unknown".

    The variable wins: a tree copied to another machine may carry a stale .git whose HEAD is not the code that
    runs (rows of one GPU run were stamped with a commit seven commits old that way).
    """
    env = os.environ.get("ANGEL_GIT_SHA", "").strip()
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha):
            return sha
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "none"


def env_metadata() -> dict:
    """What every row carries: gpu name, torch/triton versions, git sha, UTC time (of this call)."""
    meta = {"gpu": gpu_name(), "torch": _version("torch"), "triton": _version("triton"), "git_sha": git_sha(),
            "time": utc_now(), "python": sys.version.split()[0]}
    try:
        import torch

        meta["cuda"] = torch.version.cuda or "none"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            meta["sm_count"] = props.multi_processor_count
            meta["capability"] = "%d.%d" % (props.major, props.minor)
            meta["l2_bytes"] = l2_bytes()
    except Exception:  # noqa: BLE001
        pass
    return meta


def l2_bytes() -> int:
    """L2 size of the current CUDA device (50 MB on H100), DEFAULT_L2_BYTES where torch does not expose it; 0
    without CUDA (the CPU runs only exercise the harness: one input set is enough there)."""
    try:
        from angel_kernels.tuning.timing import l2_bytes as device_l2_bytes

        return device_l2_bytes()
    except Exception:  # noqa: BLE001
        return DEFAULT_L2_BYTES


# ----------------------------------------------------------------------------------------------------------------
# Input sets and sizes
# ----------------------------------------------------------------------------------------------------------------
def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in obj (tensors, nested tuples/lists/dicts, nn.Modules' parameters and buffers)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the pure parts are usable without torch
        torch = None
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if torch is not None and isinstance(obj, torch.nn.Module):
        return sum(tensor_bytes(t) for t in obj.parameters()) + sum(tensor_bytes(t) for t in obj.buffers())
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def rotation_count(bytes_per_set: int, l2: Optional[int] = None, *, factor: float = ROTATION_L2_FACTOR,
                   max_sets: int = MAX_INPUT_SETS) -> int:
    """How many input sets to cycle so that together they exceed ``factor`` × L2 (1 when one set already does)."""
    from angel_kernels.tuning.timing import rotation_count as count

    return count(bytes_per_set, l2_bytes() if l2 is None else l2, factor=factor, max_sets=max_sets)


def build_sets(make_set: Callable[[int], tuple], l2: Optional[int] = None):
    """make_set(i) -> (args tuple, reference for set i). Builds set 0, sizes it, builds the rest of the rotation.

    Returns (list of args tuples, reference of set 0). References of later sets are dropped (keep them lazy).
    """
    args0, ref0 = make_set(0)
    n = rotation_count(tensor_bytes(args0), l2)
    sets = [args0] + [make_set(i)[0] for i in range(1, n)]
    return sets, ref0


# ----------------------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    """What a provider's ``prepare(case, device)`` returns.

    fn(*input_sets[i]) is the timed call. ``ref`` is the reference output for input_sets[0] (a tensor, or a
    callable returning one, computed in fp32). ``post`` maps fn's output into the reference's space outside the
    timed region (e.g. int32 accumulators × scales). ``floor_kind`` names the floor (see the family's floor model)
    the provider is measured against. ``extra_refs`` are further references whose relative errors are recorded
    (informational, never failing), e.g. an int8-KV kernel against the unquantized cache.
    """

    fn: Callable
    input_sets: list
    ref: Any
    floor_kind: str
    post: Optional[Callable] = None
    tol: float = DEFAULT_TOL
    note: str = ""
    extra_refs: dict = dataclasses.field(default_factory=dict)


def _always(*_a, **_k):
    return True, ""


@dataclasses.dataclass
class Provider:
    """A named way of computing a family's op. ``kind`` is "peer" (what users run today) or "ours"."""

    name: str
    prepare: Callable[[dict, Any], Prepared]
    available: Callable[[], tuple] = _always
    supports: Callable[[dict], tuple] = _always
    kind: str = "peer"
    description: str = ""
    floor_kind: Optional[str] = None  # the floor it is measured against (for rows of cases it never prepared)


class ProviderRegistry:
    """Ordered providers of one family; availability is checked once and cached."""

    def __init__(self, family: str):
        self.family = family
        self._providers: list[Provider] = []
        self._avail: dict[str, tuple] = {}

    def add(self, provider: Provider) -> Provider:
        if any(p.name == provider.name for p in self._providers):
            raise ValueError(f"duplicate provider {provider.name!r} in family {self.family!r}")
        self._providers.append(provider)
        return provider

    def __iter__(self):
        return iter(self._providers)

    def __len__(self):
        return len(self._providers)

    def names(self) -> list[str]:
        return [p.name for p in self._providers]

    def select(self, names: Optional[Iterable[str]]) -> "ProviderRegistry":
        if not names:
            return self
        wanted = list(names)
        unknown = [n for n in wanted if n not in self.names()]
        if unknown:
            raise ValueError(f"unknown providers {unknown}; known: {self.names()}")
        sub = ProviderRegistry(self.family)
        for p in self._providers:
            if p.name in wanted:
                sub.add(p)
        sub._avail = {k: v for k, v in self._avail.items() if k in wanted}
        return sub

    def availability(self, provider: Provider) -> tuple:
        if provider.name not in self._avail:
            try:
                ok, reason = provider.available()
            except Exception as e:  # noqa: BLE001 - an availability probe must not stop the run
                ok, reason = False, f"availability check raised {type(e).__name__}: {e}"
            self._avail[provider.name] = (bool(ok), str(reason))
        return self._avail[provider.name]


# ----------------------------------------------------------------------------------------------------------------
# Statistics, floors
# ----------------------------------------------------------------------------------------------------------------
def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty sequence (numpy's default method)."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of an empty sequence")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclasses.dataclass
class Floors:
    """Ceilings measured on this device in this process.

    copy_bw: bytes/s of a large device copy counting bytes read + written; fp16_flops: FLOP/s of an fp16 8192³
    matmul; int8_ops: OP/s of ``torch._int_mm`` at 8192³ (also used for fp8: H100's fp8 and int8 dense peaks match).
    """

    copy_bw: float
    fp16_flops: float
    int8_ops: float
    l2_bytes: int = DEFAULT_L2_BYTES
    source: str = "measured"

    def peak(self, compute: str) -> float:
        if compute == "fp16":
            return self.fp16_flops
        if compute in ("int8", "fp8"):
            return self.int8_ops
        raise ValueError(f"unknown compute kind {compute!r} (fp16, int8, fp8)")

    def floor_us(self, bytes_moved: float, flops: float, kind: str) -> float:
        return floor_us(bytes_moved, flops, kind, self)

    def as_dict(self) -> dict:
        return {
            "copy_bw_GBps": self.copy_bw / 1e9, "fp16_TFLOPs": self.fp16_flops / 1e12,
            "int8_TOPs": self.int8_ops / 1e12, "l2_bytes": self.l2_bytes, "source": self.source,
        }


def floor_us(bytes_moved: float, flops: float, kind: str, floors: Floors) -> float:
    """max(bytes / copy bandwidth, flops / peak of ``kind``) in µs: no kernel can beat both."""
    return max(bytes_moved / floors.copy_bw, flops / floors.peak(kind)) * 1e6


def pct_of_floor(floor: Optional[float], median: Optional[float]) -> Optional[float]:
    """Share of the floor's speed reached: 100 × floor / time (100 % = at the floor)."""
    if floor is None or median is None or median <= 0:
        return None
    return 100.0 * floor / median


def _event_median_s(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return quantile(times, 0.5)


def _copy_bw(n: int = 1 << 30) -> float:
    import torch

    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    src.random_(0, 256)
    dst = torch.empty_like(src)
    return 2 * n / _event_median_s(lambda: dst.copy_(src), iters=10)  # bytes read + written


def _matmul_peak(dtype_name: str, s: int = 8192) -> float:
    import torch

    if dtype_name == "int8":
        a = torch.randint(-127, 128, (s, s), device="cuda", dtype=torch.int8)
        b = torch.randint(-127, 128, (s, s), device="cuda", dtype=torch.int8).t()  # column-major, as cuBLASLt likes
        return 2 * s**3 / _event_median_s(lambda: torch._int_mm(a, b), iters=10)
    a = torch.randn(s, s, device="cuda", dtype=torch.float16)
    b = torch.randn(s, s, device="cuda", dtype=torch.float16)
    return 2 * s**3 / _event_median_s(lambda: torch.matmul(a, b), iters=10)


def measure_floors(log: Callable[[str], None] = print) -> Floors:
    """Copy bandwidth (1 GiB copy_, read+write), fp16 8192³ matmul peak, int8 ``torch._int_mm`` 8192³ peak."""
    import torch

    copy_bw = _copy_bw()
    fp16 = _matmul_peak("fp16")
    try:
        int8 = _matmul_peak("int8")
    except Exception as e:  # noqa: BLE001
        log(f"int8 peak: torch._int_mm failed ({short_exc(e)}); using 2 × fp16 peak")
        int8 = 2 * fp16
    torch.cuda.empty_cache()
    floors = Floors(copy_bw=copy_bw, fp16_flops=fp16, int8_ops=int8, l2_bytes=l2_bytes())
    log("floors: copy %.0f GB/s (read+write), fp16 %.0f TFLOP/s, int8 %.0f TOP/s, L2 %.0f MB"
        % (copy_bw / 1e9, fp16 / 1e12, int8 / 1e12, floors.l2_bytes / 1e6))
    return floors


# ----------------------------------------------------------------------------------------------------------------
# Refcheck and timing
# ----------------------------------------------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ computed in fp32 (inf when out has NaN/inf); shapes must match."""
    import torch

    if not isinstance(out, torch.Tensor):
        raise TypeError(f"provider output is {type(out).__name__}, not a tensor")
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"output shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    o = out.detach().to(torch.float32)
    r = ref.detach().to(device=o.device, dtype=torch.float32)
    if not torch.isfinite(o).all():
        return math.inf
    denom = torch.linalg.vector_norm(r).item()
    num = torch.linalg.vector_norm(o - r).item()
    return num / denom if denom > 0 else (0.0 if num == 0 else math.inf)


def refcheck(prep: Prepared, device) -> tuple:
    """Run input set 0 once and compare with the reference. Returns (passed, rel_err, extra rel errors)."""
    out = prep.fn(*prep.input_sets[0])
    sync(device)
    if prep.post is not None:
        out = prep.post(out)
    ref = prep.ref() if callable(prep.ref) else prep.ref
    err = rel_err(out, ref)
    extra = {}
    for name, r in prep.extra_refs.items():
        try:
            extra[name] = _sig(rel_err(out, r() if callable(r) else r))
        except Exception as e:  # noqa: BLE001 - informational only
            extra[name] = f"{type(e).__name__}: {e}"
    return (math.isfinite(err) and err <= prep.tol), err, extra


@dataclasses.dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    method: str  # "graph" | "eager" | "cpu"
    calls_per_sample: int
    samples: int
    note: str = ""


def bench_us(fn: Callable, input_sets: Sequence[tuple], *, device=None, use_graph: bool = True, warmup: int = 2,
             target_graph_us: Optional[float] = None, target_total_ms: Optional[float] = None,
             max_calls: Optional[int] = None) -> Timing:
    """µs per call of fn(*input_sets[i]), cycling i over the sets (their total size should exceed L2).

    CUDA: ``angel_kernels.tuning.timing.time_calls`` (the tuner's timer): warm up eagerly (compiles/autotunes),
    capture ``calls`` calls into one CUDA graph, replay it ``samples`` times timing each replay with events;
    per-call time = replay time / calls. Falls back to eager event timing of the same call sequence when capture
    fails (host overhead included then; ``method`` says which). CPU: wall clock (only for exercising the harness).
    """
    import torch

    from angel_kernels.tuning.timing import calls_per_replay, sample_count

    target_graph_us = TARGET_GRAPH_US if target_graph_us is None else target_graph_us
    target_total_ms = TARGET_TOTAL_MS if target_total_ms is None else target_total_ms
    max_calls = MAX_CALLS_PER_GRAPH if max_calls is None else max_calls
    n = len(input_sets)
    if n == 0:
        raise ValueError("no input sets")
    dev_type = getattr(device, "type", str(device)) if device is not None else (
        "cuda" if torch.cuda.is_available() else "cpu")

    if dev_type == "cuda":
        from angel_kernels.tuning.timing import time_calls

        t = time_calls([functools.partial(fn, *args) for args in input_sets], use_graph=use_graph,
                       eager_fallback=True, warmup=warmup, target_replay_us=target_graph_us,
                       target_total_ms=target_total_ms, max_calls=max_calls, min_samples=MIN_SAMPLES,
                       max_samples=MAX_SAMPLES)
        return Timing(t.median_us, t.p20_us, t.p80_us, t.method, t.calls_per_sample, t.samples, t.note)

    def run_seq(calls: int) -> None:
        for i in range(calls):
            fn(*input_sets[i % n])

    run_seq(max(warmup, 1) * n)
    t0 = time.perf_counter()
    run_seq(n)
    est = (time.perf_counter() - t0) * 1e6 / n
    calls = calls_per_replay(est, n, target_graph_us, max_calls)
    samples = []
    for _ in range(sample_count(est * calls, target_total_ms, MIN_SAMPLES, MAX_SAMPLES)):
        t0 = time.perf_counter()
        run_seq(calls)
        samples.append((time.perf_counter() - t0) * 1e6 / calls)
    return Timing(quantile(samples, 0.5), quantile(samples, 0.2), quantile(samples, 0.8), "cpu", calls,
                  len(samples))


# ----------------------------------------------------------------------------------------------------------------
# Rows, JSON, tables
# ----------------------------------------------------------------------------------------------------------------
def _r(v: Optional[float], digits: int = 3) -> Optional[float]:
    return None if v is None else round(float(v), digits)


def _sig(v: Optional[float], sig: int = 4):
    """v to ``sig`` significant digits; non-finite values as strings ("inf", "nan": valid JSON)."""
    if v is None:
        return None
    if not math.isfinite(v):
        return str(v)
    return float(f"{v:.{sig}g}")


def make_row(family: str, case: dict, case_str: str, provider: str, meta: dict, *, status: str = STATUS_OK,
             timing: Optional[Timing] = None, floor: Optional[float] = None, floor_kind: Optional[str] = None,
             rel_error: Optional[float] = None, case_floors: Optional[dict] = None, **extra) -> dict:
    """One result row (the JSON schema of the results files; ROW_KEYS always present, extras when set)."""
    med = timing.median_us if timing else None
    rel = _sig(rel_error)
    row = {
        "family": family, "case": dict(case), "case_str": case_str, "provider": provider, "status": status,
        "median_us": _r(med),
        "p20_us": _r(timing.p20_us) if timing else None,
        "p80_us": _r(timing.p80_us) if timing else None,
        "floor_us": _r(floor), "floor_kind": floor_kind,
        "pct_of_floor": _r(pct_of_floor(floor, med), 2),
        "rel_err": rel,
        "timing": timing.method if timing else None,
        "gpu": meta.get("gpu"), "torch": meta.get("torch"), "triton": meta.get("triton"),
        "git_sha": meta.get("git_sha"), "time": utc_now(),
    }
    if timing is not None:
        extra.setdefault("calls_per_sample", timing.calls_per_sample)
        extra.setdefault("samples", timing.samples)
        if timing.note:
            extra["note"] = (extra.get("note", "") + "; " + timing.note).strip("; ")
    if case_floors:
        extra["case_floors"] = {k: _r(v) for k, v in case_floors.items()}
    row.update({k: _json_safe(v) for k, v in extra.items() if v not in (None, "", {})})
    return row


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def result_dir(out: os.PathLike, slug: str) -> Path:
    return Path(out) / slug


def _atomic_write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump([_clean(r) for r in data] if isinstance(data, list) else _clean(data), fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_rows(rows: list, out: os.PathLike, slug: str, family: str) -> Path:
    path = result_dir(out, slug) / f"{family}.json"
    _atomic_write_json(path, list(rows))
    return path


def load_rows(path: os.PathLike) -> list:
    with open(path) as fh:
        rows = json.load(fh)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows")
    return rows


def write_floors(out: os.PathLike, slug: str, family: str, floors: Floors, meta: dict,
                 unavailable: Optional[dict] = None) -> Path:
    """Merge this family's floors (and the providers that were unavailable, with reasons) into floors.json."""
    path = result_dir(out, slug) / "floors.json"
    data = {}
    if path.exists():
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            data = {}
    data[family] = {**floors.as_dict(), "meta": meta, "unavailable": dict(unavailable or {})}
    _atomic_write_json(path, data)
    return path


def _fmt_cell(row: Optional[dict], metric: str) -> str:
    if row is None:
        return "-"
    st = row.get("status")
    if st == STATUS_OK:
        v = row.get(metric)
        if v is None:
            return "-"
        cell = f"{v:.1f}"
        return cell + ("e" if metric == "median_us" and row.get("timing") == "eager" else "")
    return {STATUS_REFCHECK_FAILED: "FAIL", STATUS_ERROR: "err", STATUS_SKIPPED: "skip"}.get(st, str(st))


def format_table(rows: Sequence[dict], metric: str = "median_us", title: Optional[str] = None) -> str:
    """Markdown table: one line per case (first-seen order), one column per provider, plus the case's floors.

    Cells: µs (``median_us``) or % of floor (``pct_of_floor``); "e" marks eager timing, FAIL a refcheck failure,
    err an error, skip an unsupported case.
    """
    cases, providers, kinds = [], [], []
    cell, floors = {}, {}
    for r in rows:
        cs, pv = r["case_str"], r["provider"]
        if cs not in cases:
            cases.append(cs)
        if pv not in providers:
            providers.append(pv)
        cell[(cs, pv)] = r
        cf = dict(r.get("case_floors") or {})
        if r.get("floor_kind") and r.get("floor_us") is not None:
            cf.setdefault(r["floor_kind"], r["floor_us"])
        for fk, v in cf.items():
            if v is None:
                continue
            if fk not in kinds:
                kinds.append(fk)
            floors[(cs, fk)] = v
    unit = "µs" if metric == "median_us" else "% of floor"
    header = ["case"] + providers + (["floor " + " / ".join(kinds) + " (µs)"] if kinds else [])
    lines = []
    if title:
        lines.append(f"### {title} ({unit})")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for cs in cases:
        cells = [cs] + [_fmt_cell(cell.get((cs, pv)), metric) for pv in providers]
        if kinds:
            cells.append(" / ".join(f"{floors[(cs, k)]:.1f}" if (cs, k) in floors else "-" for k in kinds))
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{r['provider']}: {r['note']}" for r in rows if r.get("note") and r.get("status") == STATUS_OK})
    problems = [f"{r['case_str']} / {r['provider']}: {r['status']}: {r.get('error') or r.get('reason') or ''}"
                f"{' (rel_err %.3g)' % r['rel_err'] if isinstance(r.get('rel_err'), float) else ''}"
                for r in rows if r.get("status") in (STATUS_ERROR, STATUS_REFCHECK_FAILED)]
    if metric == "median_us":
        for n in notes:
            lines.append(f"- note {n}")
        for p in problems[:20]:
            lines.append(f"- {p}")
        if len(problems) > 20:
            lines.append(f"- ... {len(problems) - 20} more problems in the JSON")
    return "\n".join(lines)


def print_tables(rows: Sequence[dict], family: str, log: Callable[[str], None] = print) -> None:
    log(format_table(rows, "median_us", title=family))
    log("")
    log(format_table(rows, "pct_of_floor", title=family))


# ----------------------------------------------------------------------------------------------------------------
# Running a family
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Family:
    """A kernel family: its cases, how to name them, and its floor model.

    floor_model(case) -> {floor_kind: (bytes_moved, flops, compute_kind)}.
    """

    name: str
    cases: list
    case_str: Callable[[dict], str]
    floor_model: Callable[[dict], dict]
    providers: ProviderRegistry
    sort_key: Optional[Callable[[dict], Any]] = None  # order of cases in the written JSON and tables

    def sorted_rows(self, rows: list) -> list:
        if self.sort_key is None:
            return list(rows)
        return sorted(rows, key=lambda r: self.sort_key(r["case"]))


def short_exc(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def _cuda_alive() -> bool:
    try:
        import torch

        torch.cuda.synchronize()
        torch.empty(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def _free(device) -> None:
    """Return a measurement's inputs (up to GBs) to the device before the next provider allocates its own."""
    if getattr(device, "type", str(device)) != "cuda":
        return
    import gc

    import torch

    gc.collect()
    try:
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def plan(family: Family, log: Callable[[str], None] = print, *, cuda: Optional[bool] = None) -> dict:
    """Print which providers would run on which cases, and why the others would not. Returns {name: (ok, reason)}."""
    avail = {p.name: family.providers.availability(p) for p in family.providers}
    log(f"## plan: family {family.name}, {len(family.cases)} cases, {len(family.providers)} providers"
        + ("" if cuda is None else f" (CUDA {'available' if cuda else 'not available: nothing would be timed'})"))
    for p in family.providers:
        ok, reason = avail[p.name]
        log(f"- {p.name} [{p.kind}] {'available' if ok else 'UNAVAILABLE: ' + reason}"
            + (f" — {p.description}" if p.description else ""))
    for case in family.cases:
        fl = family.floor_model(case)
        parts = []
        for p in family.providers:
            if not avail[p.name][0]:
                continue
            try:
                ok, reason = p.supports(case)
            except Exception as e:  # noqa: BLE001
                ok, reason = False, short_exc(e)
            parts.append(p.name if ok else f"{p.name} (skip: {reason})")
        floors = ", ".join(f"{k} {b / 1e6:.1f} MB" for k, (b, _f, _c) in fl.items())
        log(f"  {family.case_str(case)}: {', '.join(parts) or 'nothing'}  [bytes: {floors}]")
    return avail


def run_family(family: Family, *, out: os.PathLike, device=None, floors: Optional[Floors] = None,
               meta: Optional[dict] = None, budget_s: Optional[float] = None, use_graph: bool = True,
               log: Callable[[str], None] = print) -> list:
    """Measure every (case, provider); write rows after each case; return the rows.

    A provider that raises is recorded as an ``error`` row and the run goes on; if the CUDA context itself is lost,
    the remaining measurements are recorded as errors without being attempted.
    """
    import torch

    device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = meta or env_metadata()
    slug = slugify(meta.get("gpu", "unknown"))
    if floors is None:
        floors = measure_floors(log) if device.type == "cuda" else Floors(1e11, 1e12, 2e12, DEFAULT_L2_BYTES, "nominal")
    avail = {p.name: family.providers.availability(p) for p in family.providers}
    unavailable = {n: r for n, (ok, r) in avail.items() if not ok}
    for n, r in unavailable.items():
        log(f"[{family.name}] provider {n} skipped: {r}")
    write_floors(out, slug, family.name, floors, meta, unavailable)

    rows: list = []
    t0 = time.perf_counter()
    cuda_lost = None
    for case in family.cases:
        cs = family.case_str(case)
        fmodel = family.floor_model(case)
        cfloors = {k: floor_us(b, f, c, floors) for k, (b, f, c) in fmodel.items()}
        over_budget = budget_s is not None and time.perf_counter() - t0 > budget_s
        for p in family.providers:
            if not avail[p.name][0]:
                continue
            common = dict(family=family.name, case=case, case_str=cs, provider=p.name, meta=meta,
                          case_floors=cfloors)
            pf = cfloors.get(p.floor_kind) if p.floor_kind else None
            pk = p.floor_kind if pf is not None else None
            if cuda_lost or over_budget:
                reason = cuda_lost or f"time budget of {budget_s:.0f} s spent"
                rows.append(make_row(**common, status=STATUS_SKIPPED if over_budget and not cuda_lost
                                     else STATUS_ERROR, reason=reason, floor=pf, floor_kind=pk))
                continue
            try:
                ok, reason = p.supports(case)
            except Exception as e:  # noqa: BLE001
                ok, reason = False, short_exc(e)
            if not ok:
                rows.append(make_row(**common, status=STATUS_SKIPPED, reason=reason, floor=pf, floor_kind=pk))
                continue
            rows.append(_measure(p, case, common, fmodel, floors, device, use_graph, log))
            _free(device)
            if device.type == "cuda" and rows[-1]["status"] == STATUS_ERROR and not _cuda_alive():
                cuda_lost = f"CUDA context lost after {p.name} on {cs}"
                log(f"[{family.name}] {cuda_lost}: remaining measurements not attempted")
        write_rows(rows, out, slug, family.name)
        done = [r for r in rows if r["case_str"] == cs]
        log(f"[{family.name}] {cs}: " + ", ".join(
            f"{r['provider']} {_fmt_cell(r, 'median_us')}" for r in done) + f"  ({time.perf_counter() - t0:.0f} s)")
    rows = family.sorted_rows(rows)
    path = write_rows(rows, out, slug, family.name)
    log(f"[{family.name}] {len(rows)} rows -> {path}")
    return rows


def _measure(p: Provider, case: dict, common: dict, fmodel: dict, floors: Floors, device, use_graph: bool,
             log: Callable[[str], None]) -> dict:
    prep = None
    try:
        prep = p.prepare(case, device)
        if prep.floor_kind not in fmodel:
            raise KeyError(f"floor kind {prep.floor_kind!r} not in the floor model {sorted(fmodel)}")
        b, f, compute = fmodel[prep.floor_kind]
        fl = floor_us(b, f, compute, floors)
        extra = dict(note=prep.note, sets=len(prep.input_sets), set_bytes=tensor_bytes(prep.input_sets[0]))
        passed, err, extra_errs = refcheck(prep, device)
        if extra_errs:
            extra["extra_rel_err"] = extra_errs
        if not passed:
            log(f"  {p.name}: refcheck FAILED, rel_err {err:.3g} > tol {prep.tol:g}")
            return make_row(**common, status=STATUS_REFCHECK_FAILED, floor=fl, floor_kind=prep.floor_kind,
                            rel_error=err, tol=prep.tol, **extra)
        timing = bench_us(prep.fn, prep.input_sets, device=device, use_graph=use_graph)
        return make_row(**common, status=STATUS_OK, timing=timing, floor=fl, floor_kind=prep.floor_kind,
                        rel_error=err, **extra)
    except Exception as e:  # noqa: BLE001 - one provider's failure never stops the run
        log(f"  {p.name}: error {short_exc(e)}")
        fl = fk = None
        kind = prep.floor_kind if prep is not None else p.floor_kind
        if kind in fmodel:
            fk = kind
            b, f, compute = fmodel[fk]
            fl = floor_us(b, f, compute, floors)
        return make_row(**common, status=STATUS_ERROR, floor=fl, floor_kind=fk, error=short_exc(e))
    finally:
        del prep


# ----------------------------------------------------------------------------------------------------------------
# Command line shared by the family scripts
# ----------------------------------------------------------------------------------------------------------------
def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="out", help="results root: writes OUT/<gpu-slug>/<family>.json (default: out)")
    ap.add_argument("--dry-run", action="store_true", help="build cases, print the plan, time nothing")
    ap.add_argument("--quick", action="store_true", help="only the reference rows of ANCHORS (fast)")
    ap.add_argument("--providers", default="", help="comma-separated provider names (default: all)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new cases after this many seconds (remaining rows: skipped)")
    ap.add_argument("--eager", action="store_true", help="time eagerly (no CUDA graphs)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny cases on whatever device is present (CPU: wall clock): exercises the wiring, "
                         "refcheck and result files; not a benchmark")


def angel_has(*names: str) -> tuple[bool, str]:
    """Availability of an angel-kernels provider: the package imports and exports ``names``."""
    try:
        import angel_kernels
    except Exception as e:  # noqa: BLE001
        return False, f"angel_kernels not importable ({short_exc(e)})"
    missing = [n for n in names if not hasattr(angel_kernels, n)]
    return (False, f"angel_kernels has no {', '.join(missing)}") if missing else (True, "")


def run_family_cli(description: str, make_family: Callable[[bool, bool], Family], default_budget_s: float,
                   argv=None) -> int:
    """Command line of a family without options of its own: the common arguments, then ``main_family``
    (``make_family(quick, smoke)``); a full run stops starting cases after ``default_budget_s``."""
    setup_paths()
    ap = argparse.ArgumentParser(description=description)
    add_common_args(ap)
    args = ap.parse_args(argv)
    if args.budget_s is None and not args.quick and not args.smoke:
        args.budget_s = default_budget_s
    return main_family(make_family(args.quick, args.smoke), args)


def main_family(family: Family, args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    import torch

    if args.providers:
        family = dataclasses.replace(family, providers=family.providers.select(
            [s.strip() for s in args.providers.split(",") if s.strip()]))
    cuda = torch.cuda.is_available()
    if args.dry_run:
        plan(family, log, cuda=cuda)
        return 0
    if not cuda and not getattr(args, "smoke", False):
        log("no CUDA device: nothing to time (use --dry-run to see the plan, --smoke to exercise the harness)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    torch.backends.cudnn.allow_tf32 = False
    meta = env_metadata()
    log(f"[{family.name}] {meta['gpu']} torch {meta['torch']} triton {meta['triton']} git {meta['git_sha'][:12]}")
    rows = run_family(family, out=args.out, device=torch.device("cuda" if cuda else "cpu"), meta=meta,
                      budget_s=args.budget_s, use_graph=not args.eager, log=log)
    print_tables(rows, family.name, log)
    return 0


def _cli(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="print the tables of result JSON files")
    ap.add_argument("cmd", choices=["table"])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--metric", choices=["us", "pct", "both"], default="both")
    args = ap.parse_args(argv)
    for f in args.files:
        rows = load_rows(f)
        title = f"{rows[0]['family'] if rows else Path(f).stem} — {rows[0]['gpu'] if rows else ''}"
        if args.metric in ("us", "both"):
            print(format_table(rows, "median_us", title=title))
            print()
        if args.metric in ("pct", "both"):
            print(format_table(rows, "pct_of_floor", title=title))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
