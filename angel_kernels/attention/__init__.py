"""Paged KV cache kernels: the cache write (int8 per-token-head quantization or a copy) and paged attention."""
from .kv_cache import inline_scale_views, int8_page_bytes, int8_page_views, SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS
from .kv_write import write_kv_cache, KV_WRITE
from .paged_decode import paged_decode_attention, PAGED_DECODE
from .paged_prefill import paged_attention, PAGED_PREFILL

__all__ = [
    "write_kv_cache",
    "paged_decode_attention",
    "paged_attention",
    "inline_scale_views",
    "int8_page_views",
    "int8_page_bytes",
    "KV_WRITE",
    "PAGED_DECODE",
    "PAGED_PREFILL",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_BLOCK_SIZES",
]
