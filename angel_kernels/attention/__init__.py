"""Paged KV cache kernels: the cache write (int8 per-token-head quantization or a copy) and paged attention."""
from .kv_cache import inline_scale_views, SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS
from .kv_write import write_kv_cache, KV_WRITE

__all__ = [
    "write_kv_cache",
    "inline_scale_views",
    "KV_WRITE",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_BLOCK_SIZES",
]
