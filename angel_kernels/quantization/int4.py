"""Group-wise int4 weight-only quantization (round-to-nearest) into our packed layout.

The layout (``qweight [K // 8, N]`` int32, ``scales [K // group, N]``, optional ``zeros [K // group, N]`` uint8,
optional ``perm [K]``) is specified in ``reference/int4.py``; ``Int4Weight`` carries one layer's tensors.

- symmetric (``sym=True``, the default): per group, ``s = max(max(w) / 7, −min(w) / 8)``, so every weight lies in
  [−8 s, 7 s] and nothing is clipped: the round-trip error is at most s / 2. Stored as ``q = round(w / s) + 8``.
- asymmetric: the range [min(w, 0), max(w, 0)] (it always contains 0, so 0 dequantizes exactly) split in 15
  steps, ``z = round(−min / s)`` in 0 .. 15, ``q = clamp(round(w / s) + z, 0, 15)``.

The scale is rounded to its storage dtype *before* the weights are divided by it, so the stored (q, s) pair is
the nearest one the kernel can see; a zero group gets a positive scale (never a division by zero).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .._checks import check_float_weight
from ..reference.int4 import INT4_PACK, INT4_QMAX, INT4_SYM_ZERO, dequantize_int4_ref
from ..reference.quant import SCALE_EPS

INT4_GROUP_SIZES = (32, 64, 128)  # plus channel-wise (group_size == K, or −1 when quantizing)
# Output channels quantized at once: bounds the fp32 scratch to ROW_CHUNK × K elements (235 MB at K = 14336).
ROW_CHUNK = 4096


@dataclass(frozen=True)
class Int4Weight:
    """One linear layer's int4 weight in our layout (see ``reference/int4.py``); y = x · Wᵀ, W [N, K].

    ``w4a16_gemm(x, w.qweight, w.scales, w.zeros, w.group_size, bias, w.perm)`` computes the layer.
    """

    qweight: torch.Tensor  # [K // 8, N] int32, 8 consecutive K rows per word, low nibble first, values 0..15
    scales: torch.Tensor  # [K // group_size, N] fp16 / bf16 / fp32
    zeros: Optional[torch.Tensor]  # [K // group_size, N] uint8 (asymmetric) or None (symmetric: q − 8)
    group_size: int  # 32, 64, 128, or K (channel-wise)
    perm: Optional[torch.Tensor] = None  # [K] int32: packed row k is input feature perm[k] (act-order)

    @property
    def K(self) -> int:
        return self.qweight.shape[0] * INT4_PACK

    @property
    def N(self) -> int:
        return self.qweight.shape[1]

    def dequantize(self) -> torch.Tensor:
        """fp32 Wᵀ [K, N] in the order of x's features (the reference dequantization)."""
        return dequantize_int4_ref(self.qweight, self.scales, self.zeros, self.group_size, self.perm)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Unsigned values 0 .. 15, [K, N] (any integer dtype) → int32 [K // 8, N]: row 8r + j into nibble j of row r."""
    k, n = q.shape
    if k % INT4_PACK:
        raise ValueError(f"K={k} rows cannot be packed 8 to an int32 word: K must be a multiple of 8")
    q = q.to(torch.int32).reshape(k // INT4_PACK, INT4_PACK, n)
    packed = torch.zeros((k // INT4_PACK, n), dtype=torch.int32, device=q.device)
    for j in range(INT4_PACK):
        packed |= q[:, j, :] << (4 * j)  # nibble 7 lands in the sign bit: int32 wraps, the bits are what count
    return packed


def _scale_to_storage(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive scale in ``dtype``: an eps floor in fp32, then the dtype's smallest normal where it underflowed."""
    s = s.clamp_min(SCALE_EPS).to(dtype)
    return torch.where(s > 0, s, torch.full_like(s, torch.finfo(dtype).tiny))


def quantize_weight_int4(
    w: torch.Tensor,
    group_size: int = 128,
    *,
    sym: bool = True,
    scale_dtype: Optional[torch.dtype] = None,
    row_chunk: int = ROW_CHUNK,
) -> Int4Weight:
    """w [N, K] fp16/bf16/fp32 → ``Int4Weight`` (round-to-nearest, group-wise along K).

    ``group_size`` 32, 64, 128, or −1 for channel-wise; ``scale_dtype`` defaults to w.dtype.
    Bit-identical whatever ``row_chunk`` is (rows are quantized independently).
    """
    check_float_weight(w)
    n, k = w.shape
    if group_size == -1:
        group_size = k
    if group_size not in INT4_GROUP_SIZES and group_size != k:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} or -1 (channel-wise), got {group_size}")
    if k % INT4_PACK or k % group_size:
        raise ValueError(f"K={k} must be a multiple of 8 and of group_size={group_size}")
    scale_dtype = scale_dtype or w.dtype
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"scale_dtype must be float16, bfloat16 or float32, got {scale_dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or inf: it cannot be quantized")

    n_groups = k // group_size
    qweight = torch.empty((k // INT4_PACK, n), dtype=torch.int32, device=w.device)
    scales = torch.empty((n_groups, n), dtype=scale_dtype, device=w.device)
    zeros = None if sym else torch.empty((n_groups, n), dtype=torch.uint8, device=w.device)
    for start in range(0, n, row_chunk):
        stop = min(start + row_chunk, n)
        g = w[start:stop].to(torch.float32).reshape(stop - start, n_groups, group_size)
        lo = g.amin(dim=2).clamp_max(0.0)
        hi = g.amax(dim=2).clamp_min(0.0)
        if sym:
            s = _scale_to_storage(torch.maximum(hi / (INT4_QMAX - INT4_SYM_ZERO), -lo / INT4_SYM_ZERO), scale_dtype)
            z = torch.full_like(lo, INT4_SYM_ZERO)
        else:
            s = _scale_to_storage((hi - lo) / INT4_QMAX, scale_dtype)
            z = torch.round(-lo / s.to(torch.float32)).clamp_(0, INT4_QMAX)
            zeros[:, start:stop] = z.t().to(torch.uint8)
        sf = s.to(torch.float32)
        q = torch.round(g / sf[:, :, None]).add_(z[:, :, None]).clamp_(0, INT4_QMAX)  # round, then clamp
        qweight[:, start:stop] = pack_int4_rows(q.reshape(stop - start, k).t())
        scales[:, start:stop] = s.t()
    return Int4Weight(qweight, scales, zeros, group_size)
