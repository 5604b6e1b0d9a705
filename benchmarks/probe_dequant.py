"""The dequantization pass of the fragment ops (M >= LARGE_M_FRAGMENT on split weights, above LARGE_M_BATCH on
unsplit ones: fragment-major words → W [N, K] in fp16, then cuBLAS) against its floor, per (K-tiles per program,
warps) config, with cuBLAS fp16 at the given token counts for scale. CUDA-graph medians over L2-rotating inputs;
the floor is the words, scales and W's bytes at the harness's copy bandwidth; every config's bits are checked
against the shipped one's.

    python benchmarks/probe_dequant.py [--tiles "1,4;2,4;4,8"] [--shapes 4096x14336] [--m 1024,4096]
"""
import argparse
import sys

import torch

import harness as H
from angel_kernels.gemm import fragment as F
from angel_kernels.tuning import l2_bytes, rotation_count, time_calls

LLAMA = "6144x4096,4096x4096,28672x4096,4096x14336,28672x8192,8192x28672"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", default="1,4;1,8;2,4;2,8;4,4;4,8;8,8")
    ap.add_argument("--shapes", default=LLAMA)
    ap.add_argument("--m", default="1024,4096")
    args = ap.parse_args(argv)
    configs = [tuple(int(v) for v in c.split(",")) for c in args.tiles.split(";")]
    floors = H.measure_floors(log=lambda s: None)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for int4 in (False, True):
            words_per_row = k // 8 if int4 else k // 4
            in_bytes = n * k // (2 if int4 else 1) + (n * k // 64 if int4 else n * 4)
            sets = rotation_count(in_bytes + 2 * n * k, l2_bytes())
            data = []
            for _ in range(sets):
                w = torch.randint(-2**31, 2**31 - 1, (n, words_per_row), dtype=torch.int32, device=dev, generator=g)
                s = (torch.rand((k // 128, n) if int4 else (n,), device=dev, generator=g) * 0.01 + 1e-3)
                data.append((w, s.half() if int4 else s))
            fn = F.dequantize_fragment if int4 else F.dequantize_fragment_int8
            want = fn(*data[0], torch.float16, None)
            floor = floors.floor_us(in_bytes + 2 * n * k, 0, "fp16")
            parts = []
            for cfg in configs:
                if not torch.equal(fn(*data[0], torch.float16, cfg), want):
                    raise AssertionError(f"{shape} int{4 if int4 else 8} {cfg}: other bits than the shipped pass")
                us = time_calls([lambda d=d, c=cfg: fn(*d, torch.float16, c) for d in data]).median_us
                parts.append(f"{cfg[0]}x{cfg[1]}w {us:.1f} ({100 * floor / us:.0f} %)")
            print(f"{shape} int{4 if int4 else 8} (floor {floor:.1f} µs, {sets} sets): " + ", ".join(parts), flush=True)
        w16 = [torch.randn(n, k, device=dev, dtype=torch.float16) for _ in range(rotation_count(2 * n * k, l2_bytes()))]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            us = time_calls([lambda w=w: x @ w.t() for w in w16]).median_us
            print(f"{shape} cuBLAS fp16 M={m}: {us:.1f} µs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
