"""``kv_cache_dtype="int8_per_token_head"`` served by angel-kernels' paged KV cache kernels.

vLLM 0.32 allocates this cache itself, one int8 tensor per layer, logically
``[num_blocks, num_kv_heads, block_size, 2 * (head_dim + 4)]`` (``customize_spec`` below asks for that page size:
int8 K and V plus one fp32 scale each per (token, head)). Only our kernels read and write it, so inside each
block we use our own arrangement of those bytes, ``angel_kernels.int8_page_views``: head-major regions
``K | V | K scales | V scales`` with 16-byte aligned rows instead of vLLM's packed rows (whose V data is only
4-byte aligned: decode at batch 64 × 16k took 2028 µs there against 1315–1360 µs on aligned rows, H100).
``write_kv_cache`` quantizes the new tokens into it (one scale per token and KV head) and ``paged_attention``
reads it for every batch: prefill, chunked prefill, prefix-cache hits, mixed batches, and decode-only batches
(which it hands to the split-KV decode kernel).

Two backends, each a subclass of the stock backend it replaces, so every other KV cache dtype keeps vLLM's own
code path unchanged (same metadata, same kernels, same cache layout):

- CPU: ``AngelCPUAttentionBackend`` registered over ``CPU_ATTN``. vLLM's CPU platform always picks ``CPU_ATTN``
  and ignores ``CUSTOM``; its kernels treat every quantized dtype as fp8 (a 1-byte cache without per-token
  scales, fp8 values at scale 1), so ``int8_per_token_head`` must be ours there. On CPU our ops run their
  pure-torch references (``TRITON_INTERPRET=1`` runs the Triton kernels under the interpreter instead, see
  ``angel_kernels.runtime``).
- CUDA: ``AngelTritonAttentionBackend`` registered as ``CUSTOM``, chosen with
  ``attention_config={"backend": "CUSTOM"}`` (``--attention-backend CUSTOM``); fp16/bf16/fp8 KV go to vLLM's
  Triton backend (its page size for int8 is the one this backend asks for).

Unsupported int8 configurations (head size, block size, model dtype, ALiBi, sinks, encoder attention) are
refused with a ``ValueError`` while ``LLM(...)`` builds the model, naming the setting and the supported values.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch

from angel_kernels import int8_page_bytes, int8_page_views, paged_attention, write_kv_cache
from angel_kernels.attention import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS
from angel_kernels.attention.kv_cache import INLINE_SCALE_BYTES
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder, AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVQuantMode

__all__ = [
    "INT8_KV_CACHE_DTYPE",
    "AngelCPUAttentionBackend",
    "AngelTritonAttentionBackend",
    "int8_kv_config_problems",
    "register_int8_kv_backend",
]

logger = logging.getLogger("angel_vllm")

INT8_KV_CACHE_DTYPE = "int8_per_token_head"
# activations our kernels take (queries, keys and values before quantization)
INT8_KV_MODEL_DTYPES = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------ configuration checks
def int8_kv_config_problems(
    head_size: Optional[int] = None, dtype: Optional[torch.dtype] = None, block_size: Optional[int] = None
) -> list[str]:
    """What in this configuration the int8 KV kernels cannot serve (empty: all fine); ``None`` = not known yet."""
    problems = []
    if head_size is not None and head_size not in SUPPORTED_HEAD_DIMS:
        problems.append(f"head size {head_size} (supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
    if dtype is not None and dtype not in INT8_KV_MODEL_DTYPES:
        problems.append(f"model dtype {str(dtype).replace('torch.', '')} (supported: float16, bfloat16)")
    if block_size is not None and block_size not in SUPPORTED_BLOCK_SIZES:
        problems.append(f"block size {block_size} (supported: {', '.join(map(str, SUPPORTED_BLOCK_SIZES))})")
    return problems


def _raise_if_unsupported(where: str, **config) -> None:
    problems = int8_kv_config_problems(**config)
    if problems:
        raise ValueError(
            f"kv_cache_dtype={INT8_KV_CACHE_DTYPE!r} is not supported for {where}: " + "; ".join(problems)
            + ". Choose a supported value or another kv_cache_dtype."
        )


def _int8_combination_reason(head_size, dtype, block_size, has_sink, use_mm_prefix) -> Optional[str]:
    """``supports_combination`` answer for int8 KV (vLLM's CUDA platform reports it when it validates a backend)."""
    problems = int8_kv_config_problems(head_size, dtype, block_size)
    if has_sink:
        problems.append("attention sinks")
    if use_mm_prefix:
        problems.append("bidirectional multimodal prefixes")
    return f"{INT8_KV_CACHE_DTYPE}: unsupported " + "; ".join(problems) if problems else None


def _is_int8_spec(spec) -> bool:
    return isinstance(spec, AttentionSpec) and spec.kv_quant_mode == KVQuantMode.INT8_PER_TOKEN_HEAD


def _int8_page_spec(spec: AttentionSpec) -> AttentionSpec:
    """Bytes per (head, slot) cell: K and V int8 data and one fp32 scale each; the same page size as vLLM's own
    int8_per_token_head layout (``int8_page_views`` arranges the bytes of a block differently)."""
    if spec.state_content_bytes is not None:
        return spec
    return replace(spec, state_content_bytes=spec.head_size + spec.head_size_v + 2 * INLINE_SCALE_BYTES)


# ------------------------------------------------------------------------------------------------ the int8 path
class _Int8KVAttention:
    """Cache write and attention over the int8 cache pages; shared by the CPU and CUDA impls."""

    def __init__(self, *, head_size, scale, alibi_slopes, sliding_window, logits_soft_cap, attn_type, sinks) -> None:
        vllm_config = get_current_vllm_config()
        model_dtype = vllm_config.model_config.dtype if vllm_config.model_config is not None else None
        cache_config = vllm_config.cache_config
        # Only a block size the user chose is final here; the kernel block size is checked again (always) when
        # the metadata builder is made, still inside LLM(...).
        user_block = None
        if cache_config is not None and cache_config.user_specified_block_size:
            user_block = cache_config.block_size
        _raise_if_unsupported("this model", head_size=head_size, dtype=model_dtype, block_size=user_block)
        unsupported = []
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"{getattr(attn_type, 'value', attn_type)} attention (decoder self-attention only)")
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sinks is not None:
            unsupported.append("attention sinks")
        if unsupported:
            raise ValueError(
                f"kv_cache_dtype={INT8_KV_CACHE_DTYPE!r} does not support {', '.join(unsupported)}; use another"
                " kv_cache_dtype for this model"
            )
        self.head_size = head_size
        self.scale = float(scale)
        self.sliding_window = int(sliding_window) if sliding_window is not None else None
        # vLLM passes 0 / None for "no soft cap"; our kernels take None
        self.soft_cap = float(logits_soft_cap) if logits_soft_cap else None
        self._views_key = None
        self._views = None

    def views(self, kv_cache: torch.Tensor):
        """(key_cache, value_cache, k_scale, v_scale) of this layer's cache, cut once per cache tensor.

        kv_cache: vLLM's logical [num_blocks, num_kv_heads, block_size, 2 * (head_dim + 4)] int8 view; only its
        block stride matters (each block's page is one contiguous run of bytes, rearranged by int8_page_views).
        """
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.stride(), kv_cache.storage_offset())
        if key != self._views_key:
            # vLLM reallocates the caches after its profiling run: views of the old tensor must not survive
            num_blocks, heads, block_size, _content = kv_cache.shape
            page = int8_page_bytes(block_size, heads, self.head_size)
            if kv_cache.stride(0) != page or kv_cache.numel() != num_blocks * page:
                raise ValueError(
                    f"the int8 KV cache must hold one contiguous {page}-byte page per block; got shape"
                    f" {tuple(kv_cache.shape)} with strides {kv_cache.stride()}"
                )
            pages = kv_cache.as_strided((num_blocks, page), (page, 1), kv_cache.storage_offset())
            self._views = int8_page_views(pages, block_size, heads, self.head_size)
            self._views_key = key
        return self._views

    def write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        key_cache, value_cache, k_scale, v_scale = self.views(kv_cache)
        # the slot mapping may cover fewer rows than key/value (padded tokens carry no slot) or the reverse
        n = min(key.shape[0], slot_mapping.shape[0])
        write_kv_cache(key[:n], value[:n], key_cache, value_cache, slot_mapping[:n].to(torch.int64),
                       k_scale, v_scale)

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, meta, output: torch.Tensor) -> torch.Tensor:
        """meta: vLLM's metadata (num_actual_tokens, max_query_len, query_start_loc, seq_lens, block_table)."""
        n = meta.num_actual_tokens
        if n == 0:
            return output
        key_cache, value_cache, k_scale, v_scale = self.views(kv_cache)
        num_reqs = meta.query_start_loc.shape[0] - 1
        seq_lens = meta.seq_lens[:num_reqs]
        block_table = meta.block_table[:num_reqs]
        # sequence b's queries are rows query_start_loc[b]:query_start_loc[b+1], the last positions of its
        # seq_lens[b] cached tokens: prefill, chunked prefill, prefix-cache hits and mixed batches alike; a
        # decode-only batch (max_query_len 1) goes to the split-KV decode kernel inside paged_attention
        out = paged_attention(
            query[:n], key_cache, value_cache, block_table, seq_lens, meta.query_start_loc[: num_reqs + 1],
            k_scale, v_scale, scale=self.scale, max_query_len=int(meta.max_query_len),
            sliding_window=self.sliding_window, soft_cap=self.soft_cap,
        )
        output[:n].copy_(out.view(output[:n].shape))
        return output


def _check_forward_args(output_scale, output_block_scale) -> None:
    if output_scale is not None or output_block_scale is not None:
        raise NotImplementedError(f"fused output quantization is not supported with {INT8_KV_CACHE_DTYPE}")


def _check_builder_spec(spec: AttentionSpec, vllm_config) -> None:
    """The kernel block size (final here) and the head size of this KV cache group."""
    _raise_if_unsupported("this model", head_size=spec.head_size, dtype=vllm_config.model_config.dtype,
                          block_size=spec.block_size)
    if spec.head_size_v != spec.head_size:
        raise ValueError(
            f"kv_cache_dtype={INT8_KV_CACHE_DTYPE!r} needs one head size for keys and values, got"
            f" {spec.head_size} and {spec.head_size_v}"
        )


class _Int8KVBackendMixin:
    """What both backends add to the stock backend they extend (listed first among the bases)."""

    @classmethod
    def get_supported_kernel_block_sizes(cls, kv_cache_spec=None):
        if _is_int8_spec(kv_cache_spec):
            return list(SUPPORTED_BLOCK_SIZES)
        return super().get_supported_kernel_block_sizes(kv_cache_spec)

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
                             use_mm_prefix, device_capability):
        reason = super().supports_combination(head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink,
                                              use_sparse, use_mm_prefix, device_capability)
        if reason is None and kv_cache_dtype == INT8_KV_CACHE_DTYPE:
            reason = _int8_combination_reason(head_size, dtype, block_size, has_sink, use_mm_prefix)
        return reason


class _Int8KVImplMixin:
    """What both attention impls add: an int8_per_token_head layer keeps a ``_Int8KVAttention`` and writes its
    cache with it; other layers are the stock impl's."""

    _angel: Optional[_Int8KVAttention] = None

    def _init_int8(self, kv_cache_dtype, *, head_size, scale, alibi_slopes, sliding_window, logits_soft_cap,
                   attn_type, sinks) -> None:
        self._angel = None
        if kv_cache_dtype == INT8_KV_CACHE_DTYPE:
            self._angel = _Int8KVAttention(
                head_size=head_size, scale=scale, alibi_slopes=alibi_slopes, sliding_window=sliding_window,
                logits_soft_cap=logits_soft_cap, attn_type=attn_type, sinks=sinks,
            )

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if self._angel is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self._angel.write(key, value, kv_cache, slot_mapping)


# ---------------------------------------------------------------------------------------------------------- CPU
class AngelCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU builder for every dtype but int8; for int8 the fields our kernels read, nothing else.

    The stock builder's ISA choice and scheduler metadata treat any quantized cache as fp8 (and refuse it
    outright on CPUs without AVX-512), and our kernels need neither, so the int8 path skips them.
    """

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        self._int8 = _is_int8_spec(kv_cache_spec)
        if not self._int8:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            return
        AttentionMetadataBuilder.__init__(self, kv_cache_spec, layer_names, vllm_config, device)
        _check_builder_spec(kv_cache_spec, vllm_config)
        self.kv_cache_spec = kv_cache_spec
        self.block_size = kv_cache_spec.block_size

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> CPUAttentionMetadata:
        if not self._int8:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        m = common_attn_metadata
        if not (isinstance(m.causal, bool) and m.causal):
            raise ValueError(f"kv_cache_dtype={INT8_KV_CACHE_DTYPE!r} supports causal decoder attention only")
        return CPUAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            query_start_loc=m.query_start_loc,
            max_seq_len=m.max_seq_len,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            scheduler_metadata=None,
            causal=True,
        )


class AngelCPUAttentionImpl(_Int8KVImplMixin, CPUAttentionBackendImpl):
    """vLLM's CPU attention, except that an int8_per_token_head layer runs on angel-kernels."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self._init_int8(kv_cache_dtype, head_size=head_size, scale=scale, alibi_slopes=alibi_slopes,
                        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, attn_type=attn_type,
                        sinks=sinks)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if self._angel is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        _check_forward_args(output_scale, output_block_scale)
        if attn_metadata is None:  # profiling / warm-up run
            return output
        return self._angel.attend(query, kv_cache, attn_metadata, output)


class AngelCPUAttentionBackend(_Int8KVBackendMixin, CPUAttentionBackend):
    """``CPU_ATTN`` with ``int8_per_token_head`` served by angel-kernels; every other dtype is vLLM's own."""

    supported_kv_cache_dtypes = [*CPUAttentionBackend.supported_kv_cache_dtypes, INT8_KV_CACHE_DTYPE]

    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        return _int8_page_spec(spec) if _is_int8_spec(spec) else spec

    @staticmethod
    def get_impl_cls():
        return AngelCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return AngelCPUMetadataBuilder


# --------------------------------------------------------------------------------------------------------- CUDA
class AngelTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    """vLLM's Triton builder. With int8 KV, full CUDA graphs only for pure decode batches: the int8 path picks the
    decode or the varlen kernel (and passes ``max_query_len``) from the host-side batch shape, which a captured
    graph would freeze."""

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if _is_int8_spec(kv_cache_spec):
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if _is_int8_spec(kv_cache_spec):
            _check_builder_spec(kv_cache_spec, vllm_config)


class AngelTritonAttentionImpl(_Int8KVImplMixin, TritonAttentionImpl):
    """vLLM's Triton attention, except that an int8_per_token_head layer runs on angel-kernels."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, use_alibi_sqrt=False, chunk_lookback=-1) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, use_alibi_sqrt,
                         chunk_lookback)
        if kv_cache_dtype == INT8_KV_CACHE_DTYPE and chunk_lookback > -1:
            raise ValueError(f"kv_cache_dtype={INT8_KV_CACHE_DTYPE!r} does not support chunked attention")
        self._init_int8(kv_cache_dtype, head_size=head_size, scale=scale, alibi_slopes=alibi_slopes,
                        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, attn_type=attn_type,
                        sinks=sinks)
        if self._angel is not None:
            self.supports_quant_query_input = False  # our kernels take fp16/bf16 queries

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if self._angel is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        _check_forward_args(output_scale, output_block_scale)
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        if attn_metadata.mm_prefix_range_tensor is not None or attn_metadata.rswa_prefix_lens is not None:
            raise ValueError(f"kv_cache_dtype={INT8_KV_CACHE_DTYPE!r} does not support bidirectional prefixes or R-SWA")
        if not (isinstance(attn_metadata.causal, bool) and attn_metadata.causal):
            raise ValueError(f"kv_cache_dtype={INT8_KV_CACHE_DTYPE!r} supports causal decoder attention only")
        return self._angel.attend(query, kv_cache, attn_metadata, output)

    def fused_rope_kvcache_supported(self):
        return False if self._angel is not None else super().fused_rope_kvcache_supported()


class AngelTritonAttentionBackend(_Int8KVBackendMixin, TritonAttentionBackend):
    """``CUSTOM`` on CUDA: vLLM's Triton backend with ``int8_per_token_head`` served by angel-kernels.

    The page size comes from ``TritonAttentionBackend.customize_spec`` (the same bytes per block).
    """

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # Attention looks the name up in AttentionBackendEnum

    @staticmethod
    def get_impl_cls():
        return AngelTritonAttentionImpl

    @staticmethod
    def get_builder_cls():
        return AngelTritonMetadataBuilder


# ------------------------------------------------------------------------------------------------- registration
_CPU_PATH = f"{__name__}.{AngelCPUAttentionBackend.__qualname__}"
_CUDA_PATH = f"{__name__}.{AngelTritonAttentionBackend.__qualname__}"


def register_int8_kv_backend() -> None:
    """Serve ``kv_cache_dtype="int8_per_token_head"`` with angel-kernels (idempotent; touches no GPU).

    CPU: replaces ``CPU_ATTN`` (vLLM's CPU platform selects nothing else) with a subclass that changes only
    int8_per_token_head layers. CUDA: provides ``CUSTOM``. A backend someone else registered there is kept.
    """
    for enum, path in ((AttentionBackendEnum.CPU_ATTN, _CPU_PATH),
                       (AttentionBackendEnum.CUSTOM, _CUDA_PATH)):
        if enum.is_overridden() and enum.get_path() != path:
            logger.warning("attention backend %s is already overridden by %s; int8 KV backend not registered there",
                           enum.name, enum.get_path())
            continue
        register_backend(enum, path)
