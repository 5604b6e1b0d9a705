"""angel-kernels: Triton kernels for cheaper LLM inference, with a thin vLLM plugin.

Public functional API (each also registered as ``torch.ops.angel_kernels.<name>``):
- ``w8a16_gemm(x, qweight, scales, bias=None, tile_major=False)``: int8 weight-only GEMM.
- ``quantize_weight_int8(w)``: online per-channel int8 quantization of an fp16/bf16 weight; ``tile_major_int8(q)``
  its faster-to-stream layout (``tile_major=True``), ``row_major_int8`` back.
- ``w4a16_gemm(x, qweight, scales, zeros=None, group_size=128, bias=None, perm=None)``: int4 group-wise GEMM.
- ``quantize_weight_int4(w, group_size)``, ``repack_gptq`` / ``repack_awq`` / ``repack_compressed_tensors``:
  int4 weights in the layout of ``w4a16_gemm`` (``Int4Weight``), from fp weights or from checkpoints.
- ``w4a16_fragment_gemm(x, words, scales, bias=None)``: the same GEMM (symmetric, group 128) on a weight stored
  fragment-major (``fragment_major_int4(qweight)``, ``packed_from_fragment`` back), fed to Hopper's wgmma from
  registers; what ``ifq_int4`` uses on sm_90 where the layer fits.
- ``w8a16_fragment_gemm(x, words, scales, bias=None)``: ``w8a16_gemm`` on an int8 weight stored fragment-major
  (``fragment_major_int8(q)``, ``row_major_from_fragment_int8`` back); what ``ifq`` uses on sm_90.

Importing this package touches no GPU: kernels compile on first use, tuned configs load on first lookup.
"""
__version__ = "0.1.0"

from .gemm import (
    fragment_major_int4, fragment_major_int8, packed_from_fragment, row_major_from_fragment_int8, row_major_int8,
    tile_major_int8, w4a16_fragment_gemm, w4a16_gemm, w8a16_fragment_gemm, w8a16_gemm,
)
from .quantization import (
    Int4Weight, quantize_weight_int4, quantize_weight_int8, repack_awq, repack_compressed_tensors, repack_gptq,
)

__all__ = [
    "__version__", "w8a16_gemm", "quantize_weight_int8", "tile_major_int8", "row_major_int8", "w4a16_gemm",
    "quantize_weight_int4", "Int4Weight", "w4a16_fragment_gemm", "fragment_major_int4", "packed_from_fragment",
    "repack_gptq", "repack_awq", "repack_compressed_tensors", "w8a16_fragment_gemm", "fragment_major_int8",
    "row_major_from_fragment_int8",
]
from .attention import (  # noqa: E402  (paged KV cache)
    inline_scale_views,
    int8_page_bytes,
    int8_page_views,
    paged_attention,
    paged_decode_attention,
    write_kv_cache,
)
__all__ += ["write_kv_cache", "paged_decode_attention", "paged_attention", "inline_scale_views", "int8_page_views",
            "int8_page_bytes"]
