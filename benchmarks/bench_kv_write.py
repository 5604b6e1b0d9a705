"""KV write family: scatter T new tokens' K and V into a paged cache (int8 per-token-head or fp16), vs vLLM.

Llama-3-8B KV heads (8 × 128), block 16, slots of a shuffled block table. Cases: T = 64 (a decode step at batch
64), 512, 4096 and 16384 (prefill chunks).

Providers, each checked against the unquantized K/V (the written rows read back, dequantized) before timing:
- ``vllm_int8``  vLLM 0.32 ``triton_reshape_and_cache_flash_per_token_head_quant`` into its packed layout.
- ``vllm_fp16``  vLLM 0.32 ``triton_reshape_and_cache_flash`` (``kv_cache_dtype="auto"``).
- ``angel_int8`` ``angel_kernels.write_kv_cache`` into ``int8_page_views`` pages (the plugin's layout).
- ``angel_int8_vllm_layout`` the same into vLLM's packed layout.
- ``angel_fp16`` ``write_kv_cache`` into an fp16 cache (a copy).

Floor: read K and V (fp16), write them (int8 + one fp32 scale per token and head, or fp16) and the int64 slots,
at the measured copy bandwidth.

Usage: python benchmarks/bench_kv_write.py [--out OUT] [--quick] [--dry-run] [--smoke]
"""
from __future__ import annotations

import sys

try:
    from . import harness as H
    from . import bench_attention as A
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import harness as H
    import bench_attention as A

FAMILY = "kv_write"
HEADS_KV, HEAD_DIM, BLOCK = A.HEADS_KV, A.HEAD_DIM, A.BLOCK
CASES = (64, 512, 4096, 16384)
QUICK = (64, 4096)
SMOKE = (5, 40)
DEFAULT_BUDGET_S = 60.0


def make_case(tokens: int) -> dict:
    return {"tokens": int(tokens), "heads_kv": HEADS_KV, "head_dim": HEAD_DIM, "block": BLOCK}


def case_str(c: dict) -> str:
    return f"T={c['tokens']}"


def build_cases(quick: bool = False, smoke: bool = False) -> list:
    return [make_case(t) for t in (SMOKE if smoke else QUICK if quick else CASES)]


def floor_model(c: dict) -> dict:
    elems = c["tokens"] * c["heads_kv"] * c["head_dim"]
    read = 2 * elems * 2 + 8 * c["tokens"]
    return {"fp16": (read + 2 * elems * 2, 0, "fp16"),
            "int8": (read + 2 * elems + 2 * c["tokens"] * c["heads_kv"] * A.SCALE_BYTES, 0, "fp16")}


def _inputs(c, device):
    """key/value [T, H, D] fp16, int64 slots (one token per slot, blocks in random order), num_blocks."""
    import torch

    t, h, d, bs = c["tokens"], c["heads_kv"], c["head_dim"], c["block"]
    nb = -(-t // bs) + 1
    slots = (torch.randperm(nb, device=device)[:, None] * bs + torch.arange(bs, device=device)).reshape(-1)[:t]
    key = torch.randn(t, h, d, dtype=torch.float16, device=device)
    return key, torch.randn_like(key), slots.to(torch.int64), nb


def _readback(kc, vc, ks, vs, slots):
    """The written rows, dequantized to fp32, K and V stacked: [2, T, H, D]."""
    import torch

    bs = kc.shape[1]
    blk, off = slots // bs, slots % bs
    rows = []
    for cache, scale in ((kc, ks), (vc, vs)):
        x = cache[blk, off].float()
        rows.append(x * scale[blk, off][..., None] if scale is not None else x)
    return torch.stack(rows)


def prepare(c, device, who: str, quant: bool, layout: str = "pages"):
    import torch

    import angel_kernels

    h, d, bs = c["heads_kv"], c["head_dim"], c["block"]

    def make(i):
        key, value, slots, nb = _inputs(c, device)
        if quant and layout == "vllm":
            _kv, kpad, vpad, ks, vs = A.int8_inline_cache(nb, bs, h, d, device)
            kc, vc = kpad[..., :d], vpad[..., :d]
        elif quant:
            pages = torch.empty(nb, angel_kernels.int8_page_bytes(bs, h, d), dtype=torch.int8, device=device)
            kc, vc, ks, vs = angel_kernels.int8_page_views(pages, bs, h, d)
        else:
            kv = torch.empty(nb, bs, h, 2 * d, dtype=torch.float16, device=device)
            kc, vc, ks, vs = kv[..., :d], kv[..., d:], None, None
        if who == "vllm":
            args = (key, value, kpad if quant else kc, vpad if quant else vc, ks, vs, slots)
        else:
            args = (key, value, kc, vc, ks, vs, slots)
        views = (kc, vc, ks, vs)
        return args + (views,), (lambda: torch.stack([key.float(), value.float()]))

    if who == "vllm":
        from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
            triton_reshape_and_cache_flash, triton_reshape_and_cache_flash_per_token_head_quant)
        from vllm.v1.kv_cache_interface import KVQuantMode

        one = torch.ones((), dtype=torch.float32, device=device)

        def fn(key, value, kc, vc, ks, vs, slots, views):
            if quant:
                triton_reshape_and_cache_flash_per_token_head_quant(
                    key, value, kc, vc, ks, vs, slots, kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD)
            else:
                triton_reshape_and_cache_flash(key, value, kc, vc, slots, "auto", one, one)
            return views
    else:
        def fn(key, value, kc, vc, ks, vs, slots, views):
            angel_kernels.write_kv_cache(key, value, kc, vc, slots, ks, vs)
            return views

    sets, ref = H.build_sets(make)
    slots0 = sets[0][6]
    note = {("vllm", True): "vLLM's packed layout", ("angel", True): f"{layout} layout"}.get((who, quant), "")
    return H.Prepared(fn=fn, input_sets=sets, ref=ref, floor_kind="int8" if quant else "fp16",
                      post=lambda views: _readback(*views, slots0), tol=1.2e-2 if quant else 1e-3, note=note)


def available_angel():
    return H.angel_has("int8_page_views")


def providers() -> H.ProviderRegistry:
    P = H.Provider
    reg = H.ProviderRegistry(FAMILY)
    reg.add(P("vllm_fp16", lambda c, dev: prepare(c, dev, "vllm", False), available=A.available_vllm,
              floor_kind="fp16", description="vLLM 0.32 triton_reshape_and_cache_flash, fp16 cache"))
    reg.add(P("vllm_int8", lambda c, dev: prepare(c, dev, "vllm", True, "vllm"), available=A.available_vllm,
              floor_kind="int8", description="vLLM 0.32 per-token-head int8 write, packed layout"))
    reg.add(P("angel_fp16", lambda c, dev: prepare(c, dev, "angel", False), available=available_angel,
              floor_kind="fp16", kind="ours", description="angel_kernels.write_kv_cache, fp16 cache"))
    reg.add(P("angel_int8", lambda c, dev: prepare(c, dev, "angel", True), available=available_angel,
              floor_kind="int8", kind="ours", description="angel_kernels.write_kv_cache, int8 pages"))
    reg.add(P("angel_int8_vllm_layout", lambda c, dev: prepare(c, dev, "angel", True, "vllm"),
              available=available_angel, floor_kind="int8", kind="ours",
              description="angel_kernels.write_kv_cache, int8 in vLLM's packed layout"))
    return reg


def family(quick=False, smoke=False) -> H.Family:
    return H.Family(FAMILY, build_cases(quick, smoke), case_str, floor_model, providers(),
                    sort_key=lambda c: c["tokens"])


def main(argv=None) -> int:
    return H.run_family_cli(__doc__.splitlines()[0], family, DEFAULT_BUDGET_S, argv)


if __name__ == "__main__":
    sys.exit(main())
