"""How close the int8 paged decode can get to its floor at a given grid: the whole call (split + reduce kernels),
the split kernel alone (the reduce kernel not launched), the call with the reduce step varied (its launch mode, its
warps, the partials' dtype: ``REDUCE_VARIANTS``), and a read-only walk of the same cache pages with the same
grid (one program per (sequence, KV head, 256-token split), block ids through the block table, K and V rows as
16-byte word loads, the scales; nothing computed but a checksum), with 1, 2 or 4 of its 32-token tiles of loads in
flight per warp, and on 4-warp programs with 128-token tiles. CUDA-graph medians over L2-rotating inputs
(``bench_attention``'s int8 page layout, Llama-3-8B heads, block 16); the floor is the bench's. ``--variants``
also times the call with the card's config changed (its ``extra`` entries, or ``num_warps`` / ``num_stages``),
e.g. other split lengths: ``MIN_SPLIT_TILES=6,PROGRAMS_PER_SM=11`` (other splits: other bits, so the largest
difference from the shipped config's output is printed).

    python benchmarks/probe_decode_ceiling.py [--cases 8x4096,1x32768] [--variants "A=1,B=2;A=2"] [--layout vllm]
"""
import argparse
import functools
import sys
from unittest import mock

import torch
import triton
import triton.language as tl

import bench_attention as A
import harness as H


@triton.jit
def _read_pages_kernel(kc, vc, ks, vs, bt, out, num_kv_heads,
                       stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                       stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh, stride_btb,
                       TILES: tl.constexpr, UNROLL: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                       D: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // num_kv_heads).to(tl.int64)
    h = pid % num_kv_heads
    acc = tl.zeros((BLOCK_N, D // 4), tl.int32)
    sacc = tl.zeros((BLOCK_N,), tl.float32)
    row = bt + b * stride_btb
    words = tl.arange(0, D // 4)
    for t0 in range(split * TILES, split * TILES + TILES, UNROLL):
        for u in tl.static_range(UNROLL):  # UNROLL tiles' loads issued before any is used
            tok = (t0 + u) * BLOCK_N + tl.arange(0, BLOCK_N)
            blk = tl.load(row + tok // PAGE).to(tl.int64)
            slot = tok % PAGE
            kp = (kc + blk * stride_kcb + slot * stride_kcs + h * stride_kch).to(tl.pointer_type(tl.int32))
            vp = (vc + blk * stride_vcb + slot * stride_vcs + h * stride_vch).to(tl.pointer_type(tl.int32))
            k = tl.load(tl.multiple_of(kp, 16)[:, None] + words[None, :])
            v = tl.load(tl.multiple_of(vp, 16)[:, None] + words[None, :])
            acc = acc ^ (k + v)
            sacc += tl.load(ks + blk * stride_ksb + slot * stride_kss + h * stride_ksh)
            sacc += tl.load(vs + blk * stride_vsb + slot * stride_vss + h * stride_vsh)
    tl.store(out + pid * tl.num_programs(1) + split, tl.sum(tl.sum(acc, axis=1).to(tl.float32) + sacc, axis=0))


def read_pages(q, kc, vc, bt, lens, ks, vs, out, split_tokens=256, block_n=32, warps=1, unroll=1):
    """The read-only walk over full contexts (every sequence as long as the block table)."""
    hkv = kc.shape[2]
    context = kc.shape[1] * bt.shape[1]
    _read_pages_kernel[(bt.shape[0] * hkv, context // split_tokens)](
        kc, vc, ks, vs, bt, out, hkv,
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2), bt.stride(0),
        TILES=split_tokens // block_n, UNROLL=unroll, BLOCK_N=block_n, PAGE=kc.shape[1], D=kc.shape[3],
        num_warps=warps)
    return out


# name → module attributes of paged_decode set for the call; "pdl" replaces pdl_modes' answer for every grid
REDUCE_VARIANTS = {
    "reduce dependent": {"pdl": (0, True)},
    "split mode 2 + reduce dependent": {"pdl": (2, True)},
    "reduce 1 warp": {"REDUCE_WARPS": 1},
    "reduce 2 warps": {"REDUCE_WARPS": 2},
    "reduce 4 warps": {"REDUCE_WARPS": 4},
    "fp32 partials": {"PARTIAL_DTYPE": torch.float32},
    "split mode 2 + reduce dependent, fp32 partials": {"PARTIAL_DTYPE": torch.float32, "pdl": (2, True)},
}


def _patched(module, **attrs):
    """paged_decode with ``attrs`` set (``pdl``: pdl_modes answers it) for the duration."""
    if "pdl" in attrs:
        modes = attrs.pop("pdl")
        attrs["pdl_modes"] = lambda *a, **k: modes
    return mock.patch.multiple(module, **attrs)


def parse_variants(spec: str) -> list[dict]:
    """"A=1,B=2;A=2" → [{"A": 1, "B": 2}, {"A": 2}]."""
    return [{k: int(v) for k, v in (kv.split("=") for kv in part.split(","))} for part in spec.split(";") if part]


def with_changes(cfg, changes: dict):
    """``cfg`` with ``num_warps`` / ``num_stages`` / ``extra`` entries replaced (an entry of 0 is dropped)."""
    import dataclasses

    top = {k: v for k, v in changes.items() if k in ("num_warps", "num_stages")}
    extra = dict(cfg.extra)
    extra.update({k: v for k, v in changes.items() if k not in top})
    return dataclasses.replace(cfg, **top, extra=tuple(sorted((k, v) for k, v in extra.items() if v)))


class _NoLaunch:
    """Stands in for the reduce kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1x1024,8x4096,1x32768,32x4096")
    ap.add_argument("--variants", default="", help='config changes to time, e.g. "MIN_SPLIT_TILES=6;num_stages=3"')
    ap.add_argument("--calls-only", action="store_true", help="time the call and the variants only")
    ap.add_argument("--layout", choices=("pages", "vllm"), default="pages",
                    help="the int8 cache: our pages or vLLM's packed rows (the read walk assumes pages)")
    args = ap.parse_args(argv)
    if args.layout == "vllm" and not args.calls_only:
        ap.error("--layout vllm needs --calls-only (the read walk loads 16-byte words: pages only)")
    from angel_kernels.attention import paged_decode
    from angel_kernels.tuning import time_calls

    device = torch.device("cuda")
    floors = H.measure_floors(log=lambda s: None)
    for case in args.cases.split(","):
        batch, context = (int(v) for v in case.split("x"))
        c = A.make_case(batch, context)
        prep = A.prepare_angel_int8(c, device, layout=args.layout)
        sets = prep.input_sets
        floor = floors.floor_us(*A.floor_model(c)["kv8"])
        times = {"call": time_calls([functools.partial(prep.fn, *a) for a in sets]).median_us}
        ref = prep.fn(*sets[0]).float()
        shipped = paged_decode.config_for
        for changes in parse_variants(args.variants):
            name = ",".join(f"{k}={v}" for k, v in changes.items())
            with mock.patch.object(paged_decode, "config_for", lambda p, c=changes: with_changes(shipped(p), c)):
                times[name] = time_calls([functools.partial(prep.fn, *a) for a in sets]).median_us
                diff = (prep.fn(*sets[0]).float() - ref).abs().max().item()
            print(f"  {name}: largest difference from the call's output {diff:.2e}", flush=True)
        if args.calls_only:
            print(f"B={batch} ctx={context} (int8 floor {floor:.1f} µs): "
                  + ", ".join(f"{k} {v:.1f} ({100 * floor / v:.0f} %)" for k, v in times.items()), flush=True)
            continue
        with _patched(paged_decode, _paged_attn_reduce_kernel=_NoLaunch()):
            times["split kernel"] = time_calls([functools.partial(prep.fn, *a) for a in sets]).median_us
        for name, attrs in REDUCE_VARIANTS.items():
            with _patched(paged_decode, **attrs):
                times[name] = time_calls([functools.partial(prep.fn, *a) for a in sets]).median_us
                diff = (prep.fn(*sets[0]).float() - ref).abs().max().item()
            if diff:
                print(f"  {name}: largest difference from the call's output {diff:.2e}", flush=True)
        outs = [torch.empty(batch * c["heads_kv"] * (context // 256), device=device) for _ in sets]
        walks = {f"read, {u} tile(s) in flight": dict(unroll=u) for u in (1, 2, 4)}
        walks["read, 4 warps × 128 tokens"] = dict(block_n=128, warps=4)
        for name, kw in walks.items():
            calls = [functools.partial(read_pages, *a, out=o, **kw) for a, o in zip(sets, outs)]
            times[name] = time_calls(calls).median_us
        print(f"B={batch} ctx={context} (int8 floor {floor:.1f} µs): "
              + ", ".join(f"{k} {v:.1f} ({100 * floor / v:.0f} %)" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
