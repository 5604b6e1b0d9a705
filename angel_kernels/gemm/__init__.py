"""Weight-quantized GEMMs (y = x · Wᵀ): Triton kernels, launchers, dispatch."""
from .w8a16 import row_major_int8, tile_major_int8, w8a16_gemm, W8A16
from .w4a16 import w4a16_gemm, W4A16
from .fragment import (fragment_major_int4, fragment_major_int8, packed_from_fragment, row_major_from_fragment_int8,
                       w4a16_fragment_gemm, w8a16_fragment_gemm, W4A16_FRAGMENT, W8A16_FRAGMENT)

__all__ = ["w8a16_gemm", "W8A16", "tile_major_int8", "row_major_int8", "w4a16_gemm", "W4A16", "fragment_major_int4",
           "packed_from_fragment", "w4a16_fragment_gemm", "W4A16_FRAGMENT", "w8a16_fragment_gemm", "W8A16_FRAGMENT",
           "fragment_major_int8", "row_major_from_fragment_int8"]
