"""Probe, not used by the package: the w8a16 batch tile (tokens on the MMA's M side, DOT_T) written in Gluon, so
that the conversion of K-block i + 1 overlaps the asynchronous wgmma of block i.

Triton 3.6 issues each K-block's wgmma and waits for it at once when the B operand is a converted register tile;
here the converted tile is double-buffered in shared memory and the MMA left in flight (`warpgroup_mma(...,
is_async=True)` then `warpgroup_mma_wait(1)`). x and the int8 weight arrive through a cp.async ring. Unsplit K
only (N % BLOCK_N == 0, K % BLOCK_K == 0); rows equal the shipped kernel's bit for bit where that one runs
unsplit. A variant (``_probe_kernel_wregs``) loads the weight straight into registers as int32 words, two K-blocks
ahead, and converts it with the package's PTX word conversion; only x goes through the ring. Another
(``_probe_kernel_ws``) is warp-specialized: a producer warpgroup loads and converts, the default one only issues
MMAs. Measured on the H100 (benchmarks/NOTES.md): the 128×128 ring and register-weight tiles within -5 … +2 % of
the Triton tile, the warp-specialized one 1.4-1.6× slower (its one producer warpgroup sets the pace); all far
from cuBLAS fp16.

    python benchmarks/probe_gluon_w8a16.py            # GPU: bits against w8a16_gemm, then times (CUDA graphs)
    python benchmarks/probe_gluon_w8a16.py --compile  # any machine: sm_90a registers and shared memory
"""
import argparse
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                               warpgroup_mma_wait)

from angel_kernels._int8_words import _WORD_TO_F16 as WORD_TO_F16  # the package's PTX (a constexpr)

WS_PRODUCER_REGS = gl.constexpr(128)  # registers per thread of the warp-specialized variant's producer


@gluon.jit
def _tile_ids(M, BLOCK_M: gl.constexpr):
    """(pid_m, pid_n): consecutive programs share a weight tile."""
    num_pid_m = gl.cdiv(M, BLOCK_M)
    pid = gl.program_id(0)
    return pid % num_pid_m, pid // num_pid_m


@gluon.jit
def _store_scaled(acc, s_ptr, y_ptr, M, N, pid_m, pid_n, acc_l: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr):
    """y[tile] = acc · s[n] as fp16 (rows past M dropped)."""
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_l))
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_l))
    out = acc * gl.load(s_ptr + offs_n)[None, :]
    gl.store(y_ptr + offs_m[:, None].to(gl.int64) * N + offs_n[None, :], out.to(gl.float16),
             mask=(offs_m < M)[:, None])


@gluon.jit
def _issue_loads(x_ptr, w_ptr, x_smem, w_smem, stage, kb, offs_xm, offs_xk, mask_xm, offs_wn, offs_wk, K,
                 BLOCK_K: gl.constexpr):
    """cp.async of K-block kb of the x tile and the int8 weight tile into ring stage ``stage``, one commit group."""
    k0 = kb * BLOCK_K
    cp.async_copy_global_to_shared(x_smem.index(stage), x_ptr + offs_xm[:, None].to(gl.int64) * K
                                   + (k0 + offs_xk)[None, :], mask=mask_xm[:, None])
    cp.async_copy_global_to_shared(w_smem.index(stage), w_ptr + offs_wn[:, None].to(gl.int64) * K
                                   + (k0 + offs_wk)[None, :])
    cp.commit_group()


@gluon.jit
def _probe_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    pid_m, pid_n = _tile_ids(M, BLOCK_M)

    x_ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])  # 16-byte fp16 copies
    w_ld: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [num_warps, 1], [1, 0])  # 16-byte int8 copies
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BLOCK_N, 16])
    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float16))
    w_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8))
    c_smem = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float16))

    offs_xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_ld))
    offs_xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_ld))
    mask_xm = offs_xm < M
    offs_wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_ld))
    offs_wk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, w_ld))

    n_blocks = K // BLOCK_K
    for i in gl.static_range(STAGES - 1):
        _issue_loads(x_ptr, w_ptr, x_smem, w_smem, i, i, offs_xm, offs_xk, mask_xm, offs_wn, offs_wk, K, BLOCK_K)
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    for i in range(n_blocks):
        stage = i % STAGES
        cp.wait_group(STAGES - 2)  # block i has landed (this thread's copies) ...
        gl.thread_barrier()  # ... and everyone's
        w = w_smem.index(stage).load(w_ld)
        # fp16 1152 + w has the bits 0x6480 + w: exact for w in [-127, 127]
        wf = (w.to(gl.int16) + 0x6480).to(gl.float16, bitcast=True) - 1152.0
        converted = c_smem.index(i % 2)  # its previous reader, block i - 2's MMA, finished at the last wait
        converted.store(wf)
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(x_smem.index(stage), converted.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # block i - 1's MMA done: its stage is free
        nxt = i + STAGES - 1
        if nxt < n_blocks:
            _issue_loads(x_ptr, w_ptr, x_smem, w_smem, nxt % STAGES, nxt, offs_xm, offs_xk, mask_xm, offs_wn,
                         offs_wk, K, BLOCK_K)
        else:
            cp.commit_group()  # an empty group keeps wait_group's count in step
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    _store_scaled(acc, s_ptr, y_ptr, M, N, pid_m, pid_n, acc_l, BLOCK_M, BLOCK_N)



@gluon.jit
def _words_to_f16(w, ROWS: gl.constexpr, COLS: gl.constexpr):
    """int32 words [ROWS, COLS // 4] of int8 weights → fp16 [ROWS, COLS] (the package's PTX word conversion)."""
    b0, b1, b2, b3 = gl.inline_asm_elementwise(
        asm=WORD_TO_F16, constraints="=h,=h,=h,=h,r", args=[w],
        dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=1)
    return gl.reshape(gl.join(gl.join(b0, b2), gl.join(b1, b3)), (ROWS, COLS))


@gluon.jit
def _probe_kernel_wregs(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_K: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Variant: the weight straight to registers as int32 words (16-byte loads, two K-blocks ahead), converted by
    PTX a word at a time; only x goes through the cp.async ring."""
    pid_m, pid_n = _tile_ids(M, BLOCK_M)

    x_ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    w_ld: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [num_warps, 1], [1, 0])  # 4 words = 16 bytes
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BLOCK_N, 16])
    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float16))
    c_smem = gl.allocate_shared_memory(gl.float16, [2, BLOCK_N, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float16))
    offs_xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_ld))
    offs_xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_ld))
    mask_xm = offs_xm < M
    offs_wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_ld))
    offs_ww = gl.arange(0, BLOCK_K // 4, layout=gl.SliceLayout(0, w_ld))
    w_ptrs = w_ptr + offs_wn[:, None].to(gl.int64) * (K // 4) + offs_ww[None, :]

    n_blocks = K // BLOCK_K
    for i in gl.static_range(STAGES - 1):
        k0 = i * BLOCK_K
        cp.async_copy_global_to_shared(x_smem.index(i), x_ptr + offs_xm[:, None].to(gl.int64) * K
                                       + (k0 + offs_xk)[None, :], mask=mask_xm[:, None])
        cp.commit_group()
    w_a = gl.load(w_ptrs)
    w_b = gl.load(w_ptrs + BLOCK_K // 4, mask=n_blocks > 1)
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    for i in range(n_blocks):
        stage = i % STAGES
        w_cur = w_a
        w_a = w_b
        w_b = gl.load(w_ptrs + (i + 2) * (BLOCK_K // 4), mask=i + 2 < n_blocks)
        converted = c_smem.index(i % 2)
        converted.store(_words_to_f16(w_cur, BLOCK_N, BLOCK_K))
        fence_async_shared()
        cp.wait_group(STAGES - 2)
        gl.thread_barrier()
        acc = warpgroup_mma(x_smem.index(stage), converted.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        nxt = i + STAGES - 1
        if nxt < n_blocks:
            k0 = nxt * BLOCK_K
            cp.async_copy_global_to_shared(x_smem.index(nxt % STAGES), x_ptr + offs_xm[:, None].to(gl.int64) * K
                                           + (k0 + offs_xk)[None, :], mask=mask_xm[:, None])
        cp.commit_group()
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    _store_scaled(acc, s_ptr, y_ptr, M, N, pid_m, pid_n, acc_l, BLOCK_M, BLOCK_N)


@gluon.jit
def _ws_mma_partition(x_smem, c_smem, ready, empty, s_ptr, y_ptr, M, N, K, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """Consumer warpgroup: one async wgmma per K-block as soon as its stage is ready; a stage is handed back once
    the MMA after it has been issued and it has finished."""
    pid_m, pid_n = _tile_ids(M, BLOCK_M)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_N, 16])
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    n_blocks = K // BLOCK_K
    for i in range(n_blocks):
        j = i % STAGES
        mbarrier.wait(ready.index(j), (i // STAGES) & 1)
        acc = warpgroup_mma(x_smem.index(j), c_smem.index(j).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)  # block i - 1's MMA is done
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    _store_scaled(acc, s_ptr, y_ptr, M, N, pid_m, pid_n, acc_l, BLOCK_M, BLOCK_N)


@gluon.jit
def _ws_convert_partition(x_ptr, w_ptr, x_smem, c_smem, ready, empty, M, K, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """Producer warpgroup: x by cp.async STAGES - 2 K-blocks ahead, the weight as int32 words two K-blocks ahead
    in registers, converted into the stage's shared buffer; then the stage is marked ready. (Looking STAGES - 1
    ahead would wait for the MMA that needs this block's stage: a deadlock.)"""
    AHEAD: gl.constexpr = STAGES - 2
    pid_m, pid_n = _tile_ids(M, BLOCK_M)
    x_ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    w_ld: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])
    offs_xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_ld))
    offs_xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_ld))
    x_rows = x_ptr + offs_xm[:, None].to(gl.int64) * K + offs_xk[None, :]
    mask_xm = (offs_xm < M)[:, None]
    offs_wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_ld))
    offs_ww = gl.arange(0, BLOCK_K // 4, layout=gl.SliceLayout(0, w_ld))
    w_ptrs = w_ptr + offs_wn[:, None].to(gl.int64) * (K // 4) + offs_ww[None, :]
    n_blocks = K // BLOCK_K
    for t in gl.static_range(AHEAD):
        cp.async_copy_global_to_shared(x_smem.index(t), x_rows + t * BLOCK_K, mask=mask_xm)
        cp.commit_group()
    w_a = gl.load(w_ptrs)
    w_b = gl.load(w_ptrs + BLOCK_K // 4, mask=n_blocks > 1)
    for i in range(n_blocks):
        nxt = i + AHEAD
        if nxt < n_blocks:
            stage = nxt % STAGES
            mbarrier.wait(empty.index(stage), (nxt // STAGES + 1) & 1, pred=nxt >= STAGES)  # MMA nxt - STAGES done
            cp.async_copy_global_to_shared(x_smem.index(stage), x_rows + nxt * BLOCK_K, mask=mask_xm)
        cp.commit_group()
        w_cur = w_a
        w_a = w_b
        w_b = gl.load(w_ptrs + (i + 2) * (BLOCK_K // 4), mask=i + 2 < n_blocks)
        c_smem.index(i % STAGES).store(_words_to_f16(w_cur, BLOCK_N, BLOCK_K))
        cp.wait_group(AHEAD)  # block i's x has landed
        fence_async_shared()
        gl.thread_barrier()  # the partition's four warps
        mbarrier.arrive(ready.index(i % STAGES))


@gluon.jit
def _probe_kernel_ws(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     BLOCK_K: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Variant: warp-specialized. A producer warpgroup loads and converts, the default warpgroup only issues
    MMAs; STAGES shared (x, converted weight) pairs with ready / empty barriers between them."""
    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float16))
    c_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float16))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=1)
    gl.warp_specialize([
        (_ws_mma_partition, (x_smem, c_smem, ready, empty, s_ptr, y_ptr, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                             STAGES)),
        (_ws_convert_partition, (x_ptr, w_ptr, x_smem, c_smem, ready, empty, M, K, BLOCK_M, BLOCK_N, BLOCK_K,
                                 STAGES)),
    ], [4], [WS_PRODUCER_REGS])

VARIANTS = {"ring": _probe_kernel, "wregs": _probe_kernel_wregs, "ws": _probe_kernel_ws}
# (BLOCK_M tokens, BLOCK_N weight rows, BLOCK_K, stages, warps, variant)
CONFIGS = [(128, 128, 64, 3, 4, "ring"), (128, 128, 64, 3, 4, "wregs"), (128, 128, 64, 4, 4, "ws"),
           (128, 128, 64, 5, 4, "ws"), (128, 128, 64, 6, 4, "ws")]


def probe_w8a16(x, q, s, block_m=128, block_n=128, block_k=64, stages=3, num_warps=4, variant="ring"):
    """y = x · (q · s)ᵀ for fp16 x [M, K], row-major int8 q [N, K], fp32 s [N] with one of VARIANTS."""
    M, K = x.shape
    N = q.shape[0]
    if N % block_n or K % block_k:
        raise ValueError(f"the probe needs N % {block_n} == 0 and K % {block_k} == 0, got N={N}, K={K}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    words = variant != "ring"
    VARIANTS[variant][(triton.cdiv(M, block_m) * (N // block_n),)](
        x, q.view(torch.int32) if words else q, s, y, M, N, K, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=num_warps)
    return y


def compile_sm90(block_m=128, block_n=128, block_k=64, stages=3, num_warps=4, variant="ring"):
    """Compile for sm_90a without a GPU; returns Triton's compiled kernel (asm, metadata)."""
    kernel = VARIANTS[variant]
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = [p.name for p in kernel.params]
    signature = {"x_ptr": "*fp16", "w_ptr": "*i8" if variant == "ring" else "*i32", "s_ptr": "*fp32", "y_ptr": "*fp16", "M": "i32", "N": "i32",
                 "K": "i32"}
    consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=num_warps)
    signature.update({k: "constexpr" for k in consts})
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in ("x_ptr", "w_ptr", "s_ptr", "y_ptr", "N", "K")}
    src = GluonASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="only compile each config for sm_90a")
    ap.add_argument("--shapes", default="28672x4096,28672x8192", help="NxK,...")
    ap.add_argument("--m", default="128,256,512")
    args = ap.parse_args(argv)
    if args.compile:
        import re
        import subprocess
        import tempfile

        from sass_report import _tool  # benchmarks/ is on sys.path when run as a script

        for cfg in CONFIGS:
            kernel = compile_sm90(*cfg)
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                ptx.write(kernel.asm["ptx"])
                ptx.flush()
                info = subprocess.run([_tool("ptxas"), "-v", "--gpu-name", "sm_90a", ptx.name, "-o", "/dev/null"],
                                      capture_output=True, text=True).stderr
            regs = re.search(r"Used (\d+) registers", info)
            print(cfg, f"shared memory {kernel.metadata.shared} B, {regs.group(1) if regs else '?'} registers")
        return 0
    from angel_kernels import w8a16_gemm
    from angel_kernels.tuning import l2_bytes, rotation_count, time_calls

    dev = torch.device("cuda")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.m.split(",")):
            gen = torch.Generator(device=dev).manual_seed(m)

            def make_set():
                return (torch.randn(m, k, device=dev, generator=gen).half(),
                        torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen),
                        torch.rand(n, device=dev, generator=gen) * 0.01 + 1e-3)

            sets = [make_set()]
            set_bytes = sum(t.numel() * t.element_size() for t in sets[0])
            sets += [make_set() for _ in range(1, rotation_count(set_bytes, l2_bytes(dev)))]
            shipped = w8a16_gemm(*sets[0])
            row = [f"shipped {time_calls([lambda a=a: w8a16_gemm(*a) for a in sets]).median_us:.1f}"]
            for cfg in CONFIGS:
                same = torch.equal(probe_w8a16(*sets[0], *cfg), shipped)
                us = time_calls([lambda a=a, c=cfg: probe_w8a16(*a, *c) for a in sets]).median_us
                row.append(f"{cfg} {us:.1f}{'' if same else ' (other bits)'}")
            print(f"{n}x{k} M={m}: " + ", ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
