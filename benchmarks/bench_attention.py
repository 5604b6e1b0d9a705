"""Attention family: paged decode attention, one query token per sequence, Llama-3-8B heads, against the peers.

32 query heads / 8 KV heads, head 128, block 16, (batch, context) from ANCHORS.md; shuffled block tables (a
sequence's blocks are scattered over the cache as after real allocation churn).

Peers, each checked against an fp32 attention over the (dequantized) cache before timing:
- ``vllm_fp16``    vLLM 0.32 ``unified_attention`` (Triton; 3D split-softmax path up to 128 // 8 = 16 sequences,
                   2D beyond, as vLLM's backend launches it) over vLLM's fp16 cache layout: per (block, slot, head)
                   K then V, views ``[num_blocks, block, heads_kv, head]``.
- ``vllm_int8``    the same kernel with ``int8_per_token_head`` KV: int8 data with one fp32 scale per (token, head)
                   stored inline after each head's data, written by vLLM's own
                   ``triton_reshape_and_cache_flash_per_token_head_quant``. Also records its error against the
                   unquantized fp16 K/V (``extra_rel_err.vs_fp16_kv``).
- ``sdpa_dense_fp16``  torch ``scaled_dot_product_attention`` (flash) over a contiguous [batch, heads_kv, context,
                   head] fp16 cache, the 4 query heads of a KV head as 4 query rows: a reference point, not a peer
                   that serves paged caches.
vLLM's kernels come from ``.peers/vllm`` (``benchmarks/stage_peers.sh``); the GPU machine has no vLLM.

Floors: KV bytes (fp16, or int8 + the fp32 scales) + q + out over the measured copy bandwidth.

Usage: python benchmarks/bench_attention.py [--out OUT] [--quick] [--dry-run] [--smoke]
"""
from __future__ import annotations

import math
import sys

try:
    from . import harness as H
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import harness as H

FAMILY = "attention"
HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-3-8B, vLLM's default block size
# (batch, context) rows of ANCHORS.md
CASES = ((1, 1024), (1, 4096), (1, 32768), (8, 4096), (8, 32768), (32, 4096), (32, 16384), (64, 16384))
QUICK = ((1, 4096), (1, 32768), (8, 4096), (64, 16384))
SMOKE = ((2, 40), (3, 72))  # tiny, for exercising the wiring on CPU (contexts not multiples of 16 on purpose)
DEFAULT_BUDGET_S = 90.0
# vLLM's triton_attn backend: 3D (split-softmax) decode for up to MIN_LAUNCH_GRID_SIZE_2D // heads_kv sequences,
# NUM_PAR_SOFTMAX_SEGMENTS segments per sequence.
MIN_LAUNCH_GRID_SIZE_2D = 128
NUM_PAR_SOFTMAX_SEGMENTS = 16
SCALE_BYTES = 4  # one fp32 scale per (token, head), for K and for V


def make_case(batch: int, context: int) -> dict:
    return {"batch": int(batch), "context": int(context), "heads_q": HEADS_Q, "heads_kv": HEADS_KV,
            "head_dim": HEAD_DIM, "block": BLOCK}


def case_str(c: dict) -> str:
    return f"B={c['batch']} ctx={c['context']}"


def sort_key(c: dict):
    return (c["batch"], c["context"])


def build_cases(quick: bool = False, smoke: bool = False) -> list:
    return [make_case(b, l) for b, l in (SMOKE if smoke else QUICK if quick else CASES)]


def floor_model(c: dict) -> dict:
    """{kind: (bytes, flops, compute)}: the whole KV once (+ scales for int8), q and out; 4·B·Hq·L·D FLOPs."""
    b, l, hq, hkv, d = c["batch"], c["context"], c["heads_q"], c["heads_kv"], c["head_dim"]
    qo = 2 * (2 * b * hq * d)
    flops = 4 * b * hq * l * d
    return {
        "kv16": (2 * b * l * hkv * d * 2 + qo, flops, "fp16"),
        "kv8": (2 * b * l * hkv * (d + SCALE_BYTES) + qo, flops, "fp16"),
    }


# ------------------------------------------------------------------------------------------------------------------
# Paged cache helpers and the fp32 reference (pure torch; the tests run them on CPU)
# ------------------------------------------------------------------------------------------------------------------
def shuffled_block_table(batch: int, context: int, block: int, device, generator=None):
    """int32 [batch, ceil(context / block)]: every block of the cache used once, in random order."""
    import torch

    nblk = -(-context // block)
    perm = torch.randperm(batch * nblk, device="cpu", generator=generator)
    return perm.view(batch, nblk).to(device=device, dtype=torch.int32), batch * nblk


def slot_mapping(block_table, context: int, block: int):
    """int64 [batch · context]: the cache slot (block · block_size + offset) of token t of sequence b."""
    import torch

    t = torch.arange(context, device=block_table.device)
    slots = block_table.long()[:, t // block] * block + (t % block)
    return slots.reshape(-1)


def _attend(qb, k, v, scale: float):
    """One sequence: qb [Hq, D], k/v [L, Hkv, D] → [Hq, D], fp32, grouped-query (Hq / Hkv query heads per KV head)."""
    import torch

    hq, d = qb.shape
    hkv = k.shape[1]
    qg = qb.float().reshape(hkv, hq // hkv, d)
    s = torch.einsum("hgd,lhd->hgl", qg, k.float()) * scale
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hgl,lhd->hgd", p, v.float()).reshape(hq, d)


def paged_attention_ref(q, load_kv, block_table, seq_lens, scale: float, block: int):
    """fp32 decode attention over a paged cache. load_kv(block ids) -> (K, V) [n·block, Hkv, D] (dequantized)."""
    import torch

    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        blocks = block_table[b, : -(-n // block)].long()
        k, v = load_kv(blocks)
        out[b] = _attend(q[b], k[:n], v[:n], scale)
    return out


def dense_attention_ref(q, k, v, scale: float):
    """fp32 decode attention over dense caches k/v [B, L, Hkv, D] (any strides)."""
    import torch

    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        out[b] = _attend(q[b], k[b], v[b], scale)
    return out


def fp16_loader(k_cache, v_cache):
    def load(blocks):
        d = k_cache.shape[-1]
        return k_cache[blocks].reshape(-1, k_cache.shape[2], d), v_cache[blocks].reshape(-1, v_cache.shape[2], d)

    return load


def int8_loader(k_cache, v_cache, k_scale, v_scale, head_dim: int):
    """Dequantize per (token, head): int8 [.., D] · fp32 scale. The caches may be wider than head_dim (inline
    scales): only the first head_dim elements are data."""
    def load(blocks):
        hkv = k_cache.shape[2]
        k = k_cache[blocks][..., :head_dim].float() * k_scale[blocks][..., None]
        v = v_cache[blocks][..., :head_dim].float() * v_scale[blocks][..., None]
        return k.reshape(-1, hkv, head_dim), v.reshape(-1, hkv, head_dim)

    return load


def int8_inline_cache(num_blocks: int, block: int, heads_kv: int, head_dim: int, device):
    """vLLM 0.32's ``int8_per_token_head`` layout: per (block, slot, head) [K int8 (D) | K scale fp32 |
    V int8 (D) | V scale fp32]. Returns (storage, key view, value view, k_scale view, v_scale view); the key/value
    views are D + 4 wide, as vLLM's backend passes them (the kernels read the first D)."""
    import torch

    if head_dim % SCALE_BYTES:
        raise ValueError("head_dim must be a multiple of 4 for inline fp32 scales")
    p = head_dim + SCALE_BYTES
    kv = torch.empty(num_blocks, block, heads_kv, 2 * p, dtype=torch.int8, device=device)
    kvf = kv.view(torch.float32)  # [num_blocks, block, heads_kv, 2p / 4]
    return kv, kv[..., :p], kv[..., p:], kvf[..., head_dim // 4], kvf[..., (p + head_dim) // 4]


# ------------------------------------------------------------------------------------------------------------------
# vLLM peers
# ------------------------------------------------------------------------------------------------------------------
def available_vllm():
    try:
        from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (  # noqa: F401
            triton_reshape_and_cache_flash_per_token_head_quant)
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention  # noqa: F401
        from vllm.v1.kv_cache_interface import KVQuantMode  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, (f"vLLM's Triton attention not importable ({H.short_exc(e)}); "
                       "stage it with benchmarks/stage_peers.sh")
    return True, ""


def _dims(c):
    return c["batch"], c["context"], c["heads_q"], c["heads_kv"], c["head_dim"], c["block"]


def _vllm_fn(c, device, quant: bool):
    """The timed call: vLLM's decode launch with the 3D-path scratch its backend allocates."""
    import torch
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    b, l, hq, hkv, d, bs = _dims(c)
    threshold = MIN_LAUNCH_GRID_SIZE_2D // hkv
    rows = max(b, threshold)
    dpad = 1 << (d - 1).bit_length()
    segm_out = torch.empty(rows, hq, NUM_PAR_SOFTMAX_SEGMENTS, dpad, dtype=torch.float32, device=device)
    segm_max = torch.empty(rows, hq, NUM_PAR_SOFTMAX_SEGMENTS, dtype=torch.float32, device=device)
    segm_sum = torch.empty(rows, hq, NUM_PAR_SOFTMAX_SEGMENTS, dtype=torch.float32, device=device)
    mode = KVQuantMode.INT8_PER_TOKEN_HEAD if quant else KVQuantMode.NONE
    # fp16 path: vLLM passes the layer's (unit) k/v scales expanded to [num_seqs, heads_kv]; int8 path: None.
    unit = None if quant else torch.ones((), dtype=torch.float32, device=device).expand(b, hkv)
    scale = 1.0 / math.sqrt(d)

    def fn(q, k, v, out, cu_seqlens_q, seq_lens, block_table, k_scale, v_scale):
        unified_attention(
            q=q, k=k, v=v, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=1, seqused_k=seq_lens,
            max_seqlen_k=l, softmax_scale=scale, causal=True, window_size=(-1, -1), block_table=block_table,
            softcap=0, q_descale=None, k_descale=unit, v_descale=unit,
            seq_threshold_3D=threshold, num_par_softmax_segments=NUM_PAR_SOFTMAX_SEGMENTS,
            softmax_segm_output=segm_out, softmax_segm_max=segm_max, softmax_segm_expsum=segm_sum,
            kv_quant_mode=mode, k_scale_cache=k_scale, v_scale_cache=v_scale,
        )
        return out

    path = "3D split-softmax" if b <= threshold else "2D"
    return fn, scale, path


def _common_inputs(c, device):
    import torch

    b, l, hq, hkv, d, bs = _dims(c)
    bt, nb = shuffled_block_table(b, l, bs, device)
    q = torch.randn(b, hq, d, dtype=torch.float16, device=device)
    out = torch.empty(b, hq, d, dtype=torch.float16, device=device)
    cu = torch.arange(b + 1, dtype=torch.int32, device=device)
    seq = torch.full((b,), l, dtype=torch.int32, device=device)
    return bt, nb, q, out, cu, seq


def prepare_vllm_fp16(c, device):
    import torch

    b, l, hq, hkv, d, bs = _dims(c)
    fn, scale, path = _vllm_fn(c, device, quant=False)

    def make(i):
        bt, nb, q, out, cu, seq = _common_inputs(c, device)
        kv = torch.randn(nb, bs, hkv, 2 * d, dtype=torch.float16, device=device)  # per slot/head: K | V
        kc, vc = kv[..., :d], kv[..., d:]
        return (q, kc, vc, out, cu, seq, bt, None, None), (
            lambda: paged_attention_ref(q, fp16_loader(kc, vc), bt, seq.tolist(), scale, bs))

    sets, ref = H.build_sets(make)
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="kv16", tol=1e-2, note=path)


def fill_int8_cache(c, device, block_table, q, scale, keep, write):
    """Fill a paged int8 cache with N(0, 1) K/V through ``write(k16, v16, slots)``, a chunk of sequences at a time
    (≤ 64 Mi fp16 elements of K per call). ``keep`` (a dict, for the first input set only) receives
    ``vs_fp16``: the fp32 attention over the unquantized K/V, so the int8 path's error against it is recorded."""
    import torch

    b, l, hq, hkv, d, bs = _dims(c)
    chunk = max(1, (1 << 26) // (l * hkv * d))
    slots = slot_mapping(block_table, l, bs)
    if keep is not None:
        k_all = torch.empty(b, l, hkv, d, dtype=torch.float16, device=device)
        v_all = torch.empty_like(k_all)
        keep["vs_fp16"] = lambda: dense_attention_ref(q, k_all, v_all, scale)
    for s0 in range(0, b, chunk):
        n = min(chunk, b - s0)
        if keep is not None:
            k16, v16 = k_all[s0:s0 + n].view(n * l, hkv, d), v_all[s0:s0 + n].view(n * l, hkv, d)
        else:
            k16 = torch.empty(n * l, hkv, d, dtype=torch.float16, device=device)
            v16 = torch.empty_like(k16)
        k16.normal_()
        v16.normal_()
        write(k16, v16, slots[s0 * l:(s0 + n) * l])
    H.sync(device)


def prepare_vllm_int8(c, device):
    import torch
    from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
        triton_reshape_and_cache_flash_per_token_head_quant as write_kv)
    from vllm.v1.kv_cache_interface import KVQuantMode

    b, l, hq, hkv, d, bs = _dims(c)
    fn, scale, path = _vllm_fn(c, device, quant=True)

    def make(i):
        bt, nb, q, out, cu, seq = _common_inputs(c, device)
        _kv, kc, vc, ks, vs = int8_inline_cache(nb, bs, hkv, d, device)
        fill_int8_cache(c, device, bt, q, scale, state if i == 0 else None,
                        lambda k16, v16, slots: write_kv(k16, v16, kc, vc, ks, vs, slots,
                                                         kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD))
        ref = (lambda: paged_attention_ref(q, int8_loader(kc, vc, ks, vs, d), bt, seq.tolist(), scale, bs))
        return (q, kc, vc, out, cu, seq, bt, ks, vs), ref

    state = {}
    sets, ref = H.build_sets(make)
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="kv8", tol=1e-2,
                      note=f"{path}; KV written by vLLM's per-token-head int8 kernel",
                      extra_refs={"vs_fp16_kv": state["vs_fp16"]})


# ------------------------------------------------------------------------------------------------------------------
# torch SDPA over a dense cache (reference point)
# ------------------------------------------------------------------------------------------------------------------
def _sdpa_fn(hq, hkv, d, flash: bool):
    import torch.nn.functional as F

    scale = 1.0 / math.sqrt(d)

    def call(q, k, v):
        # q [B, Hq, D] → [B, Hkv, Hq/Hkv, D]: a KV head's query heads as query rows (exact GQA decode).
        qg = q.view(q.shape[0], hkv, hq // hkv, d)
        return F.scaled_dot_product_attention(qg, k, v, scale=scale).reshape(q.shape[0], hq, d)

    if not flash:
        return call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return call(q, k, v)

    return call_flash


def prepare_sdpa(c, device):
    import torch

    b, l, hq, hkv, d, bs = _dims(c)
    scale = 1.0 / math.sqrt(d)

    def make(i):
        q = torch.randn(b, hq, d, dtype=torch.float16, device=device)
        k = torch.randn(b, hkv, l, d, dtype=torch.float16, device=device)
        v = torch.randn(b, hkv, l, d, dtype=torch.float16, device=device)
        return (q, k, v), (lambda: dense_attention_ref(q, k.transpose(1, 2), v.transpose(1, 2), scale))

    sets, ref = H.build_sets(make)
    note = "flash backend"
    fn = _sdpa_fn(hq, hkv, d, flash=True)
    try:
        fn(*sets[0])
        H.sync(device)
    except Exception as e:  # noqa: BLE001 - no flash kernel for this device/dtype: let torch choose
        fn = _sdpa_fn(hq, hkv, d, flash=False)
        note = f"default backend (flash refused: {H.short_exc(e)[:120]})"
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="kv16", tol=1e-2, note=note)


# ------------------------------------------------------------------------------------------------------------------
# Ours: angel_kernels attention ops get their providers here once the package provides them (lazy import, hasattr).
# ------------------------------------------------------------------------------------------------------------------
def available_angel():
    return H.angel_has("paged_decode_attention", "write_kv_cache", "inline_scale_views")


def _angel_fn(c):
    import angel_kernels

    scale = 1.0 / math.sqrt(c["head_dim"])

    def fn(q, kc, vc, block_table, seq_lens, k_scale, v_scale):
        return angel_kernels.paged_decode_attention(q, kc, vc, block_table, seq_lens, k_scale, v_scale, scale=scale)

    return fn, scale


def prepare_angel_fp16(c, device):
    import torch

    b, l, hq, hkv, d, bs = _dims(c)
    fn, scale = _angel_fn(c)

    def make(i):
        bt, nb, q, _out, _cu, seq = _common_inputs(c, device)
        kv = torch.randn(nb, bs, hkv, 2 * d, dtype=torch.float16, device=device)  # the same layout as vllm_fp16
        kc, vc = kv[..., :d], kv[..., d:]
        return (q, kc, vc, bt, seq, None, None), (
            lambda: paged_attention_ref(q, fp16_loader(kc, vc), bt, seq.tolist(), scale, bs))

    sets, ref = H.build_sets(make)
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="kv16", tol=1e-2)


def prepare_angel_int8(c, device, layout: str = "pages"):
    """Our int8 page layout (``int8_page_views``, what the plugin allocates), or vLLM 0.32's packed
    int8_per_token_head cache (inline scales, ``layout="vllm"``); filled by our write kernel."""
    import angel_kernels
    import torch

    b, l, hq, hkv, d, bs = _dims(c)
    fn, scale = _angel_fn(c)

    def make(i):
        bt, nb, q, _out, _cu, seq = _common_inputs(c, device)
        if layout == "vllm":
            kv, _k, _v, _ks, _vs = int8_inline_cache(nb, bs, hkv, d, device)
            kc, vc, ks, vs = angel_kernels.inline_scale_views(kv.transpose(1, 2), d)
        else:
            pages = torch.empty(nb, angel_kernels.int8_page_bytes(bs, hkv, d), dtype=torch.int8, device=device)
            kc, vc, ks, vs = angel_kernels.int8_page_views(pages, bs, hkv, d)
        fill_int8_cache(c, device, bt, q, scale, state if i == 0 else None,
                        lambda k16, v16, slots: angel_kernels.write_kv_cache(k16, v16, kc, vc, slots, ks, vs))
        ref = (lambda: paged_attention_ref(q, int8_loader(kc, vc, ks, vs, d), bt, seq.tolist(), scale, bs))
        return (q, kc, vc, bt, seq, ks, vs), ref

    state = {}
    sets, ref = H.build_sets(make)
    note = ("vLLM's packed int8_per_token_head layout" if layout == "vllm" else "int8_page_views layout") + \
        ", written by our write kernel"
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="kv8", tol=1e-2, note=note,
                      extra_refs={"vs_fp16_kv": state["vs_fp16"]})



def providers() -> H.ProviderRegistry:
    P = H.Provider
    reg = H.ProviderRegistry(FAMILY)
    reg.add(P("vllm_fp16", prepare_vllm_fp16, available=available_vllm, floor_kind="kv16",
              description="vLLM 0.32 unified_attention, fp16 KV"))
    reg.add(P("vllm_int8", prepare_vllm_int8, available=available_vllm, floor_kind="kv8",
              description="vLLM 0.32 unified_attention, int8_per_token_head KV"))
    reg.add(P("sdpa_dense_fp16", prepare_sdpa, floor_kind="kv16",
              description="torch SDPA (flash), contiguous fp16 cache (reference point)"))
    reg.add(P("angel_fp16", prepare_angel_fp16, available=available_angel, floor_kind="kv16", kind="ours",
              description="angel_kernels.paged_decode_attention, fp16 KV"))
    reg.add(P("angel_int8", prepare_angel_int8, available=available_angel, floor_kind="kv8", kind="ours",
              description="angel_kernels.paged_decode_attention, int8 KV (int8_page_views layout)"))
    reg.add(P("angel_int8_vllm_layout", lambda c, dev: prepare_angel_int8(c, dev, "vllm"), available=available_angel,
              floor_kind="kv8", kind="ours",
              description="angel_kernels.paged_decode_attention, int8 KV in vLLM's packed layout"))
    return reg


def family(quick=False, smoke=False) -> H.Family:
    return H.Family(FAMILY, build_cases(quick, smoke), case_str, floor_model, providers(), sort_key=sort_key)


def main(argv=None) -> int:
    return H.run_family_cli(__doc__.splitlines()[0], family, DEFAULT_BUDGET_S, argv)


if __name__ == "__main__":
    sys.exit(main())
