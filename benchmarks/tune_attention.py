"""Tune the paged attention kernels (decode and varlen prefill) on this GPU and write the config table.

For each kernel and KV dtype (int8, fp16) at Llama-3-8B heads (32 query / 8 KV, head 128, block 16): time the
configs (CUDA-graph medians, ``angel_kernels.tuning.timing``) on the kernel's tuning cases, each checked against
the heuristic config's output, and print the heuristic's time next to the five fastest. Writes
``OUT/<gpu-slug>.json`` in the tuned-config format (merge into angel_kernels/tuning/configs/ to ship it).

Usage: python benchmarks/tune_attention.py --out OUT [--kernels decode,prefill] [--kv int8,fp16] [--small]
"""
import argparse
import time

import torch

from angel_kernels.attention import paged_decode, paged_prefill
from angel_kernels.tuning import TunedConfigStore, gpu_slug

HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK = 32, 8, 128, 16


def small_decode_space(p):
    """The decode space's 4/8-warp, 256-token-split, 2-4-stage slice (36 of ~200 configs): a short GPU session."""
    return [c for c in paged_decode.tuning_space(p)
            if c.num_warps in (4, 8) and dict(c.extra)["MIN_SPLIT_TILES"] * c.BLOCK_N == 256 and c.num_stages > 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernels", default="decode,prefill")
    ap.add_argument("--kv", default="int8,fp16")
    ap.add_argument("--small", action="store_true", help="a slice of the decode space (short sessions)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    store = TunedConfigStore(args.out)
    for kernel in args.kernels.split(","):
        mod = paged_decode if kernel == "decode" else paged_prefill
        for kv in args.kv.split(","):
            kv_dtype = torch.int8 if kv == "int8" else torch.float16
            t0 = time.time()
            if kernel == "decode":
                p = paged_decode.PagedDecodeProblem(HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK, torch.float16, kv_dtype, dev)
                configs = small_decode_space(p) if args.small else paged_decode.tuning_space(p)
                configs = [paged_decode.heuristic_config(p)] + [c for c in configs
                                                                if c != paged_decode.heuristic_config(p)]
                best, timings = paged_decode.tune(HEADS_Q, HEADS_KV, HEAD_DIM, block_size=BLOCK, kv_dtype=kv_dtype,
                                                  store=store, configs=configs)
            else:
                p = paged_prefill.PagedPrefillProblem(HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK, torch.float16, kv_dtype,
                                                      dev)
                configs = [paged_prefill.heuristic_config(p)] + [c for c in paged_prefill.tuning_space(p)
                                                                 if c != paged_prefill.heuristic_config(p)]
                best, timings = paged_prefill.tune(HEADS_Q, HEADS_KV, HEAD_DIM, block_size=BLOCK, kv_dtype=kv_dtype,
                                                   store=store, configs=configs)
            heur = mod.heuristic_config(p)
            print(f"\n## {kernel} kv={kv} {p.key()}: {len(timings)}/{len(configs)} configs timed in"
                  f" {time.time() - t0:.0f} s; heuristic {timings.get(heur, float('nan')):.1f} µs")
            for cfg, us in sorted(timings.items(), key=lambda kv_: kv_[1])[:5]:
                print(f"  {us:9.1f} µs  {cfg.as_dict()}")
            store.save(dev)
    print(f"\nwrote {args.out}/{gpu_slug(dev)}.json")


if __name__ == "__main__":
    main()
