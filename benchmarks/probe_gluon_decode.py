"""Probe, not used by the package: the weight-only decode tile (M ≤ 16) with the weight fed to wgmma straight from
the registers it was loaded into, in Gluon.

The Triton decode tiles load the weight in a row-contiguous layout and move the converted tile into wgmma's
register-operand layout through shared memory (four STS / BAR / LDSM rounds per K-block, sm_90a); ncu put the
decode programs' time mostly in barrier and shared-memory stalls. Here the weight is stored *fragment-major*: in
each 64-row × 128-column tile, thread t of the warpgroup finds its wgmma A fragments for the tile's eight k16 steps
as one contiguous run (64 bytes of int8, 32 bytes of int4), so it loads them with 16-byte loads, converts them in
place and hands them to `warpgroup_mma` as the A operand: no shared memory for the weight, no barrier for it.
Only x (the B operand, a few rows) goes through a cp.async ring.

Fragment of thread t = 32 w + 4 g + c (warp w, lane group g, lane c) at k16 step s: rows r0 = 16 w + g and
r1 = r0 + 8, columns 16 s + 2 c + {0, 1} and + 8. int8: two words per step, word h (column half) holding the
bytes (r0, k), (r0, k + 1), (r1, k), (r1, k + 1). int4: one word per step, nibble 4 e + 2 h + r holding row r,
column half h, column parity e (the nibble pairs (j, j + 4) that one lop3 turns into an f16x2 are then one A
register). Split-K as the package's kernels (same ranges, "last program sums the partials in split order").

    python benchmarks/probe_gluon_decode.py            # GPU: bits against w8a16_gemm / w4a16_gemm, then times
    python benchmarks/probe_gluon_decode.py --compile  # any machine: sm_90a registers and shared memory
"""
import argparse
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from angel_kernels._int8_words import _WORD_TO_F16 as WORD_TO_F16  # the package's PTX (a constexpr)

TILE_N = gl.constexpr(64)  # weight rows per tile (wgmma's M side)
TILE_K = gl.constexpr(128)  # columns per tile, one K-block

# int4 word → 8 fp16 values (q − 8) · s, as the package's w4a16 PTX (same operations, same rounding) but with the
# scale of row r0 for the lane pairs of nibbles (0, 4), (2, 6) and of row r1 for (1, 5), (3, 7).
# $0…$7 nibbles 0…7, $8 the word, $9 / $10 the scales of r0 / r1.
_INT4_FRAG_F16 = gl.constexpr("""{
.reg .b32 t0, t1, t2, t3, c, sa, sb;
mov.b32 c, 0x64086408;
mov.b32 sa, {$9, $9};
mov.b32 sb, {$10, $10};
lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t1, $8, 4;
lop3.b32 t1, t1, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t2, $8, 8;
lop3.b32 t2, t2, 0x000F000F, 0x64006400, 0xEA;
shr.u32 t3, $8, 12;
lop3.b32 t3, t3, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 t0, t0, c;
sub.f16x2 t1, t1, c;
sub.f16x2 t2, t2, c;
sub.f16x2 t3, t3, c;
mul.f16x2 t0, t0, sa;
mul.f16x2 t1, t1, sb;
mul.f16x2 t2, t2, sa;
mul.f16x2 t3, t3, sb;
mov.b32 {$0, $4}, t0;
mov.b32 {$1, $5}, t1;
mov.b32 {$2, $6}, t2;
mov.b32 {$3, $7}, t3;
}""")


def fragment_major_int8(q: torch.Tensor) -> torch.Tensor:
    """Row-major int8 [N, K] → int32 words [N·K / 4], fragment-major (module doc)."""
    n, k = q.shape
    t = q.reshape(n // 64, 4, 2, 8, k // 128, 8, 2, 4, 2)  # (tn, w, r, g, tk, s, h, c, e)
    t = t.permute(0, 4, 1, 3, 7, 5, 6, 2, 8)  # (tn, tk, w, g, c, s, h, r, e): byte 2 r + e of word (s, h)
    return t.contiguous().reshape(-1, 4).view(torch.int32).reshape(-1)


def fragment_major_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """Unsigned int4 values [N, K] (0..15, any integer dtype) → int32 words [N·K / 8], fragment-major."""
    n, k = nibbles.shape
    t = nibbles.to(torch.int64).reshape(n // 64, 4, 2, 8, k // 128, 8, 2, 4, 2)  # (tn, w, r, g, tk, s, h, c, e)
    t = t.permute(0, 4, 1, 3, 7, 5, 8, 6, 2).reshape(-1, 8)  # nibble 4 e + 2 h + r of word (s)
    shifts = torch.arange(0, 32, 4, device=nibbles.device)
    words = (t << shifts).sum(dim=1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


@gluon.jit
def _fragments(w, s0, s1, INT4: gl.constexpr, a_l: gl.constexpr):
    """Words [128 threads, WORDS] → the fp16 A operand [64, 128] in wgmma's register layout a_l."""
    if INT4:
        v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
            asm=_INT4_FRAG_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", args=[w, s0, s1],
            dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        # nibble 4 e + 2 h + r → [.., h, r, e]
        t = gl.join(gl.join(gl.join(v0, v2), gl.join(v1, v3)), gl.join(gl.join(v4, v6), gl.join(v5, v7)))
    else:
        b0, b1, b2, b3 = gl.inline_asm_elementwise(
            asm=WORD_TO_F16, constraints="=h,=h,=h,=h,r", args=[w],
            dtype=(gl.float16,) * 4, is_pure=True, pack=1)
        t = gl.join(gl.join(b0, b2), gl.join(b1, b3))  # byte 2 r + e → [.., r, e]
    t = gl.reshape(t, [4, 8, 4, 8, 2, 2, 2])  # (w, g, c, s, h, r, e)
    t = gl.permute(t, [0, 5, 1, 3, 4, 2, 6])  # (w, r, g, s, h, c, e): row 16 w + 8 r + g, column 16 s + 8 h + 2 c + e
    return gl.convert_layout(gl.reshape(t, [64, 128]), a_l)


@gluon.jit
def _decode_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr, M, N, K, K_PER_SPLIT,
                   INT4: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                   WAIT: gl.constexpr):
    WORDS: gl.constexpr = 8 if INT4 else 16  # words per thread per 64 × 128 tile
    num_pid_m = gl.cdiv(M, BLOCK_M)
    pid_n = gl.program_id(0) // num_pid_m  # consecutive programs share a weight tile (token tiles of a batch)
    pid_m = gl.program_id(0) % num_pid_m
    tile = gl.program_id(0)
    pid_k = gl.program_id(1)
    w_ld: gl.constexpr = gl.BlockedLayout([1, WORDS], [32, 1], [4, 1], [1, 0])
    x_ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, TILE_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, TILE_K], gl.float16))

    k_start = pid_k * K_PER_SPLIT
    n_blocks = gl.minimum(K - k_start, K_PER_SPLIT) // TILE_K
    kb0 = k_start // TILE_K
    thr = gl.arange(0, 128, layout=gl.SliceLayout(1, w_ld))
    j = gl.arange(0, WORDS, layout=gl.SliceLayout(0, w_ld))
    w_ptrs = (w_ptr + (pid_n.to(gl.int64) * (K // TILE_K) + kb0) * (128 * WORDS)
              + (thr * WORDS)[:, None] + j[None, :])
    # int4 scales [K // 128, N]: rows r0 and r0 + 8 of this thread
    s_ptrs = s_ptr + kb0.to(gl.int64) * N + pid_n * TILE_N + (thr // 32) * 16 + (thr % 32) // 4

    offs_xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_ld))
    offs_xk = gl.arange(0, TILE_K, layout=gl.SliceLayout(0, x_ld))
    x_ptrs = x_ptr + offs_xm[:, None].to(gl.int64) * K + (k_start + offs_xk)[None, :]
    mask_xm = (offs_xm < M)[:, None]

    for t in gl.static_range(STAGES - 1):
        cp.async_copy_global_to_shared(x_smem.index(t), x_ptrs + t * TILE_K, mask=mask_xm & (t < n_blocks))
        cp.commit_group()
    w_a = gl.load(w_ptrs)
    w_b = gl.load(w_ptrs + 128 * WORDS, mask=n_blocks > 1)
    if INT4:
        s0_a = gl.load(s_ptrs)
        s1_a = gl.load(s_ptrs + 8)
        s0_b = gl.load(s_ptrs + N, mask=n_blocks > 1)
        s1_b = gl.load(s_ptrs + N + 8, mask=n_blocks > 1)
    acc = gl.zeros([TILE_N, BLOCK_M], gl.float32, acc_l)
    for i in range(n_blocks):
        w_cur = w_a
        w_a = w_b
        w_b = gl.load(w_ptrs + (i + 2) * (128 * WORDS), mask=i + 2 < n_blocks)
        if INT4:
            s0 = s0_a
            s1 = s1_a
            s0_a = s0_b
            s1_a = s1_b
            s0_b = gl.load(s_ptrs + (i + 2) * N, mask=i + 2 < n_blocks)
            s1_b = gl.load(s_ptrs + (i + 2) * N + 8, mask=i + 2 < n_blocks)
            a = _fragments(w_cur, s0[:, None], s1[:, None], INT4, a_l)
        else:
            a = _fragments(w_cur, w_cur, w_cur, INT4, a_l)
        cp.wait_group(STAGES - 2)
        gl.thread_barrier()
        acc = warpgroup_mma(a, x_smem.index(i % STAGES).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=WAIT, deps=(acc, a))[0]  # a: registers the MMA reads
        nxt = i + STAGES - 1
        cp.async_copy_global_to_shared(x_smem.index(nxt % STAGES), x_ptrs + nxt * TILE_K,
                                       mask=mask_xm & (nxt < n_blocks))
        cp.commit_group()
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    offs_n = pid_n * TILE_N + gl.arange(0, TILE_N, layout=gl.SliceLayout(1, acc_l))
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_l))
    mask = (offs_m < M)[None, :] & (offs_n < N)[:, None]
    offs = offs_n[:, None].to(gl.int64) + offs_m[None, :].to(gl.int64) * N
    if SPLIT_K > 1:
        gl.store(part_ptr + pid_k.to(gl.int64) * M * N + offs, acc, mask=mask)
        arrived = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = gl.load(part_ptr + offs, mask=mask, other=0.0)
            for s in range(1, SPLIT_K):
                acc += gl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
            gl.store(count_ptr + tile, 0)
            _epilogue(acc, s_ptr, y_ptr, offs_n, offs, mask, INT4)
    else:
        _epilogue(acc, s_ptr, y_ptr, offs_n, offs, mask, INT4)


@gluon.jit
def _epilogue(acc, s_ptr, y_ptr, offs_n, offs, mask, INT4: gl.constexpr):
    if not INT4:  # w8a16: the per-channel fp32 scale on the fp32 sum
        acc = acc * gl.load(s_ptr + offs_n)[:, None]
    gl.store(y_ptr + offs, acc.to(gl.float16), mask=mask)


def probe_decode(x, words, scales, n, split_k, int4, block_m=16, stages=3, wait=0):
    """y [M, n] fp16 for fp16 x [M, K] (M ≤ block_m) and fragment-major ``words``; int4: group-128 fp16 scales
    [K // 128, n], symmetric; int8: fp32 per-channel scales [n]."""
    from angel_kernels.gemm._splitk import tile_counters

    M, K = x.shape
    num_pid_m = triton.cdiv(M, block_m)
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), TILE_K) * TILE_K
    y = torch.empty(M, n, dtype=torch.float16, device=x.device)
    part = torch.empty(split_k, M, n, dtype=torch.float32, device=x.device) if split_k > 1 else y
    counters = tile_counters(x.device, n // TILE_N * num_pid_m)
    _decode_kernel[(n // TILE_N * num_pid_m, split_k)](
        x, words, scales, y, part, counters, M, n, K, k_per_split, INT4=int4, SPLIT_K=split_k, BLOCK_M=block_m,
        STAGES=stages, WAIT=wait, num_warps=4)
    return y


CONFIGS = [dict(block_m=8, stages=3, wait=0), dict(block_m=16, stages=3, wait=0), dict(block_m=64, stages=3, wait=0),
           dict(block_m=128, stages=3, wait=0), dict(block_m=256, stages=2, wait=0)]


def compile_sm90(int4, split_k=1, block_m=16, stages=3, wait=0):
    """Compile for sm_90a without a GPU; returns Triton's compiled kernel (asm, metadata)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = _decode_kernel
    names = [p.name for p in kernel.params]
    signature = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16" if int4 else "*fp32", "y_ptr": "*fp16",
                 "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32"}
    consts = dict(INT4=int4, SPLIT_K=split_k, BLOCK_M=block_m, STAGES=stages, WAIT=wait)
    signature.update({k: "constexpr" for k in consts})
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    attrs = {(names.index(k),): [["tt.divisibility", 16]]
             for k in ("x_ptr", "w_ptr", "s_ptr", "y_ptr", "part_ptr", "count_ptr", "N", "K", "K_PER_SPLIT")}
    src = GluonASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


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
            for split in (1, 2):
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
                    if args.dump and split == 1 and cfg is CONFIGS[0]:
                        with open(f"{args.dump}.{'int4' if int4 else 'int8'}.sass", "w") as f:
                            f.write(sass)
                    if args.dump and split == 1 and cfg is CONFIGS[0]:
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
                        return shipped, (x, fragment_major_int4(nib), s)
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
                    if m > 4 * cfg["block_m"] or (m <= 16 and cfg["block_m"] > 16) or (m > 16 and cfg["block_m"] < 64):
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
