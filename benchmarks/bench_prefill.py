"""Prefill family: causal attention of new prompt tokens over a paged KV cache, Llama-3-8B heads, vs the peers.

32 query heads / 8 KV heads, head 128, block 16, shuffled block tables. Cases (batch, new tokens, cached prefix):
whole prompts (prefix 0; RAG prompts are ~1000 tokens) and a chunked prefill (512 new tokens after a
3584-token prefix, as vLLM's chunked prefill or a prefix-cache hit produce).

Providers, each checked against the fp32 reference (``paged_varlen_attention_ref``) before timing:
- ``sdpa_flash_fp16``  torch SDPA, flash backend, over a contiguous [batch, heads, L, D] fp16 cache, GQA
                       (``enable_gqa``), causal aligned to the bottom right for a chunk: the yardstick of the
                       target (paged prefill within 1.3× of it).
- ``vllm_fp16`` / ``vllm_int8``  vLLM 0.32 ``unified_attention`` (2D path, as its backend launches prefill)
                       over its fp16 / ``int8_per_token_head`` paged caches.
- ``angel_fp16`` / ``angel_int8``  ``angel_kernels.paged_attention`` (int8: vLLM's packed layout).

Floor: causal FLOPs (4 · Hq · D per visible (query, key) pair) at the measured fp16 matmul peak.

Usage: python benchmarks/bench_prefill.py [--out OUT] [--quick] [--dry-run] [--smoke]
"""
from __future__ import annotations

import math
import sys

try:
    from . import harness as H
    from . import bench_attention as A
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import harness as H
    import bench_attention as A

FAMILY = "prefill"
HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK = A.HEADS_Q, A.HEADS_KV, A.HEAD_DIM, A.BLOCK
CASES = ((1, 1024, 0), (4, 1024, 0), (1, 4096, 0), (1, 512, 3584))
QUICK = CASES
SMOKE = ((2, 40, 0), (1, 24, 40))  # tiny, for exercising the wiring on CPU
DEFAULT_BUDGET_S = 90.0


def make_case(batch: int, new: int, prefix: int) -> dict:
    return {"batch": int(batch), "new": int(new), "prefix": int(prefix), "heads_q": HEADS_Q, "heads_kv": HEADS_KV,
            "head_dim": HEAD_DIM, "block": BLOCK}


def case_str(c: dict) -> str:
    return f"B={c['batch']} new={c['new']} prefix={c['prefix']}"


def sort_key(c: dict):
    return (c["prefix"], c["batch"], c["new"])


def build_cases(quick: bool = False, smoke: bool = False) -> list:
    return [make_case(*x) for x in (SMOKE if smoke else QUICK if quick else CASES)]


def visible_pairs(new: int, prefix: int) -> int:
    """(query, key) pairs a causal chunk of ``new`` tokens after ``prefix`` cached ones computes."""
    return new * prefix + new * (new + 1) // 2


def floor_model(c: dict) -> dict:
    b, hq, hkv, d = c["batch"], c["heads_q"], c["heads_kv"], c["head_dim"]
    L = c["new"] + c["prefix"]
    flops = 4 * b * hq * d * visible_pairs(c["new"], c["prefix"])
    qo = 2 * 2 * b * c["new"] * hq * d
    return {"fp16": (2 * b * L * hkv * d * 2 + qo, flops, "fp16"),
            "int8": (2 * b * L * hkv * (d + A.SCALE_BYTES) + qo, flops, "fp16")}


def _dims(c):
    return c["batch"], c["new"], c["prefix"], c["heads_q"], c["heads_kv"], c["head_dim"], c["block"]


def _paged_inputs(c, device):
    """Block table, q [B·new, Hq, D], query_start_loc, seq_lens for a batch of equal sequences."""
    import torch

    b, new, prefix, hq, hkv, d, bs = _dims(c)
    L = new + prefix
    bt, nb = A.shuffled_block_table(b, L, bs, device)
    q = torch.randn(b * new, hq, d, dtype=torch.float16, device=device)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=device) * new
    seq = torch.full((b,), L, dtype=torch.int32, device=device)
    return bt, nb, q, qsl, seq


def _ref(q, kc, vc, bt, seq, qsl, ks, vs, scale):
    from angel_kernels.reference.attention import paged_varlen_attention_ref

    return lambda: paged_varlen_attention_ref(q, kc, vc, bt, seq, qsl, ks, vs, scale=scale).float()


def _fp16_cache(c, device, nb):
    import torch

    b, new, prefix, hq, hkv, d, bs = _dims(c)
    kv = torch.randn(nb, bs, hkv, 2 * d, dtype=torch.float16, device=device)  # per slot/head: K | V (vLLM's layout)
    return kv[..., :d], kv[..., d:]


def _write_random(c, device, bt, write):
    """N(0, 1) K/V for every cached token, through ``write(k16, v16, slots)``."""
    import torch

    b, new, prefix, hq, hkv, d, bs = _dims(c)
    L = new + prefix
    k16 = torch.randn(b * L, hkv, d, dtype=torch.float16, device=device)
    write(k16, torch.randn_like(k16), A.slot_mapping(bt, L, bs))
    H.sync(device)


# ---------------------------------------------------------------------------------------------------------- ours
def available_angel():
    return H.angel_has("paged_attention")


def prepare_angel(c, device, quant: bool, layout: str = "pages"):
    import angel_kernels
    import torch

    b, new, prefix, hq, hkv, d, bs = _dims(c)
    scale = 1.0 / math.sqrt(d)

    def fn(q, kc, vc, bt, seq, qsl, ks, vs):
        return angel_kernels.paged_attention(q, kc, vc, bt, seq, qsl, ks, vs, scale=scale, max_query_len=new)

    def make(i):
        bt, nb, q, qsl, seq = _paged_inputs(c, device)
        if quant and layout == "vllm":
            kv, *_views = A.int8_inline_cache(nb, bs, hkv, d, device)
            kc, vc, ks, vs = angel_kernels.inline_scale_views(kv.transpose(1, 2), d)
        elif quant:
            pages = torch.empty(nb, angel_kernels.int8_page_bytes(bs, hkv, d), dtype=torch.int8, device=device)
            kc, vc, ks, vs = angel_kernels.int8_page_views(pages, bs, hkv, d)
        if quant:
            _write_random(c, device, bt, lambda k, v, s: angel_kernels.write_kv_cache(k, v, kc, vc, s, ks, vs))
        else:
            kc, vc = _fp16_cache(c, device, nb)
            ks = vs = None
        return (q, kc, vc, bt, seq, qsl, ks, vs), _ref(q, kc, vc, bt, seq, qsl, ks, vs, scale)

    sets, ref = H.build_sets(make)
    note = ((("vLLM's packed int8_per_token_head layout" if layout == "vllm" else "int8_page_views layout")
             + ", written by our write kernel") if quant else "")
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="int8" if quant else "fp16", tol=1e-2, note=note)


# ---------------------------------------------------------------------------------------------------------- vLLM
def prepare_vllm(c, device, quant: bool):
    import torch
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    b, new, prefix, hq, hkv, d, bs = _dims(c)
    L = new + prefix
    scale = 1.0 / math.sqrt(d)
    mode = KVQuantMode.INT8_PER_TOKEN_HEAD if quant else KVQuantMode.NONE
    unit = None if quant else torch.ones((), dtype=torch.float32, device=device).expand(b, hkv)

    def fn(q, kc, vc, out, qsl, seq, bt, ks, vs):
        # max_seqlen_q > 1: vLLM launches its 2D kernel (the 3D split path is for decode only)
        unified_attention(
            q=q, k=kc, v=vc, out=out, cu_seqlens_q=qsl, max_seqlen_q=new, seqused_k=seq, max_seqlen_k=L,
            softmax_scale=scale, causal=True, window_size=(-1, -1), block_table=bt, softcap=0, q_descale=None,
            k_descale=unit, v_descale=unit, seq_threshold_3D=0, num_par_softmax_segments=A.NUM_PAR_SOFTMAX_SEGMENTS,
            softmax_segm_output=None, softmax_segm_max=None, softmax_segm_expsum=None,
            kv_quant_mode=mode, k_scale_cache=ks, v_scale_cache=vs,
        )
        return out

    def make(i):
        bt, nb, q, qsl, seq = _paged_inputs(c, device)
        out = torch.empty_like(q)
        if quant:
            from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
                triton_reshape_and_cache_flash_per_token_head_quant as write_kv)

            _kv, kpad, vpad, ks, vs = A.int8_inline_cache(nb, bs, hkv, d, device)
            _write_random(c, device, bt, lambda k, v, s: write_kv(
                k, v, kpad, vpad, ks, vs, s, kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD))
            kc, vc = kpad, vpad
            rk, rv = kpad[..., :d], vpad[..., :d]
        else:
            kc, vc = _fp16_cache(c, device, nb)
            ks = vs = None
            rk, rv = kc, vc
        return (q, kc, vc, out, qsl, seq, bt, ks, vs), _ref(q, rk, rv, bt, seq, qsl, ks, vs, scale)

    sets, ref = H.build_sets(make)
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="int8" if quant else "fp16", tol=1e-2,
                      note="2D path" + ("; KV written by vLLM's per-token-head int8 kernel" if quant else ""))


# ---------------------------------------------------------------------------------------------------------- SDPA
def prepare_sdpa(c, device):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    b, new, prefix, hq, hkv, d, bs = _dims(c)
    L = new + prefix
    scale = 1.0 / math.sqrt(d)

    def fn(q, k, v):
        # causal aligned to the bottom right: query i of the chunk sits at position prefix + i
        mask = causal_lower_right(new, L) if prefix else None
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not prefix, scale=scale,
                                                  enable_gqa=True)

    def make(i):
        q = torch.randn(b, hq, new, d, dtype=torch.float16, device=device)
        k = torch.randn(b, hkv, L, d, dtype=torch.float16, device=device)
        v = torch.randn_like(k)

        def ref():
            g = hq // hkv
            kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
            s = (q.float() @ kk.transpose(-1, -2)) * scale
            visible = torch.arange(L, device=device)[None, :] <= (prefix + torch.arange(new, device=device))[:, None]
            return torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ vv

        return (q, k, v), ref

    sets, ref = H.build_sets(make)
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="fp16", tol=1e-2, note="flash backend, contiguous")


def providers() -> H.ProviderRegistry:
    P = H.Provider
    reg = H.ProviderRegistry(FAMILY)
    reg.add(P("sdpa_flash_fp16", prepare_sdpa, floor_kind="fp16",
              description="torch SDPA flash, contiguous fp16 cache (the yardstick)"))
    reg.add(P("vllm_fp16", lambda c, dev: prepare_vllm(c, dev, False), available=A.available_vllm, floor_kind="fp16",
              description="vLLM 0.32 unified_attention, fp16 paged KV"))
    reg.add(P("vllm_int8", lambda c, dev: prepare_vllm(c, dev, True), available=A.available_vllm, floor_kind="int8",
              description="vLLM 0.32 unified_attention, int8_per_token_head paged KV"))
    reg.add(P("angel_fp16", lambda c, dev: prepare_angel(c, dev, False), available=available_angel,
              floor_kind="fp16", kind="ours", description="angel_kernels.paged_attention, fp16 paged KV"))
    reg.add(P("angel_int8", lambda c, dev: prepare_angel(c, dev, True), available=available_angel,
              floor_kind="int8", kind="ours", description="angel_kernels.paged_attention, int8 KV (int8_page_views)"))
    reg.add(P("angel_int8_vllm_layout", lambda c, dev: prepare_angel(c, dev, True, "vllm"), available=available_angel,
              floor_kind="int8", kind="ours", description="angel_kernels.paged_attention, int8 KV in vLLM's layout"))
    return reg


def family(quick=False, smoke=False) -> H.Family:
    return H.Family(FAMILY, build_cases(quick, smoke), case_str, floor_model, providers(), sort_key=sort_key)


def main(argv=None) -> int:
    return H.run_family_cli(__doc__.splitlines()[0], family, DEFAULT_BUDGET_S, argv)


if __name__ == "__main__":
    sys.exit(main())
