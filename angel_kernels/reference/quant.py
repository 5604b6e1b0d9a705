"""Reference quantizers (symmetric, round-to-nearest-even then clamp)."""
import torch

INT8_QMAX = 127
# A row of zeros still gets a positive scale: its quantized values are all 0 and dequantize to exactly 0.
SCALE_EPS = 1e-8


def quantize_weight_int8_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w [N, K] → (q int8 [N, K], scale fp32 [N]), w ≈ q · scale[:, None]."""
    wf = w.to(torch.float32)
    scale = (wf.abs().amax(dim=1) / INT8_QMAX).clamp_min(SCALE_EPS)
    q = torch.round(wf / scale[:, None]).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale
