"""Reference paged KV cache: the per-(token, head) int8 quantizer, the cache write and paged attention.

Cache layout (the kernels' and the references' common contract):
- ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``, int8 or fp16/bf16,
  any strides with the head dim contiguous (views over vLLM's packed cache included).
- ``k_scale`` / ``v_scale`` (int8 caches only): fp32 ``[num_blocks, block_size, num_kv_heads]``, any strides.
  Element ``x`` of a cached row is ``q · scale`` with ``scale = max(absmax(row) / 127, KV_SCALE_EPS)`` and
  ``q = clamp(round_half_even(x · (1 / scale)), -127, 127)`` (``quantize_kv_ref``).
- token ``i`` of sequence ``b`` lives in slot ``i % block_size`` of block ``block_table[b, i // block_size]``;
  a write puts token ``t`` in slot ``slot_mapping[t] = block * block_size + offset`` (negative: padding, skipped).
"""
from typing import Optional

import torch

from .quant import INT8_QMAX, SCALE_EPS

# Same guard as the weight quantizer: an all-zero row gets a positive scale and quantizes to exact zeros.
KV_SCALE_EPS = SCALE_EPS


def quantize_kv_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(token, head) symmetric int8: x [..., D] → (q int8 [..., D], scale fp32 [...]), x ≈ q · scale[..., None].

    ``scale = max(RN(absmax / 127), eps)`` and ``inv = RN(1 / scale)`` (correctly rounded fp32 divisions), then
    ``q = round_half_even(x · inv)`` of the exact product (fp64 holds it: 24 × 24 bits at most), clamped to ±127
    (a no-op for finite rows: |x · inv| ≤ 127 (1 + 2^-23)). The product lies within 2^-16 of x / scale, so q is
    the integer nearest x / scale except within 2^-16 of a tie; one multiply per element where a division would
    cost a correctly rounded division (the write kernel: one fused multiply-add). The same values on every device:
    the Triton write kernel reproduces them bit for bit. Non-finite rows give unspecified values.
    """
    xf = x.to(torch.float32)
    absmax = xf.abs().amax(dim=-1)
    # Divisors are tensors on x's device, never Python numbers: on CUDA, torch computes ``tensor / number`` as
    # ``tensor * (1 / number)``, two roundings that differ from absmax / 127 in the last bit for ~4.5 % of rows.
    # Tensor ÷ tensor is IEEE division on CPU and CUDA alike.
    scale = torch.div(absmax, torch.full_like(absmax, INT8_QMAX)).clamp_min(KV_SCALE_EPS)
    inv = torch.div(torch.ones_like(scale), scale)
    q = torch.round(xf.double() * inv.double()[..., None]).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale


def write_kv_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Scatter key/value [T, H_kv, D] into the caches in place (quantizing when the caches are int8).

    Tokens with a negative slot are skipped; slots must be distinct (which of two writes wins is unspecified).
    """
    block_size = key_cache.shape[1]
    slots = slot_mapping.to(torch.int64)
    keep = slots >= 0
    slots = slots[keep]
    blk, off = slots // block_size, slots % block_size
    for src, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        rows = src[keep.to(src.device)]
        if cache.dtype == torch.int8:
            q, s = quantize_kv_ref(rows)
            cache[blk, off] = q
            scale[blk, off] = s
        else:
            cache[blk, off] = rows.to(cache.dtype)


def gather_kv_ref(
    cache: torch.Tensor, scale: Optional[torch.Tensor], block_table_row: torch.Tensor, length: int
) -> torch.Tensor:
    """The first ``length`` tokens of one sequence, dequantized to fp32: [length, H_kv, D].

    Whole blocks are gathered (one ``index_select`` over the block dim) and then cut to ``length``: per-token
    advanced indexing cost ~5 ms for 1100 tokens × 3 heads × 64 on a 2-core CPU, which made the CPU engine's decode
    step take seconds.
    """
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table_row[:num_blocks].to(device=cache.device, dtype=torch.int64)
    rows = cache.index_select(0, blocks).to(torch.float32).flatten(0, 1)[:length]
    if scale is not None:
        rows = rows * scale.index_select(0, blocks).to(torch.float32).flatten(0, 1)[:length, :, None]
    return rows


def paged_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
) -> torch.Tensor:
    """Causal attention of the last ``Q`` tokens of each sequence over its cached context, fp32 math.

    q [B, Q, H_q, D]: query token ``t`` of sequence ``b`` sits at position ``seq_lens[b] - Q + t`` and sees the
    keys at positions ``p <= its own`` (and ``p > its own - sliding_window`` with a window). Query head ``h`` reads
    KV head ``h // (H_q // H_kv)``. Logits are ``scale · q·k``, soft-capped as ``cap · tanh(logit / cap)``.
    A query that sees no key (``seq_lens[b] == 0``) gets zeros. Returns [B, Q, H_q, D] in q.dtype.
    """
    B, Q, Hq, D = q.shape
    Hkv = key_cache.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Q, Hq, D, dtype=torch.float32, device=q.device)
    lens = seq_lens.to("cpu", torch.int64).tolist()
    for b in range(B):
        L = lens[b]
        if L <= 0:
            continue
        k = gather_kv_ref(key_cache, k_scale, block_table[b], L).to(q.device)  # [L, Hkv, D]
        v = gather_kv_ref(value_cache, v_scale, block_table[b], L).to(q.device)
        qf = q[b].to(torch.float32).reshape(Q, Hkv, G, D)
        logits = torch.einsum("thgd,lhd->thgl", qf, k) * scale
        if soft_cap is not None:
            logits = soft_cap * torch.tanh(logits / soft_cap)
        qpos = torch.arange(L - Q, L, device=q.device)[:, None]  # [Q, 1]
        kpos = torch.arange(L, device=q.device)[None, :]  # [1, L]
        visible = kpos <= qpos
        if sliding_window is not None:
            visible &= kpos > qpos - sliding_window
        logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a query that sees nothing: zeros
        out[b] = torch.einsum("thgl,lhd->thgd", p, v).reshape(Q, Hq, D)
    return out.to(q.dtype)


def paged_decode_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
) -> torch.Tensor:
    """One query token per sequence: q [B, H_q, D] (the token at position ``seq_lens[b] - 1``) → [B, H_q, D].

    Keys: the ``seq_lens[b]`` cached tokens of sequence ``b`` (the last ``sliding_window`` of them with a window).
    Caches may also be fp32 (e.g. the unquantized K/V, to measure quantization error).
    """
    out = paged_attention_ref(
        q[:, None], key_cache, value_cache, block_table, seq_lens, scale, k_scale, v_scale,
        sliding_window=sliding_window, soft_cap=soft_cap,
    )
    return out[:, 0]


def paged_varlen_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *,
    scale: float,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
) -> torch.Tensor:
    """Variable-length queries (prefill, chunked prefill, prefix-cached prefill and decode mixed), fp32 math.

    q [T, H_q, D]: sequence ``b`` owns rows ``query_start_loc[b] : query_start_loc[b + 1]`` (``Q_b`` tokens), the
    last ``Q_b`` positions of its ``seq_lens[b]`` cached tokens (its new tokens are already in the cache).
    Same masking and conventions as ``paged_attention_ref``. Returns [T, H_q, D] in q.dtype.
    """
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    starts = query_start_loc.to("cpu", torch.int64).tolist()
    for b in range(len(starts) - 1):
        lo, hi = starts[b], starts[b + 1]
        if hi <= lo:
            continue
        out[lo:hi] = paged_attention_ref(
            q[None, lo:hi], key_cache, value_cache, block_table[b : b + 1], seq_lens[b : b + 1], scale,
            k_scale, v_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        )[0]
    return out
