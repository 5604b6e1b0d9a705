"""angel-kernels: Triton kernels for cheaper LLM inference, with a thin vLLM plugin.

Public functional API (each also registered as ``torch.ops.angel_kernels.<name>``):
- ``w8a16_gemm(x, qweight, scales, bias=None)``: int8 weight-only GEMM.
- ``quantize_weight_int8(w)``: online per-channel int8 quantization of an fp16/bf16 weight.

Importing this package touches no GPU: kernels compile on first use, tuned configs load on first lookup.
"""
__version__ = "0.1.0"

from .gemm import w8a16_gemm
from .quantization import quantize_weight_int8

__all__ = ["__version__", "w8a16_gemm", "quantize_weight_int8"]
