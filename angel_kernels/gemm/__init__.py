"""Weight-quantized GEMMs (y = x · Wᵀ): Triton kernels, launchers, dispatch."""
from .w8a16 import w8a16_gemm, W8A16
from .w4a16 import w4a16_gemm, W4A16

__all__ = ["w8a16_gemm", "W8A16", "w4a16_gemm", "W4A16"]
