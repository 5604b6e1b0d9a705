"""w8a16: y = x · (q · s)ᵀ with int8 weights q [N, K] and one scale per output channel s [N].

Candidates (``ANGEL_KERNELS_FORCE_W8A16`` / ``ANGEL_KERNELS_DISABLE=w8a16.<name>``):
- ``dequant_matmul``: dequantize the weight to x.dtype once per call, then cuBLAS. Meant for large M, where
  the GEMM is compute-bound and the extra 3 bytes/weight of traffic are a small fraction.
- ``tiled``: Triton tiled GEMM that loads int8 tiles, converts in registers (int8 → fp16 is exact for
  [-127, 127]) and applies the scale to the fp32 accumulator once at the end.
- ``reference``: the fp32 pure-torch reference (CPU path).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import ACT_DTYPES, check_same_device, check_tensor
from .._registry import register_op
from ..dispatch import Candidate, KernelFamily
from ..reference import w8a16_gemm_ref
from ..runtime import interpreter_active, reference_forced
from ..tuning import KernelConfig, default_store, m_bucket

KERNEL_NAME = "w8a16.tiled"
# Below this M the tiled kernel streams the weight once; from here on cuBLAS on a dequantized copy is the
# default until tuned tiled configs prove faster (cuBLAS fp16 is at 60-75 % of the 690 TFLOP/s peak there).
LARGE_M = 1024


@dataclass(frozen=True)
class W8A16Problem:
    M: int
    N: int
    K: int
    dtype: torch.dtype
    device: torch.device

    def key(self) -> str:
        return f"N={self.N},K={self.K},M={m_bucket(self.M)}"


@triton.jit
def _w8a16_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the interpreter's bf16 dot is wrong: compute the dot in fp32 there
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row-blocks walk the same weight columns together (weight reuse in L2).
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: N·K exceeds 2^31 for the largest layers (e.g. vocab 128k × 16k).
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k0 * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        # Accumulate inside the MMA chain: K-blocks are summed in the same order whatever BLOCK_M/BLOCK_N are.
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Batch invariance: a row's result must not depend on M, so the K reduction (BLOCK_K, no split-K) is the same
# for every M; only BLOCK_M/BLOCK_N, warps and stages vary with the M bucket.
BLOCK_K = 128
# Under the interpreter cost grows with programs × K-steps: few, large blocks keep CPU tests fast.
INTERPRETER_CONFIG = KernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1, extra=(("GROUP_M", 8),))


def heuristic_config(p: W8A16Problem) -> KernelConfig:
    """Untuned default by M regime (used when the store has no entry for this GPU and shape)."""
    if p.M <= 16:
        # 64-column tiles: N=4096 still gives 64 programs; 4 stages keep ~50 KB of weight in flight per SM
        return KernelConfig(16, 64, BLOCK_K, num_warps=4, num_stages=4, extra=(("GROUP_M", 1),))
    if p.M <= 64:
        return KernelConfig(64, 128, BLOCK_K, num_warps=4, num_stages=4, extra=(("GROUP_M", 8),))
    return KernelConfig(128, 128, BLOCK_K, num_warps=8, num_stages=3, extra=(("GROUP_M", 8),))


def config_for(p: W8A16Problem) -> KernelConfig:
    if interpreter_active() and p.device.type == "cpu":
        return INTERPRETER_CONFIG
    return default_store().lookup(KERNEL_NAME, p.key(), p.device) or heuristic_config(p)


def launch_tiled(x2: torch.Tensor, qweight, scales, bias, cfg: KernelConfig) -> torch.Tensor:
    """x2 [M, K] → y [M, N] with the Triton tiled kernel and an explicit config."""
    M, K = x2.shape
    N = qweight.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    meta = cfg.meta()
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    _w8a16_gemm_kernel[grid](
        x2, qweight, scales, bias if bias is not None else scales, y,
        M, N, K,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        DOT_FP32=x2.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **meta,
    )
    return y


def _run_tiled(p, x2, qweight, scales, bias):
    return launch_tiled(x2, qweight, scales, bias, config_for(p))


def _run_dequant_matmul(p, x2, qweight, scales, bias):
    # Scale the weight before the product: x · qᵀ alone can overflow fp16 (|q| ≤ 127, K up to 28672).
    w = qweight.to(x2.dtype) * scales.to(x2.dtype)[:, None]
    y = x2 @ w.t()
    return y + bias if bias is not None else y


def _run_reference(p, x2, qweight, scales, bias):
    return w8a16_gemm_ref(x2, qweight, scales, bias)


def _triton_available(p: W8A16Problem):
    if p.device.type == "cuda":
        return True, ""
    if p.device.type == "cpu" and interpreter_active():
        return True, ""
    return False, f"Triton kernels need a CUDA device or TRITON_INTERPRET=1 (tensors on {p.device})"


W8A16: KernelFamily[W8A16Problem] = KernelFamily(
    "w8a16",
    [
        Candidate(
            "dequant_matmul",
            can_implement=lambda p: (True, ""),
            run=_run_dequant_matmul,
            suits=lambda p: (p.device.type == "cuda" and p.M >= LARGE_M, f"meant for CUDA with M >= {LARGE_M}"),
        ),
        Candidate("tiled", can_implement=_triton_available, run=_run_tiled),
        Candidate("reference", can_implement=lambda p: (True, ""), run=_run_reference),
    ],
    problem_key=lambda p: (p.N, p.K, m_bucket(p.M), p.dtype, p.device.type),
)


def _validate(x, qweight, scales, bias):
    check_tensor("x", x, dtypes=ACT_DTYPES)
    check_tensor("qweight", qweight, dtypes=(torch.int8,), dim=2)
    check_tensor("scales", scales, dtypes=(torch.float32, torch.float16, torch.bfloat16), dim=1)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but qweight [N, K] has K={k}")
    if scales.shape[0] != n:
        raise ValueError(f"scales must have shape ({n},) (one per output channel of qweight [N, K]), got {tuple(scales.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(x.dtype,), dim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    check_same_device(x=x, qweight=qweight, scales=scales, bias=bias)


def _w8a16_fake(x, qweight, scales, bias=None):
    _validate(x, qweight, scales, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _samples(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    for (m, n, k), dtype, with_bias in (((3, 48, 80), torch.float16, False), ((1, 32, 64), torch.bfloat16, True)):
        x = torch.randn(m, k, generator=g).to(dtype).to(device)
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
        s = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(device)
        b = torch.randn(n, generator=g).to(dtype).to(device) if with_bias else None
        yield (x, q, s, b), {}


@register_op("w8a16_gemm", fake=_w8a16_fake, samples=_samples)
def w8a16_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """y [..., N] = x [..., K] · (qweight [N, K] int8 · scales [N, 1])ᵀ (+ bias [N]); x fp16/bf16.

    Kernel chosen by ``W8A16`` (see module doc). Registered as ``torch.ops.angel_kernels.w8a16_gemm``.
    """
    _validate(x, qweight, scales, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    p = W8A16Problem(x2.shape[0], qweight.shape[0], qweight.shape[1], x.dtype, x.device)
    if p.M == 0:
        return x.new_empty((*lead, p.N))
    y = W8A16.select(p, force="reference" if reference_forced() else None).run(p, x2, qweight, scales, bias)
    return y.reshape(*lead, p.N)


def tuning_space(p: W8A16Problem) -> list[KernelConfig]:
    """Configs worth timing for a problem's M regime (pruned for shared memory before timing)."""
    from itertools import product

    from ..tuning import prune_configs

    if p.M <= 16:  # weight streaming: narrow N tiles for enough programs, deep pipelines for bytes in flight
        space = product((16,), (16, 32, 64, 128), (BLOCK_K,), (2, 4), (3, 4, 5, 6), (1,))
    elif p.M <= 64:
        space = product((16, 32, 64), (64, 128), (BLOCK_K,), (4, 8), (3, 4), (8,))
    else:
        space = product((64, 128), (128, 256), (BLOCK_K,), (4, 8), (3, 4), (8,))
    configs = [
        KernelConfig(bm, bn, bk, num_warps=w, num_stages=s, extra=(("GROUP_M", g),))
        for bm, bn, bk, w, s, g in space
    ]
    return prune_configs(configs, K=p.K, a_bytes=p.dtype.itemsize, b_bytes=1)


def tune(n: int, k: int, m: int, *, device="cuda", dtype=torch.float16, store=None) -> KernelConfig:
    """Warm-up step: time ``tuning_space`` for one (N, K, M bucket), check each result, record the fastest."""
    from ..testing import relative_error
    from ..tuning import tune_kernel

    device = torch.device(device)
    p = W8A16Problem(m_bucket(m), n, k, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(p.M, k, device=device, generator=gen).to(dtype)
    q = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8, generator=gen)
    s = torch.rand(n, device=device, generator=gen) * 0.01 + 1e-3
    ref = w8a16_gemm_ref(x, q, s)

    def check(y):
        err = relative_error(y, ref)
        if not err < 1e-2:
            raise ValueError(f"relative error {err}")

    best, _ = tune_kernel(
        store or default_store(), KERNEL_NAME, p.key(), tuning_space(p),
        lambda cfg: (lambda: launch_tiled(x, q, s, None, cfg)), device, check=check,
    )
    return best
