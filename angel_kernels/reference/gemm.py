"""Reference GEMMs: y = x · Wᵀ with W given in quantized form."""
import torch


def w8a16_gemm_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] fp16/bf16; qweight int8 [N, K]; scales [N] (one per output channel) → [..., N] in x.dtype."""
    y = (x.to(torch.float32) @ qweight.to(torch.float32).t()) * scales.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
