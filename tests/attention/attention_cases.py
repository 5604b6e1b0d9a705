"""Builders shared by the attention tests: paged caches with shuffled block tables, vLLM's packed int8 layout."""
import torch

from angel_kernels.attention import inline_scale_views
from angel_kernels.reference.attention import write_kv_cache_ref
from angel_kernels.testing import make_generator, poison, randn

# vLLM's per-token-head cache pads each head's content with one fp32 scale (4 int8 elements)
SCALE_PAD = 4


def cdiv(a, b):
    return -(-a // b)


def shuffled_block_table(lens, block_size, generator, *, spare_blocks=2, extra_cols=1):
    """int32 [B, max_blocks] using every block at most once, in random order, + num_blocks.

    Columns past a sequence's last block hold an id far outside the cache: the kernels must never read them.
    """
    need = [cdiv(int(n), block_size) for n in lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=generator)
    cols = max(max(need), 1) + extra_cols
    table = torch.full((len(lens), cols), num_blocks + 10_000, dtype=torch.int32)
    start = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[start : start + n].to(torch.int32)
        start += n
    return table, num_blocks


def slot_mapping_for(table, lens, block_size):
    """int64 slots of every token of every sequence, sequences concatenated."""
    out = []
    for b, n in enumerate(lens):
        pos = torch.arange(int(n))
        out.append(table[b].to(torch.int64)[pos // block_size] * block_size + pos % block_size)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def empty_caches(num_blocks, block_size, heads_kv, head_dim, cache_dtype, device="cpu"):
    """Poisoned caches (+ NaN scales for int8): anything read that was never written shows up."""
    kc = poison(torch.empty(num_blocks, block_size, heads_kv, head_dim, dtype=cache_dtype, device=device))
    vc = poison(torch.empty_like(kc))
    if cache_dtype == torch.int8:
        ks = poison(torch.empty(num_blocks, block_size, heads_kv, dtype=torch.float32, device=device))
        vs = poison(torch.empty_like(ks))
        return kc, vc, ks, vs
    return kc, vc, None, None


def build_case(lens, *, heads_q=4, heads_kv=2, head_dim=64, block_size=16, cache_dtype=torch.int8,
               dtype=torch.float16, seed=0, device="cpu", zero_tokens=(), kv_scale=1.0):
    """A batch of sequences whose K/V (random, ``zero_tokens`` all zero) sit in shuffled, poisoned caches.

    Returns a dict with q [B, H_q, D], caches, scales, block_table, seq_lens (on ``device``) and the unquantized
    per-sequence key/value rows.
    """
    g = make_generator(seed)
    lens = [int(n) for n in lens]
    table, num_blocks = shuffled_block_table(lens, block_size, g)
    total = sum(lens)
    key = randn(total, heads_kv, head_dim, dtype=dtype, generator=g, scale=kv_scale)
    value = randn(total, heads_kv, head_dim, dtype=dtype, generator=g, scale=kv_scale)
    for i in zero_tokens:
        key[i] = 0
        value[i] = 0
    kc, vc, ks, vs = empty_caches(num_blocks, block_size, heads_kv, head_dim, cache_dtype)
    write_kv_cache_ref(key, value, kc, vc, slot_mapping_for(table, lens, block_size), ks, vs)
    q = randn(len(lens), heads_q, head_dim, dtype=dtype, generator=g)
    mv = (lambda t: None if t is None else t.to(device))
    return dict(
        q=q.to(device), key_cache=kc.to(device), value_cache=vc.to(device), k_scale=mv(ks), v_scale=mv(vs),
        block_table=table.to(device), seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        key=key, value=value, scale=head_dim ** -0.5,
    )


def vllm_packed_int8_cache(num_blocks, block_size, heads_kv, head_dim, *, physical="NHD", device="cpu"):
    """vLLM 0.32's int8_per_token_head tensor for one layer and its four views, built as its backend does.

    The raw allocation is ``[num_blocks, block_size, heads, C]`` (NHD) or ``[num_blocks, heads, block_size, C]``
    (HND) int8 with ``C = 2 · (head_dim + 4)``; the attention layer sees it logically as
    ``[num_blocks, heads, block_size, C]``. Scale views: ``torch.as_strided`` over the storage reinterpreted as
    fp32, strides (block, slot, head) in fp32 units, offset ``head_dim`` (K) or ``head_dim + 4 + head_dim`` (V)
    bytes into the row (``TritonAttentionImpl._ensure_scale_caches``); data views: the two halves of the
    content dim, minus the scale bytes.
    """
    padded = head_dim + SCALE_PAD
    C = 2 * padded
    if physical == "NHD":
        raw = torch.empty(num_blocks, block_size, heads_kv, C, dtype=torch.int8, device=device)
        kv_cache = raw.permute(0, 2, 1, 3)
    elif physical == "HND":
        raw = torch.empty(num_blocks, heads_kv, block_size, C, dtype=torch.int8, device=device)
        kv_cache = raw
    else:
        raise ValueError(physical)
    poison(raw)
    base_f32 = torch.tensor([], dtype=torch.float32, device=device).set_(kv_cache.untyped_storage())
    sb, sh, ss, _ = kv_cache.stride()
    assert all(x % 4 == 0 for x in (sb, sh, ss, head_dim, kv_cache.storage_offset()))
    off = kv_cache.storage_offset() // 4

    def scale_view(byte_offset):
        return torch.as_strided(base_f32, size=(num_blocks, block_size, heads_kv),
                                stride=(sb // 4, ss // 4, sh // 4), storage_offset=off + byte_offset // 4)

    k_scale = scale_view(head_dim)
    v_scale = scale_view(padded + head_dim)
    key_half, value_half = kv_cache.transpose(1, 2).split(padded, dim=-1)
    return raw, kv_cache, key_half[..., :head_dim], value_half[..., :head_dim], k_scale, v_scale


def with_vllm_packed_cache(c, lens, device="cpu"):
    """``c`` (a build_case int8 case of sequences ``lens``) with its K/V rewritten by the reference writer into
    vLLM's packed int8_per_token_head cache (NHD), read through ``inline_scale_views`` (8- and 4-byte aligned
    rows)."""
    num_blocks, block_size, heads_kv, head_dim = c["key_cache"].shape
    _raw, kv_cache, *_ = vllm_packed_int8_cache(num_blocks, block_size, heads_kv, head_dim, device=device)
    kc, vc, ks, vs = inline_scale_views(kv_cache, head_dim)
    slots = slot_mapping_for(c["block_table"].cpu(), lens, block_size).to(device)
    write_kv_cache_ref(c["key"].to(device), c["value"].to(device), kc, vc, slots, ks, vs)
    return dict(c, key_cache=kc, value_cache=vc, k_scale=ks, v_scale=vs)


def shipped_configs(kernel):
    """pytest params (key, config) of every entry for ``kernel`` in the shipped per-GPU config tables."""
    import json

    import pytest

    from angel_kernels.tuning import KernelConfig
    from angel_kernels.tuning.store import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.json")):
        for key, entry in json.loads(path.read_text())["kernels"].get(kernel, {}).items():
            yield pytest.param(key, KernelConfig.from_dict(entry), id=f"{path.stem}:{key}")
