"""Probe of the fragment-major weight-only kernel (``angel_kernels.gemm.fragment``) at forced token tiles, for
int4 (``w4a16_fragment_gemm``'s kernel) and int8 (the same kernel's int8 mode, not wired to an op): bits against
the Triton kernels (``w4a16_gemm`` / ``w8a16_gemm`` on tile-major weights) and CUDA-graph times next to them and
cuBLAS fp16, over the Llama shapes. The layout and the kernel are described in ``fragment``'s module doc.

    python benchmarks/probe_gluon_decode.py            # GPU: bits against w8a16_gemm / w4a16_gemm, then times
    python benchmarks/probe_gluon_decode.py --compile  # any machine: sm_90a registers and shared memory
"""
import argparse
import sys

import torch
import triton

from angel_kernels.gemm._fragment_gluon import _fragment_gemm_kernel, launch
from angel_kernels.gemm.fragment import TILE_K, TILE_N, fragment_major_int4, fragment_major_int8


def probe_decode(x, words, scales, n, split_k, int4, block_m=16, stages=3, wg=1, ahead=2, split=None):
    """y [M, n] for x [M, K] and fragment-major ``words`` with a forced split and token tile (int4: group-128
    scales [K // 128, n], symmetric; int8: fp32 per-channel scales [n])."""
    from angel_kernels.gemm._splitk import plan_split

    M, K = x.shape
    y = torch.empty(M, n, dtype=x.dtype, device=x.device)
    tiles = n // (TILE_N * wg) * triton.cdiv(M, block_m)
    plan = plan_split(x.device, "w4a16", M, n, K, TILE_K, tiles, y, split or split_k, False)
    launch(x, words, scales, None, y, plan, block_m, int4, stages, wg, ahead)
    return y


CONFIGS = [dict(block_m=8, stages=3, ahead=3), dict(block_m=8, stages=3), dict(block_m=8, stages=3, split=1),
           dict(block_m=8, stages=3, split=4), dict(block_m=8, stages=3, ahead=3, split=4),
           dict(block_m=16, stages=3), dict(block_m=16, stages=3, ahead=3)]


def compile_sm90(int4, split_k=1, block_m=16, stages=3, wg=1, ahead=2, split=None, maxnreg=None):
    """Compile for sm_90a without a GPU; returns Triton's compiled kernel (asm, metadata)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = _fragment_gemm_kernel
    names = [p.name for p in kernel.params]
    signature = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16" if int4 else "*fp32", "bias_ptr": "*fp16",
                 "y_ptr": "*fp16", "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
                 "K_PER_SPLIT": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    consts = dict(INT4=int4, BF16=False, HAS_BIAS=False, SPLIT_K=split or split_k, BLOCK_M=block_m, STAGES=stages,
                  WG=wg, AHEAD=ahead)
    signature.update({k: "constexpr" for k in consts})
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    attrs = {(names.index(k),): [["tt.divisibility", 16]]
             for k in ("x_ptr", "w_ptr", "s_ptr", "y_ptr", "part_ptr", "count_ptr", "N", "K", "K_PER_SPLIT",
                       "stride_xm", "stride_ym")}
    src = GluonASTSource(kernel, signature, constexprs, attrs)
    options = {"num_warps": 4 * wg}
    if maxnreg:  # cap registers per thread (ptxas spills past it)
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="only compile for sm_90a (registers, shared memory)")
    ap.add_argument("--shapes", default="28672x4096,4096x14336,28672x8192,6144x4096,4096x4096,8192x28672")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--dump", default="", help="--compile: write the SASS of the first config here")
    args = ap.parse_args(argv)
    if args.compile:
        import re
        import subprocess
        import tempfile

        from sass_report import _tool, hottest_loop  # benchmarks/ is on sys.path when run as a script

        for int4 in (False, True):
            for split in (2,):
                for cfg in CONFIGS:
                    kernel = compile_sm90(int4, split, **cfg)
                    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                        ptx.write(kernel.asm["ptx"])
                        ptx.flush()
                        info = subprocess.run([_tool("ptxas"), "-v", "--gpu-name", "sm_90a", ptx.name, "-o",
                                               "/dev/null"], capture_output=True, text=True).stderr
                    regs = re.search(r"Used (\d+) registers", info)
                    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as cubin:
                        cubin.write(kernel.asm["cubin"])
                        cubin.flush()
                        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin.name], capture_output=True,
                                              text=True, check=True).stdout
                    loop = hottest_loop(sass)
                    print("int4" if int4 else "int8", split, cfg, f"shared {kernel.metadata.shared} B,",
                          f"{regs.group(1) if regs else '?'} registers, loop {sum(loop.values())}:",
                          " ".join(f"{op}:{n}" for op, n in loop.most_common(14)), flush=True)
                    if args.dump and cfg is CONFIGS[0]:
                        with open(f"{args.dump}.{'int4' if int4 else 'int8'}.sass", "w") as f:
                            f.write(sass)
                        with open(f"{args.dump}.{'int4' if int4 else 'int8'}.ptx", "w") as f:
                            f.write(kernel.asm["ptx"])
        return 0
    from angel_kernels import w4a16_gemm, w8a16_gemm
    from angel_kernels.gemm._splitk import split_k_on
    from angel_kernels.gemm.w8a16 import tile_major_int8
    from angel_kernels.quantization.int4 import pack_int4_rows
    from angel_kernels.tuning import l2_bytes, rotation_count, time_calls

    dev = torch.device("cuda")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for int4 in (False, True):
            split = split_k_on(dev, "w4a16" if int4 else "w8a16", n, k, TILE_K)
            for m in (int(v) for v in args.m.split(",")):
                gen = torch.Generator(device=dev).manual_seed(m + n + k)

                def make_set():
                    x = torch.randn(m, k, device=dev, generator=gen).half()
                    if int4:
                        nib = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32, generator=gen)
                        s = (torch.rand(k // 128, n, device=dev, generator=gen) * 0.01 + 1e-3).half()
                        shipped = (x, pack_int4_rows(nib.t().contiguous()), s)
                        return shipped, (x, fragment_major_int4(shipped[1]), s)
                    q = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen)
                    s = torch.rand(n, device=dev, generator=gen) * 0.01 + 1e-3
                    return (x, tile_major_int8(q), s), (x, fragment_major_int8(q), s)

                def shipped_fn(a):
                    if int4:
                        return w4a16_gemm(a[0], a[1], a[2], group_size=128)
                    return w8a16_gemm(*a, tile_major=True)

                sets = [make_set()]
                set_bytes = sum(t.numel() * t.element_size() for t in sets[0][0])
                sets += [make_set() for _ in range(1, rotation_count(set_bytes, l2_bytes(dev)))]
                ref = shipped_fn(sets[0][0])
                row = [f"shipped {time_calls([lambda a=a: shipped_fn(a[0]) for a in sets]).median_us:.1f}"]
                w16 = torch.randn(n, k, device=dev, dtype=torch.float16)
                row.append(f"cuBLAS {time_calls([lambda a=a: torch.nn.functional.linear(a[0][0], w16) for a in sets]).median_us:.1f}")
                for cfg in CONFIGS:
                    bm = cfg["block_m"]  # token tiles that fit the M regime
                    if m > 4 * bm or (m <= 16 and bm > 16) or (m > 16 and bm < 64) or (m < 256 and bm > 128):
                        continue
                    try:
                        got = probe_decode(*sets[0][1], n, split, int4, **cfg)
                        torch.cuda.synchronize()
                    except Exception as e:  # report, go on with the next config
                        row.append(f"{cfg} failed: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    same = torch.equal(got, ref)
                    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                    us = time_calls([lambda a=a, c=cfg: probe_decode(*a[1], n, split, int4, **c)
                                     for a in sets]).median_us
                    row.append(f"{cfg} {us:.1f}{'' if same else f' (other bits, rel err {err:.1e})'}")
                print(f"{'w4a16' if int4 else 'w8a16'} {n}x{k} split {split} M={m}: " + ", ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
