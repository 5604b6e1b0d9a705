"""w8a16: y = x · (q · s)ᵀ with int8 weights q [N, K] and one scale per output channel s [N].

Candidates (``ANGEL_KERNELS_FORCE_W8A16`` / ``ANGEL_KERNELS_DISABLE=w8a16.<name>``):
- ``dequant_matmul``: dequantize the weight to x.dtype once per call, then cuBLAS. Meant for M >= LARGE_M (see
  ``_weight_only``; rows stop being batch-invariant there), where the GEMM is compute-bound and the extra
  3 bytes/weight of traffic are a small fraction.
- ``tiled``: Triton tiled GEMM that loads int8 tiles, converts in registers (int8 → fp16 is exact for
  [-127, 127]) and applies the scale to the fp32 accumulator once at the end. The tile is read as int32 words and
  converted a word at a time (``_int8_words``; ``WORDS`` in a config's extras, on by default), and split-K is
  chosen from N, K and the GPU's SM count (``_splitk``), never from M.
- ``reference``: the fp32 pure-torch reference (CPU path).

Weight layouts: row-major ``[N, K]``, or tile-major (``tile_major_int8``; ``tile_major=True``): the same bytes
ordered tile by tile, each 64-row × 128-column block contiguous, so that every K-block a program reads is one
contiguous 8 KB run instead of 64 runs of 128 bytes. The same bits; needs N % 64 == 0 and K % 128 == 0. On the
H100 at M = 1 (same run, µs row-major → tile-major): 28672×4096 45.8 → 44.2, 28672×8192 88.0 → 84.4, 8192×28672
86.1 → 80.6; from M = 64 equal (benchmarks/NOTES.md). The ifq method stores CUDA weights tile-major.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import ACT_DTYPES, check_same_device, check_tensor
from .._registry import register_op
from ._splitk import (
    collect_tile, plan_split, split_k_on, tile_rows_and_tokens, with_decode_dot_t_choices, with_dot_t_choices,
    with_serial_choices,
)
from ._weight_only import weight_only_family
from .._int8_words import int8_words_to_float
from ..dispatch import KernelFamily
from ..reference import w8a16_gemm_ref
from ..runtime import interpreter_active, reference_forced
from ..tuning import KernelConfig, default_store, m_bucket

KERNEL_NAME = "w8a16.tiled"
CHANNEL_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # one scale per output channel
# Tile-major weight blocks (tile_major_int8): rows × columns, one contiguous 8 KB run each
TILE_ROWS, TILE_COLS = 64, 128  # (spelled out in _tile_major_row / _tile_major_col)


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
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the interpreter's bf16 dot is wrong: compute the dot in fp32 there
    MAGIC: tl.constexpr,  # fp16 activations: int8 → fp16 by integer add + bitcast instead of I2F (see below)
    WORDS: tl.constexpr,  # w_ptr is the weight viewed as int32 words of 4 int8, converted a word at a time
    ASM: tl.constexpr,  # WORDS: convert with PTX byte permutes (GPU); off: the same values in Triton integer ops
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: the weight and x tiles need no masks
    SPLIT_K: tl.constexpr,
    SERIAL: tl.constexpr,  # SPLIT_K > 1: one program per tile sums the split ranges itself (see below)
    DOT_T: tl.constexpr,  # tokens on the MMA's M side, the converted weight from shared memory (batches)
    TILE_MAJOR: tl.constexpr,  # the weight in 64 × 128 blocks (``tile_major_int8``)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Swap-AB tile: acc[BLOCK_N, BLOCK_M] = W[n-tile, :] · X[m-tile, :]ᵀ.

    The weight rows are the MMA's M side (≥ 64 rows feed Hopper's wgmma even when there is one token) and the
    tokens its N side (16 is the smallest tile). With SPLIT_K > 1, each program writes an fp32 partial; the
    last of the SPLIT_K programs of a tile to finish (an acq_rel counter) sums the partials in split order
    0, 1, … (deterministic, no float atomics), applies the epilogue and resets the counter for the next call.
    With SERIAL, the grid has one program per tile and it computes the same split ranges one after the other.
    """
    pid_k = tl.program_id(1)
    offs_n, offs_m, mask_n, mask_m, tile = tile_rows_and_tokens(M, N, BLOCK_M, BLOCK_N, GROUP_N)
    # SERIAL: one program walks the SPLIT_K ranges in order, each from a zero accumulator, and sums them as
    # reduce_split_k does: the same bits as the split launch without the fp32 partials' round trip (at M = 256
    # on 4096×14336, split 8: 34 MB written and read again).
    acc = _w8a16_k_range(
        x_ptr, w_ptr, offs_n, offs_m, mask_n, mask_m, 0 if SERIAL else pid_k * K_PER_SPLIT, K, K_PER_SPLIT,
        stride_xm, stride_xk, stride_wn, stride_wk, DOT_FP32, MAGIC, WORDS, ASM, EVEN, DOT_T, TILE_MAJOR, BLOCK_M,
        BLOCK_N, BLOCK_K)
    if SERIAL:
        for s in range(1, SPLIT_K):
            acc += _w8a16_k_range(
                x_ptr, w_ptr, offs_n, offs_m, mask_n, mask_m, s * K_PER_SPLIT, K, K_PER_SPLIT,
                stride_xm, stride_xk, stride_wn, stride_wk, DOT_FP32, MAGIC, WORDS, ASM, EVEN, DOT_T, TILE_MAJOR,
                BLOCK_M, BLOCK_N, BLOCK_K)
    acc, writes = collect_tile(acc, part_ptr, count_ptr, tile, pid_k, offs_n, offs_m, mask_n, mask_m, M, N,
                               SPLIT_K, SERIAL, DOT_T)
    if writes:
        _w8a16_epilogue(acc, scale_ptr, bias_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m,
                        stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _w8a16_k_range(
    x_ptr, w_ptr, offs_n, offs_m, mask_n, mask_m, k_start, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk,
    DOT_FP32: tl.constexpr, MAGIC: tl.constexpr, WORDS: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr,
    DOT_T: tl.constexpr, TILE_MAJOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc [BLOCK_N, BLOCK_M] ([BLOCK_M, BLOCK_N] with DOT_T) over the K-blocks of [k_start, min(K, k_start +
    K_PER_SPLIT)), from zero. TILE_MAJOR: weight element (n, k) at byte ``_tile_major_row(n, K) + _tile_major_col(k)``
    (``tile_major_int8``); any BLOCK_N, and BLOCK_K dividing 128 (K-blocks start at multiples of 64).

    DOT_T (batches): the MMA computes accᵀ = x · wᵀ, tokens on its M side. The converted weight is then the B
    operand, which wgmma reads from shared memory, and a K-block's 8 HGMMAs issue back to back with one wait; as
    the A operand (from registers) each HGMMA waits for the one before (sm_90a SASS). Either way the conversion of
    the next K-block waits for the MMAs (Triton keeps one buffer for the converted tile), so a program alternates
    between converting and multiplying: at 28672×4096, M = 256 the 128×128 / 4-warp DOT_T tile takes 152 µs
    (H100, one run: the best swap-AB tile 163, cuBLAS fp16 107). Rows are bitwise those of the swap-AB kernel
    (the tuner's invariance check on the H100)."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # the weight tile's columns: with WORDS int32 words (column r is bytes 4r … 4r + 3 of the K-block), else bytes
    if WORDS:
        w_cols = tl.arange(0, BLOCK_K // 4)
    else:
        w_cols = tl.arange(0, BLOCK_K)
    # int64 row offsets: N·K exceeds 2^31 for the largest layers (e.g. vocab 128k × 16k).
    if TILE_MAJOR:  # the pointers are made per K-block in the loop, from the K-block's place in the row's blocks
        w_rows = _tile_major_row(offs_n, K, WORDS)
    elif WORDS:  # stride_wn counts words
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start // 4 + w_cols)[None, :]
    else:
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None] * stride_xk  # [BLOCK_K, BLOCK_M]

    if DOT_T:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, min(K, k_start + K_PER_SPLIT), BLOCK_K):
        # EVEN drops the masks: ~40 of the ~300 instructions per K-block of a 64×128 tile (SASS count).
        if EVEN:
            x = tl.load(x_ptrs, mask=mask_m[None, :], other=0.0)
        else:
            mask_k = (k0 - k_start + tl.arange(0, BLOCK_K)) < K - k_start
            x = tl.load(x_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        if TILE_MAJOR:  # one scalar per K-block
            k_off = _tile_major_col(k0, WORDS, True)
            w_ptrs = w_ptr + w_rows[:, None] + (k_off + w_cols)[None, :]
        if EVEN:
            w = tl.load(w_ptrs)
        elif WORDS:
            w = tl.load(w_ptrs, mask=mask_n[:, None] & (w_cols < (K - k0) // 4)[None, :], other=0)
        else:
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
        if WORDS:
            wf = int8_words_to_float(w, x.dtype == tl.bfloat16, ASM, DOT_FP32, BLOCK_N, BLOCK_K)
        elif DOT_FP32:
            wf = w.to(tl.float32)
        elif MAGIC:
            # fp16 1152 + w has bits 0x6480 + w for w in [-127, 127] (exponent of [1024, 2048), mantissa w + 128):
            # a 16-bit integer add, a bitcast and one fp16 subtract replace the int → float conversion, whose
            # 16/clk/SM throughput is about what streaming int8 weights at 3 TB/s needs (13 per clk per SM).
            wf = (w.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
        else:
            wf = w.to(x.dtype)
        if DOT_FP32:
            x = x.to(tl.float32)
        # Accumulate inside the MMA chain: K-blocks are summed in the same order whatever BLOCK_M is.
        if DOT_T:
            acc = tl.dot(tl.trans(x), tl.trans(wf), acc)
        else:
            acc = tl.dot(wf, x, acc)
        if not TILE_MAJOR:
            w_ptrs += BLOCK_K // 4 if WORDS else BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
    return acc


@triton.jit
def _tile_major_row(n, K, WORDS: tl.constexpr):
    """Offset of row n's first element in the tile-major layout (its 64-row block, then its row in it), in bytes
    or (WORDS) int32 words. Written as products so that the compiler sees every row start 128-byte aligned (K is
    a multiple of 16 to it): a division here would hide that and cut the loads to 4 bytes."""
    if WORDS:
        return (n // 64).to(tl.int64) * (K * 16) + (n % 64) * 32
    return (n // 64).to(tl.int64) * (K * 64) + (n % 64) * 128


@triton.jit
def _tile_major_col(k, WORDS: tl.constexpr, K_BLOCK: tl.constexpr):
    """Offset of column k within a row of the tile-major layout (its 128-column block, then the column), in bytes
    or (WORDS, k a multiple of 4) int32 words. K_BLOCK: k starts a K-block (a multiple of 64), said to the
    compiler here, on the expression itself (a hint on the returned value did not reach the loads: sm_90a, 18
    instead of 6 cp.async per K-block)."""
    if WORDS:
        off = (k // 128) * 2048 + (k % 128) // 4
        if K_BLOCK:
            off = tl.multiple_of(off, 16)
    else:
        off = (k // 128) * 8192 + k % 128
        if K_BLOCK:
            off = tl.multiple_of(off, 64)
    return off


@triton.jit
def _w8a16_epilogue(acc, scale_ptr, bias_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn,
                    HAS_BIAS: tl.constexpr):
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * scale[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


# Batch invariance: a row's result must not depend on M, so the K reduction (the split count and ranges, in
# BLOCK_K blocks, and the chain of k16 MMA steps) depends on N and K only; BLOCK_M/BLOCK_N, warps, stages, DOT_T,
# SERIAL and (on DOT_T tiles) K-blocks of BLOCK_K / 2 vary with the M bucket.
BLOCK_K = 128
# Under the interpreter cost grows with programs × K-steps: few, large blocks keep CPU tests fast.
INTERPRETER_CONFIG = KernelConfig(
    BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1, extra=(("GROUP_N", 8), ("MAGIC", 1))
)


def heuristic_config(p: W8A16Problem) -> KernelConfig:
    """Untuned default by M regime (used when the store has no entry for this GPU and shape)."""
    if p.M <= 16:
        return KernelConfig(16, 64, BLOCK_K, num_warps=4, num_stages=4, extra=(("GROUP_N", 1),))
    if p.M <= 32:
        return KernelConfig(32, 64, BLOCK_K, num_warps=4, num_stages=4, extra=(("GROUP_N", 8),))
    if p.M <= 64:
        return KernelConfig(64, 128, BLOCK_K, num_warps=4, num_stages=4, extra=(("GROUP_N", 8),))
    # DOT_T (H100, 28672×4096, M = 128 / 256 / 512): 81.4 / 151.9 / 292.2 µs; in the same run the swap-AB
    # 128×128 / 8-warp tile 89.5 / 178.6 / 307.8
    return KernelConfig(128, 128, BLOCK_K, num_warps=4, num_stages=2, extra=(("DOT_T", 1), ("GROUP_N", 8)))


def config_for(p: W8A16Problem) -> KernelConfig:
    if interpreter_active() and p.device.type == "cpu":
        return INTERPRETER_CONFIG
    return default_store().lookup(KERNEL_NAME, p.key(), p.device) or heuristic_config(p)


def launch_tiled(x2: torch.Tensor, qweight, scales, bias, cfg: KernelConfig, split_k: Optional[int] = None,
                 tile_major: bool = False):
    """x2 [M, K] → y [M, N] with the Triton kernel and an explicit config (split-K from N, K unless given);
    ``tile_major``: qweight is in the tile-major layout (``tile_major_int8``)."""
    M, K = x2.shape
    N = qweight.shape[0]
    if tile_major:
        _check_tile_major(qweight)
        if TILE_COLS % cfg.BLOCK_K:
            raise ValueError(f"BLOCK_K={cfg.BLOCK_K} must divide {TILE_COLS} for a tile-major weight")
    # Splits are counted in BLOCK_K = 128 blocks whatever the config's K-block (64 also divides them): a K-block
    # of 64 runs the same chain of k16 MMA steps, so only the split ranges must not move with the config.
    split_block = BLOCK_K if BLOCK_K % cfg.BLOCK_K == 0 else cfg.BLOCK_K
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    meta = cfg.meta()
    magic = meta.pop("MAGIC", 1)  # MAGIC=0 (plain conversion) is the tests' control; every mode gives the same bits
    # WORDS (default on): the same values, fewer instructions; needs 4-byte-aligned rows of a K-contiguous weight
    words = meta.pop("WORDS", 1) and _word_view_ok(qweight)
    w_arg = qweight.view(torch.int32) if words else qweight
    even = M > 0 and N % cfg.BLOCK_N == 0 and K % cfg.BLOCK_K == 0
    num_tiles = triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N)
    plan = plan_split(x2.device, "w8a16", M, N, K, split_block, num_tiles, y, split_k, meta.pop("SERIAL", None))
    dot_t = bool(meta.pop("DOT_T", 0))
    _w8a16_gemm_kernel[(num_tiles, plan.grid_k)](
        x2, w_arg, scales, bias if bias is not None else scales, y, plan.partials, plan.counters,
        M, N, K, plan.k_per_split,
        x2.stride(0), x2.stride(1), w_arg.stride(0), w_arg.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        DOT_FP32=x2.device.type == "cpu" and x2.dtype == torch.bfloat16,
        MAGIC=bool(magic) and x2.dtype == torch.float16,
        WORDS=bool(words), ASM=x2.device.type == "cuda", EVEN=even,
        SPLIT_K=plan.split_k, SERIAL=plan.serial, DOT_T=dot_t, TILE_MAJOR=tile_major,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **meta,
    )
    return y


def _check_tile_major(qweight: torch.Tensor, contiguous: bool = True) -> None:
    """Whole 64 × 128 blocks, and (``contiguous``: a weight already in the layout) one dense buffer."""
    n, k = qweight.shape
    if not tile_major_fits(n, k):
        raise ValueError(f"a tile-major int8 weight needs N % {TILE_ROWS} == 0 and K % {TILE_COLS} == 0, got "
                         f"[N, K] = [{n}, {k}]")
    if contiguous and not qweight.is_contiguous():
        raise ValueError("a tile-major int8 weight must be contiguous (its blocks are addressed from its start)")


def tile_major_int8(qweight: torch.Tensor) -> torch.Tensor:
    """A row-major int8 weight [N, K] in the tile-major layout ``w8a16_gemm(..., tile_major=True)`` reads: the
    same shape and bytes, ordered by 64-row block, then 128-column block, then row, then column (each 64 × 128
    block one contiguous 8 KB run). Needs N % 64 == 0 and K % 128 == 0 (``tile_major_fits``)."""
    check_tensor("qweight", qweight, dtypes=(torch.int8,), dim=2)
    _check_tile_major(qweight, contiguous=False)  # any row-major view: reshape copies where it must
    n, k = qweight.shape
    blocks = qweight.reshape(n // TILE_ROWS, TILE_ROWS, k // TILE_COLS, TILE_COLS)
    return blocks.permute(0, 2, 1, 3).contiguous().reshape(n, k)


def row_major_int8(tile_major: torch.Tensor) -> torch.Tensor:
    """The inverse of ``tile_major_int8``."""
    check_tensor("qweight", tile_major, dtypes=(torch.int8,), dim=2)
    _check_tile_major(tile_major)
    n, k = tile_major.shape
    blocks = tile_major.reshape(n // TILE_ROWS, k // TILE_COLS, TILE_ROWS, TILE_COLS)
    return blocks.permute(0, 2, 1, 3).contiguous().reshape(n, k)


def tile_major_fits(n: int, k: int) -> bool:
    """Whether an [N, K] weight has a tile-major layout (whole 64 × 128 blocks)."""
    return n % TILE_ROWS == 0 and k % TILE_COLS == 0


def _word_view_ok(qweight: torch.Tensor) -> bool:
    """The int8 weight can be read as int32 words: K-contiguous rows, K and the row stride multiples of 4, and
    a 4-byte-aligned start."""
    return (
        qweight.stride(1) == 1 and qweight.shape[1] % 4 == 0 and qweight.stride(0) % 4 == 0
        and qweight.data_ptr() % 4 == 0
    )


def _run_tiled(p, x2, qweight, scales, bias, tile_major=False):
    return launch_tiled(x2, qweight, scales, bias, config_for(p), tile_major=tile_major)


@triton.jit
def _dequant_int8_kernel(q_ptr, s_ptr, w_ptr, N, K, stride_qn, stride_qk, TILE_MAJOR: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w [N, K] (x.dtype, contiguous, row-major) = q · s[:, None] in one pass: 1 byte read + 2 written per
    weight; q row-major or (TILE_MAJOR) tile-major."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if TILE_MAJOR:
        q_offs = _tile_major_row(offs_n, K, False)[:, None] + _tile_major_col(offs_k, False, False)[None, :]
    else:
        q_offs = offs_n[:, None].to(tl.int64) * stride_qn + offs_k[None, :] * stride_qk
    q = tl.load(q_ptr + q_offs, mask=mask, other=0)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    w = q.to(tl.float32) * s[:, None]
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                    tile_major: bool = False) -> torch.Tensor:
    """qweight [N, K] int8 (row-major, or tile-major) · scales [N] → row-major [N, K] in dtype (Triton on CUDA /
    interpreter, torch elsewhere)."""
    n, k = qweight.shape
    if qweight.device.type != "cuda" and not interpreter_active():
        q = row_major_int8(qweight) if tile_major else qweight
        return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)
    w = torch.empty((n, k), dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 256))
    _dequant_int8_kernel[grid](qweight, scales, w, n, k, qweight.stride(0), qweight.stride(1), TILE_MAJOR=tile_major,
                               BLOCK_N=32, BLOCK_K=256)
    return w


def _run_dequant_matmul(p, x2, qweight, scales, bias, tile_major=False):
    # Scale the weight before the product: x · qᵀ alone can overflow fp16 (|q| ≤ 127, K up to 28672).
    w = dequantize_int8(qweight, scales, x2.dtype, tile_major)
    # addmm adds the bias in the GEMM epilogue: one rounding to fp16 instead of two
    return torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()


def _run_reference(p, x2, qweight, scales, bias, tile_major=False):
    return w8a16_gemm_ref(x2, row_major_int8(qweight) if tile_major else qweight, scales, bias)


W8A16: KernelFamily[W8A16Problem] = weight_only_family(
    "w8a16",
    dequant_matmul=_run_dequant_matmul,
    tiled=_run_tiled,
    reference=_run_reference,
    problem_key=lambda p: (p.N, p.K, m_bucket(p.M), p.dtype, p.device.type),
)


def _validate(x, qweight, scales, bias, tile_major=False):
    check_tensor("x", x, dtypes=ACT_DTYPES)
    check_tensor("qweight", qweight, dtypes=(torch.int8,), dim=2)
    check_tensor("scales", scales, dtypes=CHANNEL_SCALE_DTYPES, dim=1)
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
    if tile_major:
        _check_tile_major(qweight)


def _w8a16_fake(x, qweight, scales, bias=None, tile_major=False):
    _validate(x, qweight, scales, bias, tile_major)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _samples(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    for (m, n, k), dtype, with_bias, tm in (((3, 48, 80), torch.float16, False, False),
                                            ((1, 32, 64), torch.bfloat16, True, False),
                                            ((2, 64, 256), torch.float16, True, True)):
        x = torch.randn(m, k, generator=g).to(dtype).to(device)
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
        s = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(device)
        b = torch.randn(n, generator=g).to(dtype).to(device) if with_bias else None
        yield ((x, tile_major_int8(q), s, b), {"tile_major": True}) if tm else ((x, q, s, b), {})


@register_op("w8a16_gemm", fake=_w8a16_fake, samples=_samples)
def w8a16_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
    tile_major: bool = False,
) -> torch.Tensor:
    """y [..., N] = x [..., K] · (qweight [N, K] int8 · scales [N, 1])ᵀ (+ bias [N]); x fp16/bf16.
    ``tile_major``: qweight is ``tile_major_int8(q)`` of the row-major q (faster to stream; same results).

    Kernel chosen by ``W8A16`` (see module doc). Registered as ``torch.ops.angel_kernels.w8a16_gemm``.
    """
    _validate(x, qweight, scales, bias, tile_major)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    p = W8A16Problem(x2.shape[0], qweight.shape[0], qweight.shape[1], x.dtype, x.device)
    if p.M == 0:
        return x.new_empty((*lead, p.N))
    y = W8A16.select(p, force="reference" if reference_forced() else None).run(p, x2, qweight, scales, bias,
                                                                            tile_major)
    return y.reshape(*lead, p.N)


def tuning_space(p: W8A16Problem) -> list[KernelConfig]:
    """Configs worth timing for a problem's M regime (pruned for shared memory before timing)."""
    from itertools import product

    from ..tuning import prune_configs

    token_tiles = {32: (16, 32), 64: (32, 64), 128: (64, 128)}.get(m_bucket(p.M), (128, 256))
    if p.M <= 16:
        token_tiles = (16,)  # the smallest MMA N tile
    if p.M <= 16:  # weight streaming: deep pipelines keep bytes in flight
        space = product(token_tiles, (64, 128), (BLOCK_K,), (4, 8), (3, 4, 5, 6), (1,))
    else:
        space = product(token_tiles, (64, 128, 256), (BLOCK_K,), (4, 8), (2, 3, 4), (8,))
    # the conversion is not tuned: WORDS (the default) has the fewest instructions and the same bits as the others
    configs = [
        KernelConfig(bm, bn, bk, num_warps=w, num_stages=s, extra=(("GROUP_N", g),)) for bm, bn, bk, w, s, g in space
    ]
    if p.M <= 16:
        configs = with_decode_dot_t_choices(configs)
    if p.M > 16:  # batches: the split ranges in one program (SERIAL) or the split launch, where K is split
        configs = with_serial_choices(configs, split_k_on(p.device, "w8a16", p.N, p.K, BLOCK_K))
        configs = with_dot_t_choices(configs)
    return prune_configs(configs, K=p.K, a_bytes=p.dtype.itemsize, b_bytes=1)


def tune(
    n: int, k: int, m: int, *, device="cuda", dtype=torch.float16, store=None, invariant_with=None, bench=None,
    space=None, tile_major: bool = False,
) -> tuple[KernelConfig, dict]:
    """Warm-up step: time ``tuning_space`` (or ``space(configs)``, a filter of it) for one (N, K, M bucket), check
    each result, record the fastest.

    ``invariant_with``: a config for M=1; a candidate config is then admitted only if rows 0 and M-1 of its
    output equal, bitwise, the M=1 config's output for those rows alone (batch invariance).
    Each config is timed over rotating input sets (together over twice the L2 size: a 4096×4096 int8 weight is
    16.8 MB, so 7 sets on H100's 50 MB; one 28672×4096 weight, 117 MB, is enough alone); set 0 is the checked
    one. ``bench(calls) -> µs`` defaults to CUDA-graph replay over the sets (see ``tune_kernel``).
    ``tile_major``: time tile-major weights (``tile_major_int8``) instead of row-major ones.
    """
    from functools import partial

    from ..testing import relative_error
    from ..tuning import l2_bytes, rotation_count, tune_kernel

    device = torch.device(device)
    p = W8A16Problem(m_bucket(m), n, k, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)

    def make_set():
        x = torch.randn(p.M, k, device=device, generator=gen).to(dtype)
        q = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8, generator=gen)
        s = torch.rand(n, device=device, generator=gen) * 0.01 + 1e-3
        return x, q, s

    sets = [make_set()]
    set_bytes = sum(t.numel() * t.element_size() for t in sets[0])
    sets += [make_set() for _ in range(1, rotation_count(set_bytes, l2_bytes(device)))]
    x, q, s = sets[0]
    ref = w8a16_gemm_ref(x, q, s)
    if tile_major:
        sets = [(xs, tile_major_int8(qs), ss) for xs, qs, ss in sets]
    launch = partial(launch_tiled, tile_major=tile_major)
    rows = sorted({0, p.M - 1})
    singles = [launch(x[i : i + 1], sets[0][1], s, None, invariant_with) for i in rows] if invariant_with else None

    def check(y):
        err = relative_error(y, ref)
        if not err < 1e-2:
            raise ValueError(f"relative error {err}")
        if singles is not None:
            for i, single in zip(rows, singles):
                if not torch.equal(y[i : i + 1], single):
                    raise ValueError(f"row {i} differs from its M=1 result")

    return tune_kernel(
        store or default_store(), KERNEL_NAME, p.key(), space(tuning_space(p)) if space else tuning_space(p),
        lambda cfg: [partial(launch, *xqs, None, cfg) for xqs in sets], device, check=check, bench=bench,
    )
