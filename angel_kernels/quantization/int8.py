"""Online int8 weight-only quantization (the ``ifq`` mode): per-output-channel absmax, round-to-nearest.

Runs where the weight lives (GPU while loading), a block of rows at a time, so the fp32 working copy is
bounded by ``ROW_CHUNK × K`` elements instead of a second full copy of the layer.
"""
import torch

from .._checks import check_float_weight
from ..reference.quant import INT8_QMAX, SCALE_EPS

# 4096 rows × K 14336 × 4 bytes ≈ 235 MB of fp32 scratch at most for Llama-3-8B's largest layer.
ROW_CHUNK = 4096


def quantize_weight_int8(w: torch.Tensor, *, row_chunk: int = ROW_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] fp16/bf16/fp32 → (qweight int8 [N, K], scales fp32 [N]); w ≈ qweight · scales[:, None].

    Bit-identical to ``reference.quantize_weight_int8_ref``.
    """
    check_float_weight(w)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or inf: it cannot be quantized")
    n, k = w.shape
    qweight = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scales = torch.empty((n,), dtype=torch.float32, device=w.device)
    for start in range(0, n, row_chunk):
        rows = w[start : start + row_chunk].to(torch.float32)
        s = (rows.abs().amax(dim=1) / INT8_QMAX).clamp_min_(SCALE_EPS)
        rows.div_(s[:, None]).round_().clamp_(-INT8_QMAX, INT8_QMAX)
        qweight[start : start + row_chunk] = rows.to(torch.int8)
        scales[start : start + row_chunk] = s
    return qweight, scales
