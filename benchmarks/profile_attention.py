"""Run one paged-attention case a few times, for a profiler (ncu / nsys) to look at.

    ncu -k regex:_paged_attn_split --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        python benchmarks/profile_attention.py --kernel decode --kv int8 --batch 64 --context 16384

Llama-3-8B heads (32 query / 8 KV, head 128), block 16, shuffled block tables, fp16 queries; int8 caches use
vLLM's packed layout with inline scales (vLLM's own int8 cache), or with ``--layout pages`` the plugin's
``int8_page_views`` pages, filled by our write kernel.
"""
import argparse
import math

import torch

import angel_kernels

HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK = 32, 8, 128, 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", choices=("decode", "prefill"), default="decode")
    ap.add_argument("--kv", choices=("int8", "fp16"), default="int8")
    ap.add_argument("--layout", choices=("packed", "pages"), default="packed", help="int8 caches")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--new", type=int, default=1024, help="prefill: new tokens per sequence (the context's tail)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    B, L, D = args.batch, args.context, HEAD_DIM
    blocks = -(-L // BLOCK)
    table = torch.randperm(B * blocks, device=dev).reshape(B, blocks).to(torch.int32)
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    pos = torch.arange(L, device=dev)
    slots = (table.long()[:, pos // BLOCK] * BLOCK + pos % BLOCK).reshape(-1)
    if args.kv == "int8" and args.layout == "pages":
        pages = torch.empty(B * blocks, angel_kernels.int8_page_bytes(BLOCK, HEADS_KV, D), dtype=torch.int8, device=dev)
        kc, vc, ks, vs = angel_kernels.int8_page_views(pages, BLOCK, HEADS_KV, D)
    elif args.kv == "int8":
        raw = torch.empty(B * blocks, BLOCK, HEADS_KV, 2 * (D + 4), dtype=torch.int8, device=dev)
        kc, vc, ks, vs = angel_kernels.inline_scale_views(raw.transpose(1, 2), D)
    else:
        kv = torch.empty(B * blocks, BLOCK, HEADS_KV, 2 * D, dtype=torch.float16, device=dev)
        kc, vc, ks, vs = kv[..., :D], kv[..., D:], None, None
    chunk = max(1, (1 << 26) // (L * HEADS_KV * D))
    for b0 in range(0, B, chunk):  # N(0, 1) K/V, written in chunks of sequences
        s = slots[b0 * L:(b0 + chunk) * L]
        k16 = torch.randn(s.numel(), HEADS_KV, D, dtype=torch.float16, device=dev)
        angel_kernels.write_kv_cache(k16, torch.randn_like(k16), kc, vc, s, ks, vs)
    scale = 1.0 / math.sqrt(D)
    if args.kernel == "decode":
        q = torch.randn(B, HEADS_Q, D, dtype=torch.float16, device=dev)
        run = lambda: angel_kernels.paged_decode_attention(q, kc, vc, table, lens, ks, vs, scale=scale)  # noqa: E731
    else:
        q = torch.randn(B * args.new, HEADS_Q, D, dtype=torch.float16, device=dev)
        qsl = torch.arange(B + 1, dtype=torch.int32, device=dev) * args.new
        run = lambda: angel_kernels.paged_attention(q, kc, vc, table, lens, qsl, ks, vs, scale=scale,  # noqa: E731
                                                    max_query_len=args.new)
    for _ in range(args.repeat):
        run()
    torch.cuda.synchronize()
    print(f"{args.kernel} kv={args.kv} B={B} L={L}: ran {args.repeat}x")


if __name__ == "__main__":
    main()
