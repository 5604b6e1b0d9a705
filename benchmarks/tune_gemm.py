"""Tune the w8a16 or w4a16 Triton kernel on this GPU and write the config table the package ships.

For every (shape, M bucket): time each config of ``tuning_space`` (after a correctness check and, with
``--invariant``, a bitwise batch-invariance check against the M=1 config), keep the fastest, and print a table
of the best time next to cuBLAS fp16 on the same shape. Writes ``OUT/<gpu-slug>.json`` in the tuned-config
format (copy it to angel_kernels/tuning/configs/ to ship it).

Timings are CUDA-graph medians over input sets rotated past L2 (``angel_kernels.tuning.timing``, the benchmark
harness's method), for the tuned configs and for cuBLAS alike: comparable with the harness's rows.

Usage: python benchmarks/tune_gemm.py --kernel w8a16|w4a16 --out OUT [--shapes 8b.qkv,...] [--m 1,16,...]
       [--group 128] [--invariant] [--space full|focus] [--tile-major]
"""
import argparse
import logging
import time

import torch

from angel_kernels.gemm import w4a16, w8a16
from angel_kernels.tuning import M_BUCKETS, TunedConfigStore, gpu_slug, l2_bytes, rotation_count, time_calls

try:
    from .bench_gemm import SHAPES
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from bench_gemm import SHAPES


# Batch tiles that led a run on the H100 (M = 128-512, 28672×4096 and 4096×14336; benchmarks/NOTES.md):
# (token tile, weight tile, warps, stages, DOT_T)
FOCUS_TILES = {(128, 128, 4, 2, 1), (128, 128, 4, 3, 1), (128, 128, 4, 4, 1), (128, 128, 8, 3, 0), (128, 256, 8, 3, 0),
               (256, 128, 8, 3, 0), (256, 128, 8, 2, 1), (64, 128, 4, 3, 1), (64, 128, 8, 3, 0)}


def focus_space(configs):
    """The configs with a FOCUS_TILES shape (both SERIAL choices where K is split); spaces without 64-token
    tiles (M ≤ 32) whole."""
    def shape(c):
        return c.BLOCK_M, c.BLOCK_N, c.num_warps, c.num_stages, dict(c.extra).get("DOT_T", 0)

    batch = [c for c in configs if c.BLOCK_M >= 64]
    return [c for c in batch if shape(c) in FOCUS_TILES] if batch else configs


def cublas_us(n, k, m):
    """cuBLAS fp16 x [m, k] · w [n, k]ᵀ, timed like the tuned kernels (rotating sets: 4 of 33.6 MB at 4096×4096)."""
    sets_needed = rotation_count(2 * (m * k + n * k), l2_bytes(torch.device("cuda")))
    sets = [(torch.randn(m, k, device="cuda", dtype=torch.float16),
             torch.randn(n, k, device="cuda", dtype=torch.float16)) for _ in range(sets_needed)]
    return time_calls([lambda x=x, w=w: x @ w.t() for x, w in sets]).median_us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernel", choices=("w8a16", "w4a16"), default="w8a16")
    ap.add_argument("--group", type=int, default=128, help="w4a16 group size (symmetric weights)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--m", default=",".join(str(b) for b in M_BUCKETS if b != 2048))
    ap.add_argument("--invariant", action="store_true", help="admit only configs batch-invariant with M=1")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--space", choices=("full", "focus"), default="full",
                    help="focus: batch tiles around earlier leaders (FOCUS_TILES)")
    ap.add_argument("--tile-major", action="store_true", help="w8a16: time tile-major weights (tile_major_int8)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # each config's time, and why one did not compete
    W = w8a16 if args.kernel == "w8a16" else w4a16
    if args.tile_major and args.kernel != "w8a16":
        ap.error("--tile-major is a w8a16 layout")
    extra = {"tile_major": args.tile_major} if args.kernel == "w8a16" else {"group_size": args.group, "sym": True}

    def space_size(m, n, k):
        if args.kernel == "w8a16":
            space = W.tuning_space(W.W8A16Problem(m, n, k, torch.float16, dev))
        else:
            space = W.tuning_space(W.W4A16Problem(m, n, k, args.group, torch.float16, dev))
        return len(focus_space(space) if args.space == "focus" else space)

    store = TunedConfigStore(args.out)
    dev = torch.device("cuda")
    t0 = time.time()
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        # --invariant without M=1 in the list: rows are checked against the shipped (or default) M=1 config
        if args.kernel == "w8a16":
            m1_cfg = W.config_for(W.W8A16Problem(1, n, k, torch.float16, dev))
        else:
            m1_cfg = W.config_for(W.W4A16Problem(1, n, k, args.group, torch.float16, dev))
        for m in (int(v) for v in args.m.split(",")):
            if time.time() - t0 > args.budget_s:
                print(f"budget reached before {name} M={m}")
                break
            inv = m1_cfg if (args.invariant and m > 1) else None
            try:
                best, timings = W.tune(n, k, m, device=dev, store=store, invariant_with=inv,
                                       space=focus_space if args.space == "focus" else None, **extra)
            except RuntimeError as e:
                print(f"{name} M={m}: {e}")
                rows.append((name, m, None, None, space_size(m, n, k), 0))
                continue
            if m == 1:
                m1_cfg = best
            ref = cublas_us(n, k, m)
            n_space = space_size(m, n, k)
            rows.append((name, m, timings[best], ref, n_space, len(timings)))
            print(f"{name} M={m}: {timings[best]:.1f} us (cuBLAS fp16 {ref:.1f}) "
                  f"best={best.as_dict()} admitted {len(timings)}/{n_space}  [{time.time() - t0:.0f} s]", flush=True)
    path = store.save(dev)
    print(f"wrote {path}")
    print(f"\n| shape | M | {args.kernel} tuned µs | cuBLAS fp16 µs | speed-up | configs admitted |\n|---|---|---|---|---|---|")
    for name, m, us, ref, n_space, ok in rows:
        if us is None:
            print(f"| {name} | {m} | none admitted | | | 0/{n_space} |")
        else:
            print(f"| {name} | {m} | {us:.1f} | {ref:.1f} | {ref / us:.2f}x | {ok}/{n_space} |")
    print(f"device {torch.cuda.get_device_name()} slug {gpu_slug(dev)}")


if __name__ == "__main__":
    main()
