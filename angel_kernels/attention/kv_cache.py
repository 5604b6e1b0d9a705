"""Paged KV cache layout shared by the write kernel and the attention kernels, and its validation.

Views, not allocations: the kernels take
- ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``, int8 or fp16/bf16,
  head dim contiguous, other strides free (so HND and NHD physical orders and packed caches all work);
- ``k_scale`` / ``v_scale`` (int8 only): fp32 ``[num_blocks, block_size, num_kv_heads]``, strides free.

vLLM 0.32's ``int8_per_token_head`` cache is one int8 tensor per layer, logically
``[num_blocks, num_kv_heads, block_size, 2 * (head_dim + 4)]``; each (block, head, slot) row holds
``K (head_dim bytes) | K scale (fp32) | V (head_dim bytes) | V scale (fp32)``. ``inline_scale_views`` cuts the
four views above out of that tensor without copying; separate plain tensors serve the same kernels.

That packed layout leaves V rows 4-byte aligned (after K's data and scale), which limits the kernels' loads to
4-byte vectors: on an H100, decode at batch 64 × 16k took 2028 µs there against 1360 µs on 16-byte aligned
rows (same kernel and config). ``int8_page_views`` cuts the same four views out of a page of the same size
(``int8_page_bytes``, so vLLM's page accounting is unchanged) laid out head-major and region by region:
``K [H, block, D] | V [H, block, D] | K scales [H, block] | V scales [H, block]``: 16-byte aligned rows, and a KV
head's rows of one block contiguous (2 KB at head 128, block 16).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .._checks import ACT_DTYPES, check_same_device, check_tensor

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
KV_CACHE_DTYPES = (torch.int8, torch.float16, torch.bfloat16)
# bytes of the inline fp32 scale that follows each head's int8 data in vLLM's packed cache
INLINE_SCALE_BYTES = 4


@dataclass(frozen=True)
class PagedAttentionProblem:
    """What the paged attention kernels' configs depend on: the model's heads and the cache, never the batch."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # of q / output
    kv_dtype: torch.dtype
    device: torch.device
    # int8 rows not 16-byte aligned (vLLM's packed int8_per_token_head cache, scales inline): the decode kernel
    # keys their configs apart (its winner on 16-byte rows takes twice as long on them)
    packed_rows: bool = False

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def key(self) -> str:
        # no batch size and no lengths: the config (and with it the decode split partition) never follows them
        kv = "int8" if self.kv_dtype == torch.int8 else "fp"
        return f"D={self.head_dim},G={self.group},page={self.block_size},kv={kv}" + (",rows=packed" * self.packed_rows)


def inline_scale_views(
    kv_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache, k_scale, v_scale) views of a packed int8 cache with inline scales.

    kv_cache: int8, logically [num_blocks, num_kv_heads, block_size, 2 * (head_dim + 4)], last dim contiguous
    (any physical order of the first three dims). Returns int8 [num_blocks, block_size, num_kv_heads, head_dim]
    ×2 and fp32 [num_blocks, block_size, num_kv_heads] ×2, all aliasing ``kv_cache``'s memory.
    """
    check_tensor("kv_cache", kv_cache, dtypes=(torch.int8,), dim=4)
    padded = head_dim + INLINE_SCALE_BYTES
    if kv_cache.shape[3] != 2 * padded:
        raise ValueError(
            f"kv_cache last dim must be 2 * (head_dim + {INLINE_SCALE_BYTES}) = {2 * padded} for head_dim {head_dim},"
            f" got {kv_cache.shape[3]}"
        )
    if kv_cache.stride(3) != 1:
        raise ValueError(f"kv_cache must be contiguous in its last dim, got strides {kv_cache.stride()}")
    if head_dim % INLINE_SCALE_BYTES or kv_cache.storage_offset() % INLINE_SCALE_BYTES or any(
        s % INLINE_SCALE_BYTES for s in kv_cache.stride()[:3]
    ):
        raise ValueError("inline fp32 scales must be 4-byte aligned: head_dim, strides and offset multiples of 4")
    rows = kv_cache.transpose(1, 2)  # [num_blocks, block_size, num_kv_heads, 2 * padded]
    key_cache = rows[..., :head_dim]
    value_cache = rows[..., padded : padded + head_dim]
    # four int8 → one fp32 along the contiguous last dim, then drop that size-1 dim
    k_scale = rows[..., head_dim:padded].view(torch.float32)[..., 0]
    v_scale = rows[..., padded + head_dim :].view(torch.float32)[..., 0]
    return key_cache, value_cache, k_scale, v_scale


def int8_page_bytes(block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one int8 cache block: data and an fp32 scale per (token, head), for K and V."""
    return 2 * block_size * num_kv_heads * (head_dim + INLINE_SCALE_BYTES)


def int8_page_views(
    pages: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache, k_scale, v_scale) views of int8 pages in the head-major region layout.

    pages: int8 [num_blocks, int8_page_bytes(...)] (any tensor whose rows are the blocks, contiguous within a
    row, 16-byte aligned). Returns int8 [num_blocks, block_size, num_kv_heads, head_dim] ×2 and fp32
    [num_blocks, block_size, num_kv_heads] ×2, all aliasing ``pages``.
    """
    check_tensor("pages", pages, dtypes=(torch.int8,), dim=2)
    page = int8_page_bytes(block_size, num_kv_heads, head_dim)
    if pages.shape[1] != page:
        raise ValueError(
            f"pages must have {page} bytes per block (2 * block_size * num_kv_heads * (head_dim + 4)) for"
            f" block_size {block_size}, {num_kv_heads} KV heads, head_dim {head_dim}; got {pages.shape[1]}"
        )
    if pages.stride(1) != 1 or pages.stride(0) % 16 or pages.data_ptr() % 16 or head_dim % 16:
        raise ValueError("int8 pages must be contiguous within a block, 16-byte aligned, and head_dim a multiple of 16")
    nb, bs, h, d = pages.shape[0], block_size, num_kv_heads, head_dim
    data = bs * h * d  # bytes of K (or V) data in a block

    def data_view(offset):  # [nb, bs, h, d] over a head-major [h, bs, d] region
        return pages.as_strided((nb, bs, h, d), (pages.stride(0), d, bs * d, 1), pages.storage_offset() + offset)

    f32 = pages.view(torch.float32)  # [nb, page / 4]: the scale regions, in fp32 units

    def scale_view(offset):  # [nb, bs, h] over a head-major [h, bs] region
        return f32.as_strided((nb, bs, h), (f32.stride(0), 1, bs), f32.storage_offset() + offset // 4)

    return data_view(0), data_view(data), scale_view(2 * data), scale_view(2 * data + bs * h * 4)


def check_kv_caches(
    key_cache,
    value_cache,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
    *,
    writable: bool = False,
) -> tuple[int, int, int, int, bool]:
    """Validate a cache pair (+ scales); returns (num_blocks, block_size, num_kv_heads, head_dim, quantized)."""
    check_tensor("key_cache", key_cache, dtypes=KV_CACHE_DTYPES, dim=4)
    check_tensor("value_cache", value_cache, dtypes=KV_CACHE_DTYPES, dim=4)
    if key_cache.dtype != value_cache.dtype:
        raise TypeError(f"key_cache is {key_cache.dtype} but value_cache is {value_cache.dtype}: use one dtype")
    if key_cache.shape != value_cache.shape:
        raise ValueError(
            f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} must have one shape"
            " [num_blocks, block_size, num_kv_heads, head_dim]"
        )
    num_blocks, block_size, heads, head_dim = key_cache.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not supported (supported: {SUPPORTED_BLOCK_SIZES})")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        _check_strides(name, t, last_contiguous=True, writable=writable)
    quantized = key_cache.dtype == torch.int8
    if quantized:
        if k_scale is None or v_scale is None:
            raise ValueError("int8 caches need k_scale and v_scale (fp32 [num_blocks, block_size, num_kv_heads])")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            check_tensor(name, s, dtypes=(torch.float32,), dim=3)
            if tuple(s.shape) != (num_blocks, block_size, heads):
                raise ValueError(
                    f"{name} must have shape {(num_blocks, block_size, heads)} (one fp32 per cached token and KV"
                    f" head), got {tuple(s.shape)}"
                )
            _check_strides(name, s, last_contiguous=False, writable=writable)
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale/v_scale are for int8 caches only; these caches are {key_cache.dtype}")
    check_same_device(key_cache=key_cache, value_cache=value_cache, k_scale=k_scale, v_scale=v_scale)
    return num_blocks, block_size, heads, head_dim, quantized


def _check_strides(name: str, t: torch.Tensor, *, last_contiguous: bool, writable: bool) -> None:
    if last_contiguous and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last (head) dim, got strides {t.stride()}")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{name} has negative strides {t.stride()}")
    if writable and any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        # an expanded (stride-0) dim makes several cache entries one memory location
        raise ValueError(f"{name} is written in place and must not have stride-0 dims, got strides {t.stride()}")


def check_query_dtype(name: str, t, cache_dtype: torch.dtype) -> None:
    """Activations are fp16/bf16; an unquantized cache holds the activations' dtype."""
    check_tensor(name, t, dtypes=ACT_DTYPES)
    if cache_dtype != torch.int8 and cache_dtype != t.dtype:
        raise TypeError(f"{name} is {t.dtype} but the cache is {cache_dtype}: an fp cache must match (or be int8)")


# --------------------------------------------------------------------------- validation shared by the attention ops
def check_attention_inputs(q, key_cache, value_cache, k_scale, v_scale, block_table, seq_lens, *,
                           q_layout: str) -> tuple[int, int]:
    """q [rows, H_q, D] against the caches; block_table int32 [B, max_blocks] and seq_lens int32 [B] (one row per
    sequence). ``q_layout`` names q's dims in messages. Returns (num_seqs, num_q_heads)."""
    _nb, _bs, heads_kv, head_dim, _ = check_kv_caches(key_cache, value_cache, k_scale, v_scale)
    check_query_dtype("q", q, key_cache.dtype)
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [{q_layout}, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    _rows, Hq, D = q.shape
    if D != head_dim:
        raise ValueError(f"q has head_dim {D} but the cache has {head_dim}")
    if Hq % heads_kv:
        raise ValueError(f"num_q_heads {Hq} must be a multiple of num_kv_heads {heads_kv}")
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last (head) dim, got strides {q.stride()}")
    check_tensor("block_table", block_table, dtypes=(torch.int32,), dim=2)
    check_tensor("seq_lens", seq_lens, dtypes=(torch.int32,), dim=1)
    if block_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"block_table {tuple(block_table.shape)} and seq_lens {tuple(seq_lens.shape)} need one row per sequence"
        )
    if block_table.shape[1] < 1:
        raise ValueError("block_table needs at least one column [num_seqs, max_blocks]")
    check_same_device(q=q, key_cache=key_cache, block_table=block_table, seq_lens=seq_lens)
    return seq_lens.shape[0], Hq


def check_attention_options(scale, sliding_window, soft_cap) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive float, got {scale!r}")
    if sliding_window is not None and not (isinstance(sliding_window, int) and sliding_window >= 1):
        raise ValueError(
            f"sliding_window must be None or an int >= 1 (tokens seen, the current one included), got {sliding_window!r}"
        )
    if soft_cap is not None and not (isinstance(soft_cap, (int, float)) and math.isfinite(soft_cap) and soft_cap > 0):
        raise ValueError(f"soft_cap must be None or a finite positive float, got {soft_cap!r}")


def check_block_table_on_host(block_table, seq_lens, num_blocks: int, block_size: int) -> None:
    """Only for CPU tensors (no device sync): lengths ≥ 0 that fit the block table, used block ids that exist."""
    if seq_lens.device.type != "cpu" or seq_lens.numel() == 0:
        return
    lens = seq_lens.to(torch.int64)
    if int(lens.min()) < 0:
        raise ValueError(f"seq_lens must be >= 0, got {int(lens.min())}")
    capacity = block_table.shape[1] * block_size
    if int(lens.max()) > capacity:
        b = int(lens.argmax())
        raise ValueError(
            f"block_table is too short: sequence {b} has {int(lens[b])} tokens but {block_table.shape[1]} blocks"
            f" of {block_size} hold {capacity}"
        )
    used = torch.arange(block_table.shape[1])[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    ids = block_table[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"block_table holds block ids outside [0, {num_blocks}) for the cached tokens")


def random_kv_caches(shape, kv_dtype, device, generator):
    """Random caches for tuning: int8 data in [-127, 127] with fp32 scales in [1e-3, 2.1e-2], or N(0, 1) in an fp
    dtype. shape: [num_blocks, block_size, num_kv_heads, head_dim]. Returns (kc, vc, k_scale, v_scale)."""
    if kv_dtype == torch.int8:
        kc, vc = (torch.randint(-127, 128, shape, device=device, generator=generator, dtype=torch.int8)
                  for _ in range(2))
        ks, vs = (torch.rand(shape[:3], device=device, generator=generator) * 0.02 + 1e-3 for _ in range(2))
        return kc, vc, ks, vs
    kc, vc = (torch.randn(shape, device=device, generator=generator).to(kv_dtype) for _ in range(2))
    return kc, vc, None, None


def row_alignment(cache: torch.Tensor) -> int:
    """Elements every cached row start is a multiple of: the largest power of two ≤ 16 bytes dividing the
    data pointer and the block, slot and head strides (16 B for plain caches, 4 B in vLLM's packed layout)."""
    size = cache.element_size()
    align = 16
    for v in (cache.data_ptr(), *(st * size for st in cache.stride()[:3])):
        while align > size and v % align:
            align //= 2
    return max(1, align // size)
