"""Probe of the fragment-major batch-tile kernels (``_fragment_gemm_tma_kernel``: x through TMA, several
warpgroups of 64 weight rows sharing it; ``_fragment_gemm_piped_kernel``: the same with the MMAs left in flight)
against the decode-tile kernel (bits) and cuBLAS fp16 / the shipped op (CUDA-graph times over L2-rotating inputs).

    python benchmarks/probe_fragment_batch.py --m 128,256,512,1024 [--configs "2,128,3,0;4,128,3,0;p2,256,4,0,3"]

A config is "warpgroups,token tile,x stages,overlap[,ahead[,serial]]" for the batch tiles,
"p<warpgroups>,<token tile>,<x halves>,<register cap (0: none)>,<word stages>" for the piped tiles,
"s<token tile>,<x stages>,<warpgroups>" for the streamed tiles (persistent, warp-specialized; split weights run
serially), "w<token tile>,<x stages>,<consumer registers>" for the paired tiles (split weights: two warp-specialized
warpgroups on one tile, even and odd split ranges, and a TMA loader warp), "q<token tile>,<x stages>,<parts>
[,<consumer registers>]" for the parts tiles (2 or 4 warpgroups on one tile, split ranges round-robin), or
"d<ahead>[,<programs per SM>[,<token tile>[,<split count>[,<PDL mode + 1>[,<sum kernel>[,<pair>[,<register
cap>]]]]]]]" for the decode tiles
with that many K-blocks of weight words in flight (and that split rule: split K until a launch has that many programs
per SM; that token tile instead of the op's; that split count, forced; that programmatic-dependent-launch mode, 1-3
for modes 0-2; the partials summed by the last program of each tile (0), by the split sum kernel launched in the
split kernel's mode (1) or in mode m (m + 2); two K-blocks per wgmma group (pair 1, on PAIR_STAGES x stages); a
register cap per thread; 0 keeps the op's, except the sum: the decode-tile reference column sums in the last
program).
"""
import argparse
import sys

import torch
import triton

from angel_kernels import w4a16_fragment_gemm, w8a16_fragment_gemm
from angel_kernels.gemm._fragment_gluon import (
    launch, launch_paired, launch_parts, launch_piped, launch_streamed, launch_tma,
)
from angel_kernels.gemm._splitk import DEFAULT_SMS, plan_split, split_k_for
from angel_kernels.runtime import num_sms
from angel_kernels.gemm.fragment import (
    PAIR_STAGES, TILE_K, TILE_N, block_m_for, blocks_ahead, decode_pdl_mode, fragment_major_int4,
    fragment_major_int8,
)
from angel_kernels.quantization.int4 import pack_int4_rows
from angel_kernels.tuning import l2_bytes, rotation_count, time_calls


def run(x, words, scales, n, int4, cfg=None):
    """cfg None: the decode-tile kernel at the op's token tile; else (warpgroups, block_m, stages, overlap[, ahead[,
    serial]]): serial runs a split weight's ranges in one program per tile."""
    M, K = x.shape
    y = torch.empty(M, n, dtype=x.dtype, device=x.device)
    if cfg is None:
        bm = block_m_for(M, n, K)
        tiles = n // TILE_N * triton.cdiv(M, bm)
        plan = plan_split(x.device, "w4a16_fragment", M, n, K, TILE_K, tiles, y, serial=False)
        launch(x, words, scales, None, y, plan, bm, int4, ahead=blocks_ahead(bm))
        return y
    if cfg[0] == "d":  # decode tiles: ("d", ahead[, programs per SM[, token tile[, split count[, PDL mode + 1]]]]),
        # 0: the op's
        bm = cfg[3] if len(cfg) > 3 and cfg[3] else block_m_for(M, n, K)
        tiles = n // TILE_N * triton.cdiv(M, bm)
        per_sm = cfg[2] if len(cfg) > 2 else 0
        split = split_k_for(n, K, TILE_K, num_sms(x.device, DEFAULT_SMS), per_sm) if per_sm else None
        if len(cfg) > 4 and cfg[4]:  # a forced split count (past the split rule's floor of K per range)
            split = cfg[4]
        plan = plan_split(x.device, "w4a16_fragment", M, n, K, TILE_K, tiles, y, split_k=split, serial=False)
        pdl = cfg[5] - 1 if len(cfg) > 5 and cfg[5] else decode_pdl_mode(M, int4, plan.k_per_split // TILE_K)
        how = cfg[6] if len(cfg) > 6 else 0
        pair = len(cfg) > 7 and bool(cfg[7])
        launch(x, words, scales, None, y, plan, bm, int4, ahead=cfg[1], pdl=pdl, sum_kernel=how > 0,
               sum_pdl=how - 2 if how > 1 else None, pair=pair, max_regs=cfg[8] if len(cfg) > 8 else 0,
               **({"stages": PAIR_STAGES} if pair else {}))
        return y
    if cfg[0] == "w":  # paired tiles: ("w", block_m, x stages, consumer registers)
        _s, bm, stages, regs = cfg
        plan = plan_split(x.device, "w4a16_fragment", M, n, K, TILE_K, 0, y, serial=True)
        launch_paired(x, words, scales, None, y, plan, bm, int4, stages, regs)
        return y
    if cfg[0] == "q":  # parts tiles: ("q", block_m, x stages, parts[, consumer registers])
        bm, stages, parts = cfg[1:4]
        plan = plan_split(x.device, "w4a16_fragment", M, n, K, TILE_K, 0, y, serial=True)
        launch_parts(x, words, scales, None, y, plan, bm, int4, stages, parts, *cfg[4:5])
        return y
    if cfg[0] == "s":  # streamed tiles: ("s", block_m, x stages, warpgroups)
        _s, bm, stages, wg = cfg
        plan = plan_split(x.device, "w4a16_fragment", M, n, K, TILE_K, 0, y, serial=True)
        launch_streamed(x, words, scales, None, y, plan, bm, int4, stages, wg)
        return y
    if cfg[0] == "p":  # piped tiles: ("p", warpgroups, block_m, x halves in flight, register cap, word stages)
        _s, wg, bm, hs, regs, ws = cfg
        tiles = n // (TILE_N * wg) * triton.cdiv(M, bm)
        plan = plan_split(x.device, "w4a16_fragment", M, n, K, TILE_K, tiles, y, serial=True)
        launch_piped(x, words, scales, None, y, plan, bm, int4, hs, wg, regs, ws)
        return y
    wg, bm, stages, overlap = cfg[:4]
    ahead = cfg[4] if len(cfg) > 4 else 2
    serial = bool(cfg[5]) if len(cfg) > 5 else False
    tiles = n // (TILE_N * wg) * triton.cdiv(M, bm)
    plan = plan_split(x.device, "w4a16_fragment", M, n, K, TILE_K, tiles, y, serial=serial)
    launch_tma(x, words, scales, None, y, plan, bm, int4, stages, wg, ahead, bool(overlap))
    return y


def _fits(cfg, n: int) -> bool:
    """Whether N rows fill a config's program tiles (batch and piped tiles: 64 rows per warpgroup; the decode,
    paired and parts tiles take any multiple of 64)."""
    if cfg[0] in ("d", "w", "q"):
        return True
    if cfg[0] == "s":
        return n % (64 * cfg[3]) == 0
    return n % (64 * cfg[1 if cfg[0] == "p" else 0]) == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336,28672x8192,8192x28672")
    ap.add_argument("--m", default="128,256,512,1024")
    ap.add_argument("--configs", default="2,128,3,0;2,128,3,1;4,128,3,0;4,64,3,0;2,64,3,0")
    ap.add_argument("--widths", default="8,4")
    ap.add_argument("--bits-only", action="store_true")
    ap.add_argument("--no-decode-tile", action="store_true", help="do not time the decode tiles")
    args = ap.parse_args(argv)
    configs = [(c[0],) + tuple(int(v) for v in c[1:].split(",")) if c[0] in "pdwsq" else
               tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]  # see run()
    dev = torch.device("cuda")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for width in (int(w) for w in args.widths.split(",")):
            int4 = width == 4
            for m in (int(v) for v in args.m.split(",")):
                gen = torch.Generator(device=dev).manual_seed(m + n + k)

                def make_set(dtype=torch.float16):
                    x = torch.randn(m, k, device=dev, generator=gen).to(dtype)
                    if int4:
                        nib = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32, generator=gen)
                        s = (torch.rand(k // 128, n, device=dev, generator=gen) * 0.01 + 1e-3).to(dtype)
                        return x, fragment_major_int4(pack_int4_rows(nib.t().contiguous())), s
                    q = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen)
                    s = torch.rand(n, device=dev, generator=gen) * 0.01 + 1e-3
                    return x, fragment_major_int8(q), s

                sets = [make_set()]
                ref = run(*sets[0], n, int4)
                row, failed = [], set()
                for cfg in configs:
                    if not _fits(cfg, n):
                        continue
                    try:
                        y = run(*sets[0], n, int4, cfg)
                        torch.cuda.synchronize()
                    except Exception as e:  # report, go on
                        row.append(f"{cfg} failed: {type(e).__name__}: {str(e)[:300]}")
                        failed.add(cfg)
                        continue
                    ok = torch.equal(y, ref) and not torch.isnan(y).any().item()
                    diff = (y.float() - ref.float()).abs().max().item()
                    row.append(f"{cfg} {'same bits' if ok else f'OTHER BITS {diff:.2e}'}")
                if not args.bits_only:
                    set_bytes = sum(t.numel() * t.element_size() for t in sets[0])
                    sets += [make_set() for _ in range(1, rotation_count(set_bytes, l2_bytes(dev)))]
                    # one fp16 weight per set, as bench_gemm's cuBLAS row (one weight for every set stays in L2
                    # where it fits: the probe's cuBLAS took 8.1-8.3 µs at 4096×4096 M = 64, bench_gemm's 12.1)
                    w16s = [torch.randn(n, k, device=dev, dtype=torch.float16) for _ in sets]
                    op = w4a16_fragment_gemm if int4 else w8a16_fragment_gemm
                    linear = torch.nn.functional.linear
                    t = {"cublas": time_calls([lambda a=a, w=w: linear(a[0], w) for a, w in zip(sets, w16s)]).median_us,
                         "op": time_calls([lambda a=a: op(*a) for a in sets]).median_us}
                    if not args.no_decode_tile:
                        t["decode_tile"] = time_calls([lambda a=a: run(*a, n, int4) for a in sets]).median_us
                    for cfg in configs:
                        if not _fits(cfg, n) or cfg in failed:
                            continue
                        t[str(cfg)] = time_calls([lambda a=a, c=cfg: run(*a, n, int4, c) for a in sets]).median_us
                    row.append(" ".join(f"{key} {v:.1f}" for key, v in t.items()))
                print(f"w{width}a16 {n}x{k} M={m}: " + " | ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
