"""GEMM family: y = x·Wᵀ, x fp16 [M, K], W [N, K] (Llama-3 8B / 70B projection shapes), against the peers.

Peers (what users run today), each checked against an fp32 reference of its own quantized weights before timing:
- ``cublas_fp16``        torch.nn.functional.linear, fp16 weights (cuBLAS).
- ``cublaslt_fp8``       torch._scaled_mm, e4m3 weights with per-channel scales and e4m3 activations with per-token
                         scales (row-wise; per-tensor where row-wise is refused). x is quantized OUTSIDE the timed
                         region: the row is the GEMM alone (a serving stack adds a ~µs quantization kernel).
- ``torch_int_mm``       torch._int_mm int8 × int8 → int32 (cuBLASLt), per-token x / per-channel W; x quantized and
                         the int32 → fp16 rescale done OUTSIDE the timed region (GEMM alone). Refuses M ≤ 16.
- ``tinygemm_w4``        torch.ops.aten._weight_int4pack_mm, bf16 activations, int4 weights, group 128
                         (tinygemm layout from _convert_weight_to_int4pack, inner_k_tiles 8).
- ``gemlite_a16w8``      gemlite 0.6.0.post2 A16W8 (int8 per-channel), ``gemlite_a16w4_g128`` A16W4 HQQ-style
                         asymmetric int4 group 128, ``gemlite_a8w8`` A8W8 int8 dynamic: the per-token activation
                         quantization runs INSIDE its call, as gemlite does it. Timed under CUDA graphs (its eager
                         call costs 100–300 µs of host overhead).
Ours (added when ``angel_kernels`` provides the op): ``angel_w8a16``, ``angel_w8a16_tile_major`` (the same on a
tile-major weight), ``angel_w4a16`` (symmetric, group 128).

Floors (as in ANCHORS.md): weights once + fp16 activations + fp16 output over the measured copy bandwidth, or the
FLOPs over the tensor-core peak (fp16 for weight-only, int8 for A8W8/fp8) when that is larger; scales not counted.

Usage: python benchmarks/bench_gemm.py [--out OUT] [--quick | --full] [--dry-run] [--shapes a,b] [--m 1,16]
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

try:
    from . import harness as H
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import harness as H

FAMILY = "gemm"
# name -> (N, K): Llama-3-8B qkv / o / gate_up / down, Llama-3-70B gate_up / down (tensor-parallel 1).
SHAPES = {
    "8b.qkv": (6144, 4096),
    "8b.o": (4096, 4096),
    "8b.gate_up": (28672, 4096),
    "8b.down": (4096, 14336),
    "70b.gate_up": (28672, 8192),
    "70b.down": (8192, 28672),
}
M_ALL = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# The rows of ANCHORS.md: always measured first, so a run cut by its time budget still has them.
QUICK = {"8b.gate_up": (1, 16, 64, 256, 1024), "8b.down": (1, 16, 64, 1024), "70b.gate_up": (1, 16, 256, 1024)}
# After the quick rows, the remaining cases go in this M order (decode sizes first), every shape per M.
M_PRIORITY = (1, 16, 64, 256, 1024, 4, 128, 4096, 2, 8, 32, 512)
# Default wall-clock budget for starting new cases (the quick rows come first and take ~1 min; the whole grid may
# not fit: the rows left out are written as skipped, and --full runs everything).
DEFAULT_BUDGET_S = 220.0
GROUP = 128  # int4 group size
TINYGEMM_INNER_K_TILES = 8  # torchao's default; K must be a multiple of 8 × 16


def make_case(shape: str, m: int) -> dict:
    n, k = SHAPES[shape]
    return {"shape": shape, "M": int(m), "N": n, "K": k}


def case_str(c: dict) -> str:
    return f"{c['shape']} {c['N']}x{c['K']} M={c['M']}"


def sort_key(c: dict):
    order = list(SHAPES)
    return (order.index(c["shape"]) if c["shape"] in order else len(order), c["M"])


SMOKE_CASES = ({"shape": "smoke", "M": 1, "N": 256, "K": 256}, {"shape": "smoke", "M": 32, "N": 256, "K": 256})


def build_cases(quick: bool = False, shapes=None, ms=None, smoke: bool = False) -> list:
    """Quick rows first, then the rest of the grid by M priority; filtered by shapes / M when given."""
    if smoke:
        return [dict(c) for c in SMOKE_CASES]
    order = [make_case(s, m) for s, mlist in QUICK.items() for m in mlist]
    if not quick:
        seen = {(c["shape"], c["M"]) for c in order}
        for m in M_PRIORITY:
            for s in SHAPES:
                if (s, m) not in seen:
                    order.append(make_case(s, m))
    if shapes:
        order = [c for c in order if c["shape"] in shapes]
    if ms:
        order = [c for c in order if c["M"] in ms]
    return order


def floor_model(c: dict) -> dict:
    """{floor kind: (bytes, flops, compute)}: weights once + fp16 x + fp16 y; 2·M·N·K FLOPs."""
    m, n, k = c["M"], c["N"], c["K"]
    io = 2 * m * k + 2 * m * n
    flops = 2 * m * n * k
    return {
        "w16": (2 * n * k + io, flops, "fp16"),
        "w8": (n * k + io, flops, "fp16"),
        "a8w8": (n * k + io, flops, "int8"),
        "w4": (n * k // 2 + io, flops, "fp16"),
    }


# ------------------------------------------------------------------------------------------------------------------
# Quantizers and layouts (pure torch: the references, also checked on CPU by the tests)
# ------------------------------------------------------------------------------------------------------------------
def quant_rows_int8(w):
    """w [N, K] → (q int8 [N, K], s fp32 [N]), symmetric per-row absmax: w ≈ q · s[:, None]."""
    import torch

    wf = w.float()
    s = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-6)
    q = (wf / s[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, s


def quant_rows_fp8(w):
    """w [N, K] → (q float8_e4m3fn [N, K], s fp32 [N]), per-row absmax / 448."""
    import torch

    wf = w.float()
    s = (wf.abs().amax(dim=1) / 448.0).clamp_min(1e-12)
    q = (wf / s[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, s


def quant_act_per_token(x, dtype, qmax: float, qmin: float, round_: bool):
    """x [M, K] → (q [M, K] of dtype, s fp32 [M]); gemlite's formula: s = max(|x|)/qmax, q = clamp(x/s) (rounded)."""
    xf = x.float()
    s = (xf.abs().amax(dim=1) / qmax).clamp_min(1e-6)
    q = (xf / s[:, None]).clamp(qmin, qmax)
    if round_:
        q = q.round()
    return q.to(dtype), s


def quant_int4_asym(w, group: int = GROUP):
    """w [N, K] → (q uint8 [N, K] in 0..15, scale fp32 [N, K/g], zero fp32 [N, K/g]); w ≈ (q − zero) · scale.

    Min/max asymmetric (HQQ's convention of a float zero point), one scale and zero per group of K.
    """
    import torch

    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((mx - mn) / 15.0).clamp_min(1e-6)
    zero = -mn / scale
    q = (wg / scale[..., None] + zero[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, scale, zero


def dequant_int4(q, scale, zero, group: int = GROUP):
    """(q − zero) · scale per group → fp32 [N, K]."""
    n, k = q.shape
    qg = q.float().reshape(n, k // group, group)
    return ((qg - zero.float()[..., None]) * scale.float()[..., None]).reshape(n, k)


def pack_int4_tinygemm(q):
    """q uint8 [N, K] (0..15) → uint8 [N, K/2], element 2j in the high nibble and 2j+1 in the low nibble of byte j
    (the input layout of ``_convert_weight_to_int4pack`` on CUDA since torch 2.5)."""
    import torch

    qi = q.to(torch.uint8)
    return ((qi[:, ::2] << 4) | qi[:, 1::2]).contiguous()


def tinygemm_scales_zeros(scale, zero, dtype):
    """tinygemm dequantizes w = (q − 8) · scale + zero_t; with w = (q − zero) · scale, zero_t = (8 − zero) · scale.

    Returns [K/g, N, 2] (scale, zero_t) in ``dtype`` (bf16: the op's activations' dtype).
    """
    import torch

    zt = (8.0 - zero.float()) * scale.float()
    return torch.stack([scale.float().t(), zt.t()], dim=-1).contiguous().to(dtype)


def dequant_tinygemm(q, scales_zeros, group: int = GROUP):
    """Reference of what tinygemm computes from q [N, K] and [K/g, N, 2] (rounded) scales/zeros → fp32 [N, K]."""
    n, k = q.shape
    s = scales_zeros[..., 0].float().t()  # [N, K/g]
    z = scales_zeros[..., 1].float().t()
    return ((q.float().reshape(n, k // group, group) - 8.0) * s[..., None] + z[..., None]).reshape(n, k)


def _ref_matmul(x, w_f32):
    """fp32 reference x · wᵀ (x any float dtype)."""
    return x.float() @ w_f32.t()


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------
def _rand_w(n, k, device, dtype=None):
    import torch

    dtype = dtype or torch.float16
    return (torch.randn(n, k, device=device, dtype=torch.float32) * (1.0 / math.sqrt(k))).to(dtype)


def _rand_x(m, k, device, dtype=None):
    import torch

    return torch.randn(m, k, device=device, dtype=dtype or torch.float16)


def _cuda_ok():
    import torch

    return (True, "") if torch.cuda.is_available() else (False, "no CUDA device")


def _is_cuda(device) -> bool:
    return getattr(device, "type", str(device)) == "cuda"


# ------------------------------------------------------------------------------------------------------------------
# Peers
# ------------------------------------------------------------------------------------------------------------------
def prepare_cublas_fp16(case, device):
    import torch.nn.functional as F

    m, n, k = case["M"], case["N"], case["K"]

    def make(i):
        x, w = _rand_x(m, k, device), _rand_w(n, k, device)
        return (x, w), (lambda: _ref_matmul(x, w.float()))

    sets, ref = H.build_sets(make)
    return H.Prepared(fn=F.linear, input_sets=sets, ref=ref, floor_kind="w16", tol=1e-2)


def available_fp8():
    import torch

    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return False, "this torch has no torch._scaled_mm / float8_e4m3fn"
    if torch.cuda.is_available() and torch.cuda.get_device_capability(0) < (8, 9):
        return False, "fp8 GEMM needs compute capability 8.9+"
    return True, ""


# (scale granularity, output dtype) tried in order; the first the installed torch/cuBLASLt accepts is used.
FP8_MODES = (("rowwise", "float16"), ("rowwise", "bfloat16"), ("tensor", "float16"))


def _fp8_set(m, n, k, device, mode):
    import torch

    gran, out_name = mode
    out_dtype = getattr(torch, out_name)
    x, w = _rand_x(m, k, device), _rand_w(n, k, device)
    if gran == "rowwise":
        wq, sw = quant_rows_fp8(w)
        xq, sx = quant_act_per_token(x, torch.float8_e4m3fn, 448.0, -448.0, round_=False)
        sa, sb = sx.view(m, 1).contiguous(), sw.view(1, n).contiguous()
    else:
        sw = (w.float().abs().amax() / 448.0).clamp_min(1e-12)
        sx = (x.float().abs().amax() / 448.0).clamp_min(1e-12)
        wq = (w.float() / sw).clamp(-448, 448).to(torch.float8_e4m3fn)
        xq = (x.float() / sx).clamp(-448, 448).to(torch.float8_e4m3fn)
        sa, sb = sx.reshape(()).float(), sw.reshape(()).float()
    wt = wq.t()  # [K, N] column-major: the layout _scaled_mm requires for mat2

    def ref():
        xd = xq.float() * (sa if sa.dim() == 0 else sa)
        wd = wq.float() * (sb if sb.dim() == 0 else sb.view(n, 1))
        return xd @ wd.t()

    return (xq, wt, sa, sb, out_dtype), ref


def _scaled_mm_call(xq, wt, sa, sb, out_dtype):
    import torch

    return torch._scaled_mm(xq, wt, scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def prepare_cublaslt_fp8(case, device):
    m, n, k = case["M"], case["N"], case["K"]
    errors, chosen, first = [], None, None
    for mode in FP8_MODES:
        try:
            args, ref = _fp8_set(m, n, k, device, mode)
            _scaled_mm_call(*args)
            H.sync(device)
            chosen, first = mode, (args, ref)
            break
        except Exception as e:  # noqa: BLE001 - try the next scaling mode
            errors.append(f"{mode[0]}/{mode[1]}: {H.short_exc(e)}")
    if chosen is None:
        raise RuntimeError("torch._scaled_mm refused every mode: " + " | ".join(errors))

    def make(i):
        return first if i == 0 else _fp8_set(m, n, k, device, chosen)

    sets, ref = H.build_sets(make)
    note = f"{chosen[0]} scales, {chosen[1]} out, x pre-quantized (GEMM only)"
    return H.Prepared(fn=_scaled_mm_call, input_sets=sets, ref=ref, floor_kind="a8w8", tol=2e-2, note=note)


@functools.lru_cache(maxsize=None)
def _int_mm_accepts(m: int) -> tuple:
    import torch

    if not torch.cuda.is_available():
        return (m > 16, "" if m > 16 else "torch._int_mm needs M > 16 (static rule; probed on the GPU)")
    try:
        a = torch.ones(m, 32, dtype=torch.int8, device="cuda")
        b = torch.ones(32, 32, dtype=torch.int8, device="cuda").t()
        torch._int_mm(a, b)
        torch.cuda.synchronize()
        return True, ""
    except Exception as e:  # noqa: BLE001
        return False, "torch._int_mm rejects this M: " + H.short_exc(e)


def prepare_int_mm(case, device):
    import torch

    m, n, k = case["M"], case["N"], case["K"]
    state = {}

    def make(i):
        x, w = _rand_x(m, k, device), _rand_w(n, k, device)
        wq, sw = quant_rows_int8(w)
        xq, sx = quant_act_per_token(x, torch.int8, 127.0, -128.0, round_=True)
        if i == 0:
            state["scales"] = (sx, sw)
        return (xq, wq.t()), (lambda: (xq.float() * sx[:, None]) @ (wq.float() * sw[:, None]).t())

    sets, ref = H.build_sets(make)
    sx, sw = state["scales"]
    return H.Prepared(fn=torch._int_mm, input_sets=sets, ref=ref, floor_kind="a8w8", tol=1e-3,
                      post=lambda acc: acc.float() * sx[:, None] * sw[None, :],
                      note="x pre-quantized, int32 out (GEMM only)")


def available_tinygemm():
    import torch

    if not all(hasattr(torch.ops.aten, op) for op in ("_weight_int4pack_mm", "_convert_weight_to_int4pack")):
        return False, "this torch lacks aten::_weight_int4pack_mm / _convert_weight_to_int4pack"
    return True, ""


def supports_tinygemm(case):
    n, k = case["N"], case["K"]
    if n % 8 or k % (TINYGEMM_INNER_K_TILES * 16) or k % GROUP:
        return False, f"tinygemm needs N % 8 == 0 and K % {TINYGEMM_INNER_K_TILES * 16} == 0"
    return True, ""


def prepare_tinygemm(case, device):
    import torch

    m, n, k = case["M"], case["N"], case["K"]

    def make(i):
        x = _rand_x(m, k, device, torch.bfloat16)
        q, scale, zero = quant_int4_asym(_rand_w(n, k, device))
        packed = torch.ops.aten._convert_weight_to_int4pack(pack_int4_tinygemm(q), TINYGEMM_INNER_K_TILES)
        sz = tinygemm_scales_zeros(scale, zero, torch.bfloat16)
        return (x, packed, GROUP, sz), (lambda: _ref_matmul(x, dequant_tinygemm(q, sz)))

    sets, ref = H.build_sets(make)
    return H.Prepared(fn=torch.ops.aten._weight_int4pack_mm, input_sets=sets, ref=ref, floor_kind="w4", tol=2e-2,
                      note=f"bf16, group {GROUP}, inner_k_tiles {TINYGEMM_INNER_K_TILES}")


# --- gemlite --------------------------------------------------------------------------------------------------------
def available_gemlite():
    import importlib.util

    import torch

    if importlib.util.find_spec("gemlite") is None:
        return False, "gemlite not found on the path; stage it with benchmarks/stage_peers.sh"
    if not torch.cuda.is_available():
        return False, "no CUDA device (gemlite is staged, but it queries the GPU when imported)"
    try:
        import gemlite  # noqa: F401
        from gemlite import helper  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"import gemlite failed ({H.short_exc(e)}); stage it with benchmarks/stage_peers.sh"
    _gemlite_configs()
    return True, ""


@functools.lru_cache(maxsize=None)
def _gemlite_configs() -> str:
    """gemlite loads tuned configs by GPU name at import (h100.json on an H100). On another Hopper (H200) with no
    config of its own, load the H100 one so the run does not autotune every shape (which can take minutes)."""
    import torch

    import gemlite

    name = torch.cuda.get_device_name(0).lower().replace(" ", "_")
    cfg_dir = os.path.join(os.path.dirname(gemlite.__file__), "configs")
    tags = [f[:-5] for f in os.listdir(cfg_dir) if f.endswith(".json")]
    if any(t in name for t in tags):
        return "own"
    if torch.cuda.get_device_capability(0) == (9, 0) and os.path.exists(os.path.join(cfg_dir, "h100.json")):
        gemlite.load_config(os.path.join(cfg_dir, "h100.json"))
        print(f"gemlite: no tuned configs for {name}; loaded h100.json", flush=True)
        return "h100"
    return "none"


def _gemlite_call(layer, x):
    return layer(x)


def prepare_gemlite_a16w8(case, device):
    import torch
    from gemlite.helper import A16W8_INT8

    m, n, k = case["M"], case["N"], case["K"]

    def make(i):
        x = _rand_x(m, k, device)
        wq, sw = quant_rows_int8(_rand_w(n, k, device))
        layer = A16W8_INT8(device=str(device), dtype=torch.float16).from_weights(wq, bias=None, scales=sw.view(n, 1))
        return (layer, x), (lambda: _ref_matmul(x, wq.float() * sw[:, None]))

    sets, ref = H.build_sets(make)
    return H.Prepared(fn=_gemlite_call, input_sets=sets, ref=ref, floor_kind="w8", tol=2e-2,
                      note="int8 per-channel, fp32 scales")


def prepare_gemlite_a16w4(case, device):
    import torch
    from gemlite.helper import A16W4_HQQ_INT

    m, n, k = case["M"], case["N"], case["K"]

    def make(i):
        x = _rand_x(m, k, device)
        q, scale, zero = quant_int4_asym(_rand_w(n, k, device))
        s16, z16 = scale.half(), zero.half()
        layer = A16W4_HQQ_INT(device=str(device), dtype=torch.float16).from_weights(q, s16, z16)
        # gemlite stores zero' = fp16(−zero · scale) and computes w = q · scale + zero' (its "fma mode").
        zf = (-z16.float() * s16.float()).half().float()

        def ref():
            w = (q.float().reshape(n, k // GROUP, GROUP) * s16.float()[..., None] + zf[..., None]).reshape(n, k)
            return _ref_matmul(x, w)

        return (layer, x), ref

    sets, ref = H.build_sets(make)
    return H.Prepared(fn=_gemlite_call, input_sets=sets, ref=ref, floor_kind="w4", tol=2e-2,
                      note=f"HQQ-style asymmetric int4, group {GROUP}, fp16 scales/zeros")


def prepare_gemlite_a8w8(case, device):
    import torch
    from gemlite.helper import A8W8_INT8_dynamic

    m, n, k = case["M"], case["N"], case["K"]

    def make(i):
        x = _rand_x(m, k, device)
        wq, sw = quant_rows_int8(_rand_w(n, k, device))
        layer = A8W8_INT8_dynamic(device=str(device), dtype=torch.float16).from_weights(wq, bias=None,
                                                                                       scales=sw.view(n, 1))

        def ref():
            xq, sx = quant_act_per_token(x, torch.float32, 127.0, -128.0, round_=True)
            return (xq * sx[:, None]) @ (wq.float() * sw[:, None]).t()

        return (layer, x), ref

    sets, ref = H.build_sets(make)
    return H.Prepared(fn=_gemlite_call, input_sets=sets, ref=ref, floor_kind="a8w8", tol=2e-2,
                      note="per-token int8 activation quantization inside the call")


# ------------------------------------------------------------------------------------------------------------------
# Ours: angel_kernels ops, each added only when the package provides it (imported lazily, never at module import).
# ------------------------------------------------------------------------------------------------------------------
def _angel(*names):
    return lambda: H.angel_has(*names)


def prepare_angel_w8a16(case, device, tile_major=False, fragment=False):
    """``tile_major``: the weight in ``tile_major_int8``'s layout (where the shape has whole 64 × 128 blocks);
    ``fragment``: fragment-major through ``w8a16_fragment_gemm``, as ifq stores it on sm_90."""
    import angel_kernels
    from angel_kernels.gemm.w8a16 import tile_major_fits

    m, n, k = case["M"], case["N"], case["K"]
    tile_major = tile_major and tile_major_fits(n, k)

    def make(i):
        x = _rand_x(m, k, device)
        qweight, scales = angel_kernels.quantize_weight_int8(_rand_w(n, k, device))  # int8 [N, K], fp32 [N]
        ref = lambda: _ref_matmul(x, qweight.float() * scales.float()[:, None])  # noqa: E731
        if fragment:
            return (x, angel_kernels.fragment_major_int8(qweight), scales), ref
        return (x, angel_kernels.tile_major_int8(qweight) if tile_major else qweight, scales), ref

    def fn(x, qweight, scales):
        if fragment:
            return angel_kernels.w8a16_fragment_gemm(x, qweight, scales)
        return angel_kernels.w8a16_gemm(x, qweight, scales, tile_major=tile_major)

    sets, ref = H.build_sets(make)
    note = "fragment-major weight" if fragment else "tile-major weight" if tile_major else "row-major weight"
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="w8", tol=1e-2, note=note)


def prepare_angel_w4a16(case, device, fragment=False):
    """Symmetric int4, group 128, fp16 scales (the GPTQ sym layout after our repack; ``fragment``: stored
    fragment-major, as ifq_int4 stores it on sm_90)."""
    import angel_kernels

    m, n, k = case["M"], case["N"], case["K"]

    def make(i):
        x = _rand_x(m, k, device)
        w4 = angel_kernels.quantize_weight_int4(_rand_w(n, k, device), GROUP, sym=True)
        w_deq = angel_kernels.reference.dequantize_int4_ref(w4.qweight, w4.scales, w4.zeros, w4.group_size)
        q = angel_kernels.fragment_major_int4(w4.qweight) if fragment else w4.qweight
        # the reference dequantizer returns Wᵀ [K, N]
        return (x, q, w4.scales), (lambda: _ref_matmul(x, w_deq.t()))

    sets, ref = H.build_sets(make)
    if fragment:
        fn = lambda x, q, s: angel_kernels.w4a16_fragment_gemm(x, q, s)  # noqa: E731
    else:
        fn = lambda x, q, s: angel_kernels.w4a16_gemm(x, q, s, None, GROUP)  # noqa: E731
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="w4", tol=1e-2,
                      note="symmetric int4, group 128, fp16 scales" + (", fragment-major" if fragment else ""))


def providers() -> H.ProviderRegistry:
    P = H.Provider
    reg = H.ProviderRegistry(FAMILY)
    # peers
    reg.add(P("cublas_fp16", prepare_cublas_fp16, floor_kind="w16", description="F.linear fp16 (cuBLAS)"))
    reg.add(P("cublaslt_fp8", prepare_cublaslt_fp8, available=available_fp8, floor_kind="a8w8",
              description="torch._scaled_mm e4m3, x pre-quantized"))
    reg.add(P("torch_int_mm", prepare_int_mm, supports=lambda c: _int_mm_accepts(c["M"]), floor_kind="a8w8",
              description="torch._int_mm int8→int32, x pre-quantized"))
    reg.add(P("tinygemm_w4", prepare_tinygemm, available=available_tinygemm, supports=supports_tinygemm,
              floor_kind="w4", description="aten._weight_int4pack_mm bf16, int4 g128"))
    reg.add(P("gemlite_a16w8", prepare_gemlite_a16w8, available=available_gemlite, floor_kind="w8",
              description="gemlite A16W8 int8"))
    reg.add(P("gemlite_a16w4_g128", prepare_gemlite_a16w4, available=available_gemlite, floor_kind="w4",
              description="gemlite A16W4 HQQ int4 g128"))
    reg.add(P("gemlite_a8w8", prepare_gemlite_a8w8, available=available_gemlite, floor_kind="a8w8",
              description="gemlite A8W8 int8 dynamic"))
    # ours
    reg.add(P("angel_w8a16", prepare_angel_w8a16, kind="ours", floor_kind="w8",
              available=_angel("w8a16_gemm", "quantize_weight_int8"), description="angel_kernels.w8a16_gemm"))
    reg.add(P("angel_w8a16_tile_major", lambda c, dev: prepare_angel_w8a16(c, dev, tile_major=True), kind="ours",
              floor_kind="w8", available=_angel("w8a16_gemm", "tile_major_int8"),
              description="angel_kernels.w8a16_gemm on a tile-major weight"))
    reg.add(P("angel_w8a16_fragment", lambda c, dev: prepare_angel_w8a16(c, dev, fragment=True), kind="ours",
              floor_kind="w8", available=_angel("w8a16_fragment_gemm", "fragment_major_int8"),
              description="angel_kernels.w8a16_fragment_gemm (fragment-major, sm_90; what ifq runs there)"))
    reg.add(P("angel_w4a16", prepare_angel_w4a16, kind="ours", floor_kind="w4",
              available=_angel("w4a16_gemm", "quantize_weight_int4"), description="angel_kernels.w4a16_gemm g128"))
    reg.add(P("angel_w4a16_fragment", lambda c, dev: prepare_angel_w4a16(c, dev, fragment=True), kind="ours",
              floor_kind="w4", available=_angel("w4a16_fragment_gemm", "fragment_major_int4"),
              description="angel_kernels.w4a16_fragment_gemm g128 (fragment-major, sm_90)"))
    return reg


def family(quick=False, shapes=None, ms=None, smoke=False) -> H.Family:
    return H.Family(FAMILY, build_cases(quick, shapes, ms, smoke), case_str, floor_model, providers(),
                    sort_key=sort_key)


def main(argv=None) -> int:
    H.setup_paths()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_common_args(ap)
    ap.add_argument("--full", action="store_true", help="no time budget: the whole grid")
    ap.add_argument("--shapes", default="", help=f"comma-separated subset of {','.join(SHAPES)}")
    ap.add_argument("--m", default="", help="comma-separated subset of M values")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}")
    ms = [int(v) for v in args.m.split(",") if v]
    if args.budget_s is None and not args.full and not args.quick and not args.smoke:
        args.budget_s = DEFAULT_BUDGET_S
    return H.main_family(family(args.quick, shapes, ms, args.smoke), args)


if __name__ == "__main__":
    sys.exit(main())
