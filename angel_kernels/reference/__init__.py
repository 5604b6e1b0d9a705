"""Pure-torch references: the readable spec of every kernel, the oracle of the tests and the CPU path.

All math in fp32 (fp64 where noted); outputs cast to the kernel's output dtype at the very end.
"""
from .gemm import w8a16_gemm_ref
from .int4 import dequantize_int4_ref, w4a16_gemm_ref
from .quant import quantize_weight_int8_ref, INT8_QMAX, SCALE_EPS

__all__ = ["w8a16_gemm_ref", "dequantize_int4_ref", "w4a16_gemm_ref", "quantize_weight_int8_ref", "INT8_QMAX", "SCALE_EPS"]
from .attention import KV_SCALE_EPS, paged_attention_ref, paged_decode_attention_ref, quantize_kv_ref, write_kv_cache_ref  # noqa: E402,E501
__all__ += ["KV_SCALE_EPS", "quantize_kv_ref", "write_kv_cache_ref", "paged_attention_ref", "paged_decode_attention_ref"]
