"""Reference int4 group-wise weight-only GEMM: the spec of our packed int4 layout.

Our layout (what ``quantize_weight_int4`` and the checkpoint readers produce, and ``w4a16_gemm`` reads), for a
linear layer y = x · Wᵀ with W [N, K]:

- ``qweight`` int32 ``[K // 8, N]``: word ``qweight[r, n]`` holds the 8 consecutive input rows ``k = 8r .. 8r+7``
  of output column ``n``, low nibble first (nibble ``j`` = bits ``4j .. 4j+3`` ↔ ``k = 8r + j``), each stored as
  an unsigned value ``q`` in ``0 .. 15``. This is GPTQ's own ``qweight`` layout: packing along K keeps a K-block
  of one column in a few words, and along N the words of one packed row are contiguous (coalesced loads).
- ``scales`` fp16/bf16/fp32 ``[K // group_size, N]``: one scale per (group of ``group_size`` rows, column);
  channel-wise is ``group_size == K`` (``scales [1, N]``).
- ``zeros`` (asymmetric only) uint8 ``[K // group_size, N]``: unpacked integer zero points, ``0 .. 16`` (16 occurs
  in old GPTQ exports, see ``quantization.checkpoints``). Kept unpacked and unscaled so ``q − z`` is an exact small
  integer in fp16/bf16 and one rounding (× scale) is all the weight suffers.
- ``perm`` (act-order only) int32 ``[K]``: packed row ``k`` belongs to input feature ``perm[k]``; the op reads
  ``x[..., perm]``. ``None`` means the identity.

Dequantized value of packed row ``k``, column ``n``, group ``g = k // group_size``:
    symmetric:  ``(q − 8) · scales[g, n]``         (q − 8 ∈ [−8, 7])
    asymmetric: ``(q − zeros[g, n]) · scales[g, n]``
"""
from typing import Optional

import torch

INT4_PACK = 8  # int4 values per int32 word
INT4_SYM_ZERO = 8  # symmetric: the stored unsigned value q means q − 8
INT4_QMAX = 15  # stored values are 0 .. 15
INT4_MAX_ZERO = 16  # largest zero point the layout allows (GPTQ v1 exports: stored zero −1 read back as 15 + 1)


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K // 8, N] → int32 [K, N] of unsigned values 0 .. 15 (row 8r + j = nibble j of word row r)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)  # [8]
    nib = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # [K // 8, 8, N]
    return nib.reshape(qweight.shape[0] * INT4_PACK, qweight.shape[1])


def dequantize_int4_ref(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor] = None,
    group_size: int = 128,
    perm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The weight as fp32 Wᵀ [K, N] (so y = x @ Wᵀ), rows in the order of x's features (``perm`` undone).

    ``group_size`` −1 means channel-wise (one group of all K rows).
    """
    q = unpack_int4_rows(qweight).to(torch.float32)  # [K, N], packed row order
    k, n = q.shape
    g = k if group_size == -1 else group_size
    # per group: [K // g, g, N] against one scale (and zero) row per group, broadcast rather than repeated
    # (the same values; 1.3–2× faster on a CPU, where this reference is the default path)
    s = scales.to(torch.float32)[:, None, :]
    z = zeros.to(torch.float32)[:, None, :] if zeros is not None else INT4_SYM_ZERO
    w = ((q.view(k // g, g, n) - z) * s).view(k, n)
    if perm is not None:
        out = torch.empty_like(w)
        out[perm.long()] = w  # packed row i is feature perm[i]
        w = out
    return w


def w4a16_gemm_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor] = None,
    group_size: int = 128,
    bias: Optional[torch.Tensor] = None,
    perm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [..., K] fp16/bf16 → [..., N] in x.dtype: fp32 x @ dequantize_int4_ref(...) (+ bias), cast at the end."""
    w = dequantize_int4_ref(qweight, scales, zeros, group_size, perm)
    y = x.to(torch.float32) @ w
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
