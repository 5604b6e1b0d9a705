"""The Gluon (Triton's explicit-layout dialect) kernels of ``fragment``: weight-only GEMM on fragment-major tiles.

Decode tiles (``_fragment_gemm_kernel``). One program: 64 weight rows (one warpgroup, wgmma's M side) × BLOCK_M
tokens (its N side) over one split range of K. Per 128-wide K-block a thread loads its fragment words (AHEAD
K-blocks ahead, one register set per block in flight), dequantizes them in place with the package's PTX, and issues
the eight k16 steps with the words as the A operand; x arrives through a cp.async ring in shared memory (wgmma's B
operand). With PAIR two K-blocks are converted and their sixteen steps issued as one group
(``fragment.decode_pair``). Split-K as the Triton kernels: every program of a split launch writes an fp32 partial,
the last to arrive (acq_rel counter) sums them in split order, or on short ranges (``fragment.split_sum_launch``) a
second kernel does (``launch_split_sum``: the same sum without the counter's fence and atomic at the end of every
program).

int8 tiles (``fragment_major_int8``; two words per k16 step, bytes (r0, k), (r0, k + 1), (r1, k), (r1, k + 1))
share the kernel: the per-channel scale is then applied to the fp32 sum, as ``w8a16_gemm`` does.

Batch tiles (``_fragment_gemm_tma_kernel``): 2-4 warpgroups per program, each its own 64 weight rows, share one x
tile that TMA brings in (an mbarrier per stage, refilled once every warpgroup's MMAs on it are complete). Why:
with one warpgroup per program every 64 weight rows read all of x from L2; at M = 256 on 28672×4096 that is
~1 GB per call, and the decode tiles ran at the L2's ~7-8 TB/s there. A thread converts its words in k64 halves (16
A registers instead of 32) so that two programs of two warpgroups fit an SM (int8: 128 registers). The k16 chain
and the split ranges are the decode tiles', so are the bits; SERIAL runs a split weight's ranges one after the
other in one program and sums them in registers in split order (what the last-arrival sum of the partials does).
ncu (H100, int8 28672×4096, M = 1024): tensor pipe active 76 % of the cycles against cuBLAS's 96 %.

Piped tiles (``_fragment_gemm_piped_kernel``): the batch tiles' operands and bits, with the MMAs left in flight. A
warpgroup converts k64 half j + 1 into a second A register set while half j's wgmma runs and then waits only for
half j - 1's; the weight words come through a cp.async ring (each thread reads back only what it copied, so no
barrier), x through a TMA ring of k64 halves. 256-token tiles, one program per SM.
ncu (H100, 28672×4096, M = 1024, a first version that held the words in registers): tensor pipe 78 % (int4), 71 %
(int8, at 254 registers).

Paired tiles (``_fragment_gemm_paired_kernel``, warp-specialized): split weights give few tiles of 64 rows × 128
tokens (4096×4096 at M = 256: 128, one per SM), and one warpgroup alone keeps the tensor pipe ~44 % busy (ncu, H200:
it waits on its own MMAs and conversions). Two consumer warpgroups share the tile, one on the even split ranges and
one on the odd ones, each with its own x ring that a loader warp fills by TMA; the odd one hands each range's fp32
sum over through shared memory and the even one adds them in split order, so the bits are the serial tiles' (and
the decode tiles'). ncu, H200, int8 4096×4096 M = 256: tensor pipe 44 → 53 %. Parts tiles
(``_fragment_gemm_parts_kernel``) are the same with four warpgroups on round-robin ranges, each refilling its own
x slots: four chains per SM where whole 64-token tiles fill one wave (6144×4096 and 8192×28672 at 64 tokens,
4096-row weights at 128).

Streamed tiles (``_fragment_gemm_stream_kernel``, persistent and warp-specialized): one program per SM walks
tiles of 128 weight rows × 256 tokens, two warpgroups in one consumer partition sharing each x stage (two
partitions of one would make ptxas serialize every wgmma: C7512), a loader warp filling the x stages by TMA, the
next tile's while the consumers store this one; split weights run their ranges one after the other. They serve
the split weights whose 256-token tiles fill one wave (70B down projection at 384-512 tokens, H200: 493 → 409 µs
int8 at M = 512 in the probe).
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._int8_words import _WORD_TO_BF16, _WORD_TO_F16
from ..runtime import dependent_launch
from . import fragment
from ._splitk import launch_split_sum
from .w4a16 import _word_dequant_ptx

TILE_N = gl.constexpr(fragment.TILE_N)  # the layout's tile, as constants the kernel can read
TILE_K = gl.constexpr(fragment.TILE_K)
STAGES = 3  # x ring depth (H100: 3 and 4 took the same time at M = 1 and 16)

_INT8_F16 = gl.constexpr(_WORD_TO_F16.value)  # the package's int8 word conversions
_INT8_BF16 = gl.constexpr(_WORD_TO_BF16.value)
# int4: w4a16's word dequantization with the scales of the thread's two rows (r0 for the nibble pairs (0, 4),
# (2, 6), r0 + 8 for (1, 5), (3, 7)); $8 the word, $9 / $10 the scales
_INT4_F16 = gl.constexpr(_word_dequant_ptx(False, False, row_pair_scales=True))
_INT4_BF16 = gl.constexpr(_word_dequant_ptx(True, False, row_pair_scales=True))


@gluon.jit
def _fragments(w, s0, s1, INT4: gl.constexpr, BF16: gl.constexpr, a_l: gl.constexpr):
    """Words [128 threads, words per thread] → the A operand [64, 16 · k16 steps] in wgmma's register layout a_l. The
    reshape / permute only renames registers: the result already sits where a_l wants it (no shared memory)."""
    if INT4 and BF16:
        v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
            asm=_INT4_BF16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", args=[w, s0, s1], dtype=(gl.bfloat16,) * 8,
            is_pure=True, pack=1)
    elif INT4:
        v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
            asm=_INT4_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", args=[w, s0, s1], dtype=(gl.float16,) * 8,
            is_pure=True, pack=1)
    elif BF16:
        b0, b1, b2, b3 = gl.inline_asm_elementwise(
            asm=_INT8_BF16, constraints="=h,=h,=h,=h,r", args=[w], dtype=(gl.bfloat16,) * 4, is_pure=True, pack=1)
    else:
        b0, b1, b2, b3 = gl.inline_asm_elementwise(
            asm=_INT8_F16, constraints="=h,=h,=h,=h,r", args=[w], dtype=(gl.float16,) * 4, is_pure=True, pack=1)
    if INT4:  # nibble 4 e + 2 h + r → [.., h, r, e]
        t = gl.join(gl.join(gl.join(v0, v2), gl.join(v1, v3)), gl.join(gl.join(v4, v6), gl.join(v5, v7)))
    else:  # byte 2 r + e of word (s, h) → [.., r, e]
        t = gl.join(gl.join(b0, b2), gl.join(b1, b3))
    WARPS: gl.constexpr = w.shape[0] // 32
    STEPS: gl.constexpr = w.shape[1] if INT4 else w.shape[1] // 2  # k16 steps in w (8: a whole K-block)
    t = gl.reshape(t, [WARPS, 8, 4, STEPS, 2, 2, 2])  # (w, g, c, s, h, r, e)
    t = gl.permute(t, [0, 5, 1, 3, 4, 2, 6])  # row 16 w + 8 r + g, column 16 s + 8 h + 2 c + e
    return gl.convert_layout(gl.reshape(t, [16 * WARPS, 16 * STEPS]), a_l)


@gluon.jit
def _load_block(w_ptrs, s_ptrs, i, n_blocks, N, WORDS: gl.constexpr, INT4: gl.constexpr, DT: gl.constexpr):
    """K-block i's weight words and (int4) the scales of the thread's two rows; masked past the split range."""
    w = gl.load(w_ptrs + i * (128 * WORDS), mask=i < n_blocks)
    if INT4:
        s0 = gl.load(s_ptrs + i * N, mask=i < n_blocks).to(DT)
        s1 = gl.load(s_ptrs + i * N + 8, mask=i < n_blocks).to(DT)
    else:  # int8: unused
        s0 = gl.full(s_ptrs.shape, 0, DT, s_ptrs.type.layout)
        s1 = s0
    return w, s0, s1


@gluon.jit
def _k_block(acc, i, n_blocks, w, s0, s1, w_ptrs, s_ptrs, x_smem, x_ptrs, mask_xm, N, WORDS: gl.constexpr,
             INT4: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr, AHEAD: gl.constexpr, STAGES: gl.constexpr,
             a_l: gl.constexpr):
    """K-block i: its words w (loaded AHEAD blocks earlier) → A operand, block i + AHEAD's words into the same
    registers, one wgmma group on x's stage, x's refill. Returns (acc, words and scales of block i + AHEAD)."""
    a = _fragments(w, s0[:, None], s1[:, None], INT4, BF16, a_l)
    w, s0, s1 = _load_block(w_ptrs, s_ptrs, i + AHEAD, n_blocks, N, WORDS, INT4, DT)
    cp.wait_group(STAGES - 2)
    gl.thread_barrier()
    acc = warpgroup_mma(a, x_smem.index(i % STAGES).permute((1, 0)), acc, is_async=True)
    # wait at once: the next cp.async refills the stage block i - 1's MMA read (waiting one MMA behind would
    # need a ring one stage deeper; at these sizes it bought nothing)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))[0]
    nxt = i + STAGES - 1
    cp.async_copy_global_to_shared(x_smem.index(nxt % STAGES), x_ptrs + nxt * TILE_K, mask=mask_xm & (nxt < n_blocks))
    cp.commit_group()
    return acc, w, s0, s1


@gluon.jit
def _k_pair(acc, i, n_blocks, w0, s00, s10, w1, s01, s11, w_ptrs, s_ptrs, x_smem, x_ptrs, mask_xm, N,
            WORDS: gl.constexpr, INT4: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr, AHEAD: gl.constexpr,
            STAGES: gl.constexpr, a_l: gl.constexpr):
    """K-blocks i and i + 1 (PAIR): both converted, then their sixteen k16 steps issued as one wgmma group on the
    same accumulator in K order (the bits of two single blocks) and waited for once: one barrier, one MMA wait and
    one refill round per two blocks. The ring keeps STAGES - 4 blocks in flight past the pair while its MMAs run;
    the two stages the previous pair read are refilled after the wait. Needs an even block count per range."""
    a0 = _fragments(w0, s00[:, None], s10[:, None], INT4, BF16, a_l)
    a1 = _fragments(w1, s01[:, None], s11[:, None], INT4, BF16, a_l)
    w0, s00, s10 = _load_block(w_ptrs, s_ptrs, i + AHEAD, n_blocks, N, WORDS, INT4, DT)
    w1, s01, s11 = _load_block(w_ptrs, s_ptrs, i + 1 + AHEAD, n_blocks, N, WORDS, INT4, DT)
    cp.wait_group(STAGES - 4)
    gl.thread_barrier()
    acc = warpgroup_mma(a0, x_smem.index(i % STAGES).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(a1, x_smem.index((i + 1) % STAGES).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a0, a1))[0]
    for j in gl.static_range(2):
        nxt = i + STAGES - 2 + j
        cp.async_copy_global_to_shared(x_smem.index(nxt % STAGES), x_ptrs + nxt * TILE_K,
                                       mask=mask_xm & (nxt < n_blocks))
        cp.commit_group()
    return acc, w0, s00, s10, w1, s01, s11


@gluon.jit
def _early_launch(PDL: gl.constexpr):
    """Programmatic dependent launch: the kernel is launched while the previous kernel of the stream finishes and
    waits for it here, before touching anything that kernel may write or read (x, y, the split scratch; the decode
    tiles load their first constant weight words before it, the other tiles nothing); PDL 1 then lets the next
    kernel launch at once, 2 when this one's programs exit. 0: a plain launch."""
    if PDL:
        gdc_wait()
        if PDL == 1:
            gdc_launch_dependents()


@gluon.jit
def _fragment_gemm_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N, K, K_PER_SPLIT,
                          stride_xm, stride_ym, INT4: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                          SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr,
                          AHEAD: gl.constexpr, PDL: gl.constexpr = 0, SUM_KERNEL: gl.constexpr = False,
                          PAIR: gl.constexpr = False):
    """Decode tiles (module doc). PDL: launched while the previous kernel of the stream runs (programmatic dependent
    launch): the first AHEAD K-blocks of weight words (constant data) are loaded before waiting for it, x and the
    split scratch only after; 1 then lets the next kernel launch at once, 2 when this one's programs exit.
    SUM_KERNEL: a split launch only stores its partials; ``launch_split_sum`` sums them (no counter). PAIR: two
    K-blocks per wgmma group (``_k_pair``; AHEAD 2 or 4, even block counts, STAGES ≥ 4)."""
    WORDS: gl.constexpr = 8 if INT4 else 16  # words per thread per tile
    ROWS: gl.constexpr = 64 * WG  # WG warpgroups, one 64-row tile each, share the x tile
    DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    num_pid_m = gl.cdiv(M, BLOCK_M)
    tile = gl.program_id(0)
    pid_n = tile // num_pid_m  # consecutive programs share a weight tile (the token tiles of a batch)
    pid_m = tile % num_pid_m
    pid_k = gl.program_id(1)
    w_ld: gl.constexpr = gl.BlockedLayout([1, WORDS], [32, 1], [4 * WG, 1], [1, 0])  # a thread's run: 16-byte loads
    x_ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4 * WG, 1], [1, 0])  # 16-byte cp.async
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * WG, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    x_smem = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, TILE_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, TILE_K], DT))

    k_start = pid_k * K_PER_SPLIT
    n_blocks = gl.minimum(K - k_start, K_PER_SPLIT) // TILE_K
    kb0 = k_start // TILE_K
    thr = gl.arange(0, 128 * WG, layout=gl.SliceLayout(1, w_ld))
    row_block = pid_n * WG + thr // 128  # this thread's 64-row tile
    w_ptrs = (w_ptr + (row_block.to(gl.int64) * (K // TILE_K) + kb0)[:, None] * (128 * WORDS)
              + ((thr % 128) * WORDS)[:, None] + gl.arange(0, WORDS, layout=gl.SliceLayout(0, w_ld))[None, :])
    # int4 scales [K // 128, N]: this thread's rows r0 and r0 + 8
    s_ptrs = s_ptr + kb0.to(gl.int64) * N + row_block * TILE_N + (thr % 128 // 32) * 16 + (thr % 32) // 4

    offs_xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_ld))
    offs_xk = gl.arange(0, TILE_K, layout=gl.SliceLayout(0, x_ld))
    x_ptrs = x_ptr + offs_xm[:, None].to(gl.int64) * stride_xm + (k_start + offs_xk)[None, :]
    mask_xm = (offs_xm < M)[:, None]

    # the weight words (and int4 scales) of the next AHEAD K-blocks in flight, one register set per block: the
    # loop is unrolled AHEAD times so that each set is reloaded in place once its block is converted (a set
    # handed on to the next (w_a = w_b) is a register move that waits for the load in flight: one block ahead)
    w_a, s0_a, s1_a = _load_block(w_ptrs, s_ptrs, 0, n_blocks, N, WORDS, INT4, DT)
    w_b, s0_b, s1_b = _load_block(w_ptrs, s_ptrs, 1, n_blocks, N, WORDS, INT4, DT)
    w_c, s0_c, s1_c = w_b, s0_b, s1_b  # used from AHEAD = 3
    w_d, s0_d, s1_d = w_b, s0_b, s1_b  # AHEAD = 4
    if AHEAD >= 3:
        w_c, s0_c, s1_c = _load_block(w_ptrs, s_ptrs, 2, n_blocks, N, WORDS, INT4, DT)
    if AHEAD == 4:
        w_d, s0_d, s1_d = _load_block(w_ptrs, s_ptrs, 3, n_blocks, N, WORDS, INT4, DT)
    _early_launch(PDL)  # x (and the partials and counters) may still be written by the previous kernel
    for t in gl.static_range(STAGES - 2 if PAIR else STAGES - 1):
        cp.async_copy_global_to_shared(x_smem.index(t), x_ptrs + t * TILE_K, mask=mask_xm & (t < n_blocks))
        cp.commit_group()
    acc = gl.zeros([ROWS, BLOCK_M], gl.float32, acc_l)
    if PAIR:
        for i in range(0, n_blocks, AHEAD):
            acc, w_a, s0_a, s1_a, w_b, s0_b, s1_b = _k_pair(
                acc, i, n_blocks, w_a, s0_a, s1_a, w_b, s0_b, s1_b, w_ptrs, s_ptrs, x_smem, x_ptrs, mask_xm, N,
                WORDS, INT4, BF16, DT, AHEAD, STAGES, a_l)
            if AHEAD == 4:
                if i + 2 < n_blocks:
                    acc, w_c, s0_c, s1_c, w_d, s0_d, s1_d = _k_pair(
                        acc, i + 2, n_blocks, w_c, s0_c, s1_c, w_d, s0_d, s1_d, w_ptrs, s_ptrs, x_smem, x_ptrs,
                        mask_xm, N, WORDS, INT4, BF16, DT, AHEAD, STAGES, a_l)
    else:
        for i in range(0, n_blocks, AHEAD):
            acc, w_a, s0_a, s1_a = _k_block(acc, i, n_blocks, w_a, s0_a, s1_a, w_ptrs, s_ptrs, x_smem, x_ptrs,
                                            mask_xm, N, WORDS, INT4, BF16, DT, AHEAD, STAGES, a_l)
            if i + 1 < n_blocks:
                acc, w_b, s0_b, s1_b = _k_block(acc, i + 1, n_blocks, w_b, s0_b, s1_b, w_ptrs, s_ptrs, x_smem,
                                                x_ptrs, mask_xm, N, WORDS, INT4, BF16, DT, AHEAD, STAGES, a_l)
            if AHEAD >= 3:
                if i + 2 < n_blocks:
                    acc, w_c, s0_c, s1_c = _k_block(acc, i + 2, n_blocks, w_c, s0_c, s1_c, w_ptrs, s_ptrs, x_smem,
                                                    x_ptrs, mask_xm, N, WORDS, INT4, BF16, DT, AHEAD, STAGES, a_l)
            if AHEAD == 4:
                if i + 3 < n_blocks:
                    acc, w_d, s0_d, s1_d = _k_block(acc, i + 3, n_blocks, w_d, s0_d, s1_d, w_ptrs, s_ptrs, x_smem,
                                                    x_ptrs, mask_xm, N, WORDS, INT4, BF16, DT, AHEAD, STAGES, a_l)

    _store_result(acc, s_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, tile, pid_n, pid_m, pid_k, M, N, stride_ym,
                  INT4, HAS_BIAS, SPLIT_K, ROWS, BLOCK_M, acc_l, not SUM_KERNEL)


@gluon.jit
def _store_result(acc, s_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, tile, pid_n, pid_m, pid_k, M, N, stride_ym,
                  INT4: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, ROWS: gl.constexpr,
                  BLOCK_M: gl.constexpr, acc_l: gl.constexpr, SUM_HERE: gl.constexpr = True):
    """The tile's fp32 sum → y (one split), or its partial, the last split to arrive summing them in split order
    (``SUM_HERE``; else the split sum kernel does)."""
    offs_n = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_l))
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_l))
    mask = (offs_m < M)[None, :] & (offs_n < N)[:, None]
    if SPLIT_K > 1:
        offs = offs_n[:, None].to(gl.int64) + offs_m[None, :].to(gl.int64) * N  # partials [SPLIT_K, M, N]
        gl.store(part_ptr + pid_k.to(gl.int64) * M * N + offs, acc, mask=mask)
        if SUM_HERE:
            arrived = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel")  # our partial is visible before the count
            if arrived == SPLIT_K - 1:
                acc = gl.load(part_ptr + offs, mask=mask, other=0.0)
                for s in range(1, SPLIT_K):
                    # (s · N) widened first: M may be specialized to the constant 1, which has no .to
                    acc += gl.load(part_ptr + (s * N).to(gl.int64) * M + offs, mask=mask, other=0.0)
                gl.store(count_ptr + tile, 0)
                _epilogue(acc, s_ptr, bias_ptr, y_ptr, offs_n, offs_m, mask, stride_ym, INT4, HAS_BIAS)
    else:
        _epilogue(acc, s_ptr, bias_ptr, y_ptr, offs_n, offs_m, mask, stride_ym, INT4, HAS_BIAS)


@gluon.jit
def _epilogue(acc, s_ptr, bias_ptr, y_ptr, offs_n, offs_m, mask, stride_ym, INT4: gl.constexpr,
              HAS_BIAS: gl.constexpr):
    """w4a16's / w8a16's epilogue: (int8: the fp32 per-channel scale), + bias in fp32, one rounding."""
    if not INT4:
        acc = acc * gl.load(s_ptr + offs_n).to(gl.float32)[:, None]
    if HAS_BIAS:
        acc += gl.load(bias_ptr + offs_n).to(gl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(gl.int64) * stride_ym + offs_n[:, None]
    gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _load_halves(w_ptrs, s_ptrs, i, n_blocks, N, WORDS: gl.constexpr, INT4: gl.constexpr, DT: gl.constexpr):
    """K-block i's weight words as its two k64 halves (w_ptrs: a thread's first half) and the int4 scales."""
    w_lo, s0, s1 = _load_block(w_ptrs, s_ptrs, i, n_blocks, N, WORDS, INT4, DT)
    w_hi = gl.load(w_ptrs + i * (128 * WORDS) + WORDS // 2, mask=i < n_blocks)
    return w_lo, w_hi, s0, s1


@gluon.jit
def _issue_x(x_desc, x_lo, x_hi, ready, i, off_m, k, STAGES: gl.constexpr, pred):
    """TMA of K-block i's x tile [BLOCK_M, 128] as two k64 halves into stage i % STAGES."""
    bar = ready.index(i % STAGES)
    mbarrier.expect(bar, 2 * x_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(x_desc, [off_m, k], bar, x_lo.index(i % STAGES), pred=pred)
    tma.async_copy_global_to_shared(x_desc, [off_m, k + 64], bar, x_hi.index(i % STAGES), pred=pred)


@gluon.jit
def _k_block_tma(acc, i, n_blocks, w_lo, w_hi, s0, s1, w_ptrs, s_ptrs, x_desc, x_lo, x_hi, ready, off_m, k_start, N,
                 WORDS: gl.constexpr, INT4: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr, AHEAD: gl.constexpr,
                 STAGES: gl.constexpr, OVERLAP: gl.constexpr, a_l: gl.constexpr):
    """K-block i in two k64 halves (half the A registers of a whole block); block i + AHEAD's words into the same
    registers; once every warpgroup is done with x's stage, its refill with block i + STAGES. OVERLAP (probe only:
    slower on the H100) converts the second half while the first half's MMAs run."""
    a = _fragments(w_lo, s0[:, None], s1[:, None], INT4, BF16, a_l)
    mbarrier.wait(ready.index(i % STAGES), (i // STAGES) & 1)
    acc = warpgroup_mma(a, x_lo.index(i % STAGES).permute((1, 0)), acc, is_async=True)
    if not OVERLAP:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))[0]
    b = _fragments(w_hi, s0[:, None], s1[:, None], INT4, BF16, a_l)
    w_lo, w_hi, s0, s1 = _load_halves(w_ptrs, s_ptrs, i + AHEAD, n_blocks, N, WORDS, INT4, DT)
    acc = warpgroup_mma(b, x_hi.index(i % STAGES).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a, b))[0]
    gl.thread_barrier()  # every warpgroup's MMAs on the stage are complete
    nxt = i + STAGES
    _issue_x(x_desc, x_lo, x_hi, ready, nxt, off_m, k_start + nxt * TILE_K, STAGES, nxt < n_blocks)
    return acc, w_lo, w_hi, s0, s1


@gluon.jit
def _fragment_gemm_tma_kernel(x_desc, w_ptr, s_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N, K, K_PER_SPLIT,
                              stride_ym, INT4: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                              SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr,
                              AHEAD: gl.constexpr, OVERLAP: gl.constexpr, SERIAL: gl.constexpr,
                              PDL: gl.constexpr = 0):
    """Batch tiles: WG warpgroups (64 weight rows each) share one x tile that TMA brings in; the same k16 chain,
    dequantization and rounding as ``_fragment_gemm_kernel`` (so the same bits). SERIAL: one program per tile runs
    the SPLIT_K ranges one after the other and sums them in registers, in split order (the partials' bits without
    the partials). PDL: see ``_early_launch``."""
    _early_launch(PDL)
    WORDS: gl.constexpr = 8 if INT4 else 16
    HW: gl.constexpr = WORDS // 2
    ROWS: gl.constexpr = 64 * WG
    DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    num_pid_m = gl.cdiv(M, BLOCK_M)
    tile = gl.program_id(0)
    pid_n = tile // num_pid_m
    pid_m = tile % num_pid_m
    pid_k = gl.program_id(1)
    w_ld: gl.constexpr = gl.BlockedLayout([1, HW], [32, 1], [4 * WG, 1], [1, 0])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * WG, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    x_lo = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, 64], x_desc.layout)
    x_hi = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, 64], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for t in gl.static_range(STAGES):
        mbarrier.init(ready.index(t), count=1)

    if SERIAL:  # one stream over the whole K; ranges of K_PER_SPLIT end in _range_end
        k_start = 0
        n_blocks = K // TILE_K
    else:
        k_start = pid_k * K_PER_SPLIT
        n_blocks = gl.minimum(K - k_start, K_PER_SPLIT) // TILE_K
    range_blocks = K_PER_SPLIT // TILE_K
    kb0 = k_start // TILE_K
    off_m = pid_m * BLOCK_M
    for t in gl.static_range(STAGES):
        _issue_x(x_desc, x_lo, x_hi, ready, t, off_m, k_start + t * TILE_K, STAGES, t < n_blocks)
    thr = gl.arange(0, 128 * WG, layout=gl.SliceLayout(1, w_ld))
    row_block = pid_n * WG + thr // 128
    w_ptrs = (w_ptr + (row_block.to(gl.int64) * (K // TILE_K) + kb0)[:, None] * (128 * WORDS)
              + ((thr % 128) * WORDS)[:, None] + gl.arange(0, HW, layout=gl.SliceLayout(0, w_ld))[None, :])
    s_ptrs = s_ptr + kb0.to(gl.int64) * N + row_block * TILE_N + (thr % 128 // 32) * 16 + (thr % 32) // 4

    lo_a, hi_a, s0_a, s1_a = _load_halves(w_ptrs, s_ptrs, 0, n_blocks, N, WORDS, INT4, DT)
    lo_b, hi_b, s0_b, s1_b = _load_halves(w_ptrs, s_ptrs, 1, n_blocks, N, WORDS, INT4, DT)
    lo_c, hi_c, s0_c, s1_c = lo_b, hi_b, s0_b, s1_b  # AHEAD = 3
    if AHEAD == 3:
        lo_c, hi_c, s0_c, s1_c = _load_halves(w_ptrs, s_ptrs, 2, n_blocks, N, WORDS, INT4, DT)
    acc = gl.zeros([ROWS, BLOCK_M], gl.float32, acc_l)
    total = acc  # SERIAL: the ranges summed so far
    for i in range(0, n_blocks, AHEAD):
        acc, lo_a, hi_a, s0_a, s1_a = _k_block_tma(acc, i, n_blocks, lo_a, hi_a, s0_a, s1_a, w_ptrs, s_ptrs, x_desc,
                                                   x_lo, x_hi, ready, off_m, k_start, N, WORDS, INT4, BF16, DT,
                                                   AHEAD, STAGES, OVERLAP, a_l)
        acc, total = _range_end(acc, total, i, n_blocks, range_blocks, SERIAL)
        if i + 1 < n_blocks:
            acc, lo_b, hi_b, s0_b, s1_b = _k_block_tma(acc, i + 1, n_blocks, lo_b, hi_b, s0_b, s1_b, w_ptrs, s_ptrs,
                                                       x_desc, x_lo, x_hi, ready, off_m, k_start, N, WORDS, INT4,
                                                       BF16, DT, AHEAD, STAGES, OVERLAP, a_l)
            acc, total = _range_end(acc, total, i + 1, n_blocks, range_blocks, SERIAL)
        if AHEAD == 3:
            if i + 2 < n_blocks:
                acc, lo_c, hi_c, s0_c, s1_c = _k_block_tma(acc, i + 2, n_blocks, lo_c, hi_c, s0_c, s1_c, w_ptrs,
                                                           s_ptrs, x_desc, x_lo, x_hi, ready, off_m, k_start, N,
                                                           WORDS, INT4, BF16, DT, AHEAD, STAGES, OVERLAP, a_l)
                acc, total = _range_end(acc, total, i + 2, n_blocks, range_blocks, SERIAL)
    for t in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(t))
    if SERIAL:
        _store_result(total, s_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, tile, pid_n, pid_m, pid_k, M, N, stride_ym,
                      INT4, HAS_BIAS, 1, ROWS, BLOCK_M, acc_l)
    else:
        _store_result(acc, s_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, tile, pid_n, pid_m, pid_k, M, N, stride_ym,
                      INT4, HAS_BIAS, SPLIT_K, ROWS, BLOCK_M, acc_l)


@gluon.jit
def _range_end(acc, total, j, n_blocks, range_blocks, SERIAL: gl.constexpr):
    """SERIAL: after K-block j, a finished split range's sum joins the total in split order (the first range's as
    it is, not 0 + it: the partials' sum keeps a -0)."""
    if SERIAL:
        if ((j + 1) % range_blocks == 0) | (j + 1 == n_blocks):
            total = gl.where(j < range_blocks, acc, total + acc)
            acc = gl.zeros_like(acc)
    return acc, total


def _rows_16_byte_aligned(x2: torch.Tensor) -> torch.Tensor:
    """x2 itself where its rows are contiguous and start on 16-byte boundaries (what both kernels' x copies need),
    else a contiguous copy."""
    if x2.stride(1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        return x2.contiguous()
    return x2


def x_descriptor(x2: torch.Tensor, block_m: int):
    """TMA descriptor of x [M, K] in [block_m, 64] boxes (128-byte swizzle, wgmma's B operand layout)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dt = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(x2, [block_m, 64], gl.NVMMASharedLayout.get_default_for([block_m, 64], dt))


def launch_tma(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias, y: torch.Tensor, plan,
               block_m: int, int4: bool = True, stages: int = 3, warpgroups: int = 2, ahead: int = 2,
               overlap: bool = False, pdl: int = 0) -> None:
    """``launch``'s batch-tile kernel: x through TMA, ``warpgroups`` 64-row tiles per program sharing it; a plan
    with ``serial`` runs its split ranges in one program per tile. ``pdl``: ``_early_launch``'s mode."""
    M, K = x2.shape
    N = y.shape[1]
    if ahead not in (2, 3):
        raise ValueError(f"ahead={ahead}: 2 or 3 K-blocks of weight words in flight")
    if N % (64 * warpgroups):
        raise ValueError(f"N={N} is not a multiple of {64 * warpgroups} rows ({warpgroups} warpgroups)")
    x2 = _rows_16_byte_aligned(x2)  # TMA's boxes
    num_tiles = (N // (64 * warpgroups)) * ((M + block_m - 1) // block_m)
    _fragment_gemm_tma_kernel[(num_tiles, plan.grid_k)](
        x_descriptor(x2, block_m), words, scales.contiguous(), bias if bias is not None else scales, y,
        plan.partials, plan.counters, M, N, K, plan.k_per_split, y.stride(0),
        INT4=int4, BF16=x2.dtype == torch.bfloat16, HAS_BIAS=bias is not None, SPLIT_K=plan.split_k,
        BLOCK_M=block_m, STAGES=stages, WG=warpgroups, AHEAD=ahead, OVERLAP=overlap, SERIAL=plan.serial,
        PDL=pdl, num_warps=4 * warpgroups, **dependent_launch(pdl > 0))


def launch(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias, y: torch.Tensor, plan,
           block_m: int, int4: bool = True, stages: int = STAGES, warpgroups: int = 1, ahead: int = 2,
           pdl: int = 0, sum_kernel: bool = False, sum_pdl=None, pair: bool = False, max_regs: int = 0) -> None:
    """y [M, N] = x2 [M, K] · Wᵀ for fragment-major ``words`` (int4: scales [K // 128, N]; int8: [N]).
    ``plan``: a ``SplitPlan`` with ``serial`` off, its counters for ``N // (64 · warpgroups) · cdiv(M, block_m)``
    tiles; ``warpgroups``: 64-row tiles per program (N must be a multiple of 64 · warpgroups); ``ahead``: K-blocks
    of weight words in flight (2-4); ``pdl``: programmatic dependent launch (the kernel starts loading weights
    while the previous kernel of the stream finishes; the kernel's PDL mode); ``sum_kernel``: a split plan's
    partials summed by ``launch_split_sum`` instead of by the last program of each tile, launched in PDL mode
    ``sum_pdl`` (None: ``pdl``); ``pair``: two K-blocks per wgmma group (same bits; K and the split ranges
    multiples of 256, ``ahead`` 2 or 4, ``stages`` ≥ 4); ``max_regs``: a register cap per thread (0: none)."""
    M, K = x2.shape
    if ahead not in (2, 3, 4):
        raise ValueError(f"ahead={ahead}: 2, 3 or 4 K-blocks of weight words in flight")
    if pair and (ahead == 3 or stages < 4 or K % 256 or plan.k_per_split % 256):
        raise ValueError(f"pair needs ahead 2 or 4 (got {ahead}), stages >= 4 (got {stages}) and K and the split "
                         f"ranges multiples of 256 (K={K}, {plan.k_per_split} per split)")
    N = y.shape[1]
    x2 = _rows_16_byte_aligned(x2)  # cp.async copies 16-byte runs
    scales = scales.contiguous()
    if N % (64 * warpgroups):
        raise ValueError(f"N={N} is not a multiple of {64 * warpgroups} rows ({warpgroups} warpgroups)")
    num_tiles = (N // (64 * warpgroups)) * ((M + block_m - 1) // block_m)
    sum_kernel = sum_kernel and plan.split_k > 1
    _fragment_gemm_kernel[(num_tiles, plan.split_k)](
        x2, words, scales, bias if bias is not None else scales, y, plan.partials, plan.counters,
        M, N, K, plan.k_per_split, x2.stride(0), y.stride(0),
        INT4=int4, BF16=x2.dtype == torch.bfloat16, HAS_BIAS=bias is not None, SPLIT_K=plan.split_k,
        BLOCK_M=block_m, STAGES=stages, WG=warpgroups, AHEAD=ahead, PDL=pdl, SUM_KERNEL=sum_kernel, PAIR=pair,
        num_warps=4 * warpgroups, **({"maxnreg": max_regs} if max_regs else {}), **dependent_launch(pdl > 0))
    if sum_kernel:
        launch_split_sum(plan.partials, y, None if int4 else scales, bias, pdl if sum_pdl is None else sum_pdl)


# ------------------------------------------------------------------------------------------------ piped tiles
@gluon.jit
def _issue_x_half(x_desc, x_ring, ready, j, off_m, k, HS: gl.constexpr, pred):
    """TMA of the stream's k64 half j of x [BLOCK_M, 64] into slot j % HS."""
    bar = ready.index(j % HS)
    mbarrier.expect(bar, x_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(x_desc, [off_m, k], bar, x_ring.index(j % HS), pred=pred)


@gluon.jit
def _piped_half(acc, a_prev, j, w, s0, s1, x_desc, x_ring, ready, off_m, k_start, n_halves, INT4: gl.constexpr,
                BF16: gl.constexpr, HS: gl.constexpr, a_l: gl.constexpr):
    """Half j (k64) of the stream: its words converted into a second A register set while MMA j - 1 (on a_prev)
    runs, one async wgmma on x's half j, then MMA j - 1 waited for (one group left in flight) and x's slot of half
    j - 1 refilled with half j - 1 + HS. Returns (acc, this half's A registers, still read by MMA j)."""
    a = _fragments(w, s0[:, None], s1[:, None], INT4, BF16, a_l)
    mbarrier.wait(ready.index(j % HS), (j // HS) & 1)
    acc = warpgroup_mma(a, x_ring.index(j % HS).permute((1, 0)), acc, is_async=True)
    acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
    gl.thread_barrier()  # every warpgroup's MMA j - 1 is complete
    nxt = j - 1 + HS
    _issue_x_half(x_desc, x_ring, ready, nxt, off_m, k_start + nxt * 64, HS, (j >= 1) & (nxt < n_halves))
    return acc, a


@gluon.jit
def _issue_words(w_ring, w_ptrs, i, n_blocks, WORDS: gl.constexpr, WS: gl.constexpr):
    """cp.async of K-block i's weight words (each thread its own run) into ring slot i % WS, one commit group per
    block. Past the stream it copies the last block again (unused; unmasked copies keep no predicate registers)."""
    cp.async_copy_global_to_shared(w_ring.index(i % WS), w_ptrs + gl.minimum(i, n_blocks - 1) * (128 * WORDS))
    cp.commit_group()


@gluon.jit
def _load_scales(s_ptrs, i, n_blocks, N, INT4: gl.constexpr, DT: gl.constexpr):
    """int4: K-block i's scales of the thread's two rows r0 and r0 + 8 (int8: unused zeros)."""
    if INT4:
        s0 = gl.load(s_ptrs + i * N, mask=i < n_blocks).to(DT)
        s1 = gl.load(s_ptrs + i * N + 8, mask=i < n_blocks).to(DT)
    else:
        s0 = gl.full(s_ptrs.shape, 0, DT, s_ptrs.type.layout)
        s1 = s0
    return s0, s1


@gluon.jit
def _piped_block(acc, a, total, i, n_blocks, s0, s1, w_ring, w_ptrs, s_ptrs, x_desc, x_ring, ready, off_m,
                 range_blocks, N, WORDS: gl.constexpr, INT4: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr,
                 WS: gl.constexpr, HS: gl.constexpr, SERIAL: gl.constexpr, w_ld: gl.constexpr, a_l: gl.constexpr):
    """K-block i as two piped halves, its words read back from the ring (each thread reads only what its own
    cp.async wrote: no barrier), then block i + WS - 1's words into the slot just read; block i + 2's scales into
    the registers of block i's. SERIAL: a finished split range's sum joins the total once its MMAs are complete."""
    HW: gl.constexpr = WORDS // 2
    cp.wait_group(WS - 2)  # block i's group is complete (the WS - 2 after it may still fly)
    slot = w_ring.index(i % WS)
    w_lo = slot.slice(0, HW, dim=1).load(w_ld)
    acc, a = _piped_half(acc, a, 2 * i, w_lo, s0, s1, x_desc, x_ring, ready, off_m, 0, 2 * n_blocks, INT4, BF16, HS,
                         a_l)
    w_hi = slot.slice(HW, HW, dim=1).load(w_ld)
    _issue_words(w_ring, w_ptrs, i + WS - 1, n_blocks, WORDS, WS)
    acc, a = _piped_half(acc, a, 2 * i + 1, w_hi, s0, s1, x_desc, x_ring, ready, off_m, 0, 2 * n_blocks, INT4, BF16,
                         HS, a_l)
    s0, s1 = _load_scales(s_ptrs, i + 2, n_blocks, N, INT4, DT)
    if SERIAL:
        if ((i + 1) % range_blocks == 0) | (i + 1 == n_blocks):
            acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
            total = gl.where(i < range_blocks, acc, total + acc)
            acc = gl.zeros_like(acc)
    return acc, a, total, s0, s1


@gluon.jit
def _fragment_gemm_piped_kernel(x_desc, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, K_PER_SPLIT, stride_ym,
                                INT4: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                                BLOCK_M: gl.constexpr, HS: gl.constexpr, WG: gl.constexpr, WS: gl.constexpr,
                                SERIAL: gl.constexpr, PDL: gl.constexpr = 0):
    """Piped batch tiles: the batch tiles' operands (each warpgroup its 64 weight rows as wgmma's A operand from
    the registers its words are converted in, x [BLOCK_M, 64] halves by TMA as B), but the MMAs stay in flight:
    a warpgroup converts half j + 1 into a second A register set while half j's MMAs run, and waits only for the
    MMAs before them. x arrives in a ring of HS k64 halves, the weight words by cp.async in a ring of WS K-blocks
    (in shared memory, not registers). Unsplit weights, or SERIAL split ranges. PDL: see ``_early_launch``."""
    _early_launch(PDL)
    WORDS: gl.constexpr = 8 if INT4 else 16
    HW: gl.constexpr = WORDS // 2
    ROWS: gl.constexpr = 64 * WG
    DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    num_pid_m = gl.cdiv(M, BLOCK_M)
    tile = gl.program_id(0)
    pid_n = tile // num_pid_m
    pid_m = tile % num_pid_m
    w_cp: gl.constexpr = gl.BlockedLayout([1, WORDS], [32, 1], [4 * WG, 1], [1, 0])  # a thread's whole run
    w_ld: gl.constexpr = gl.BlockedLayout([1, HW], [32, 1], [4 * WG, 1], [1, 0])  # one k64 half of it
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * WG, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    x_ring = gl.allocate_shared_memory(DT, [HS, BLOCK_M, 64], x_desc.layout)
    # a thread's run of words is one row; its 16-byte vectors XOR-swizzled by the row, so that the 8 threads of a
    # quarter warp reading a 16-byte vector each hit 8 different bank groups (int8 rows are 64 bytes: unswizzled,
    # 4-way conflicts)
    w_ring = gl.allocate_shared_memory(gl.int32, [WS, 128 * WG, WORDS], gl.SwizzledSharedLayout(
        vec=4, per_phase=1, max_phase=WORDS // 4, order=[1, 0]))
    ready = gl.allocate_shared_memory(gl.int64, [HS, 1], mbarrier.MBarrierLayout())
    for t in gl.static_range(HS):
        mbarrier.init(ready.index(t), count=1)

    n_blocks = K // TILE_K  # split weights run SERIAL: one stream over the whole K, ranges of K_PER_SPLIT
    range_blocks = K_PER_SPLIT // TILE_K
    off_m = pid_m * BLOCK_M
    for t in gl.static_range(HS):
        _issue_x_half(x_desc, x_ring, ready, t, off_m, t * 64, HS, t < 2 * n_blocks)
    thr = gl.arange(0, 128 * WG, layout=gl.SliceLayout(1, w_cp))
    row_block = pid_n * WG + thr // 128
    w_offs = ((row_block.to(gl.int64) * (K // TILE_K))[:, None] * (128 * WORDS) + ((thr % 128) * WORDS)[:, None]
              + gl.arange(0, WORDS, layout=gl.SliceLayout(0, w_cp))[None, :])
    w_ptrs = w_ptr + w_offs
    for t in gl.static_range(WS - 1):
        _issue_words(w_ring, w_ptrs, t, n_blocks, WORDS, WS)
    thr_s = gl.arange(0, 128 * WG, layout=gl.SliceLayout(1, w_ld))
    s_ptrs = s_ptr + (pid_n * WG + thr_s // 128) * TILE_N + (thr_s % 128 // 32) * 16 + (thr_s % 32) // 4
    s0_a, s1_a = _load_scales(s_ptrs, 0, n_blocks, N, INT4, DT)
    s0_b, s1_b = _load_scales(s_ptrs, 1, n_blocks, N, INT4, DT)
    acc = gl.zeros([ROWS, BLOCK_M], gl.float32, acc_l)
    a = gl.zeros([ROWS, 64], DT, a_l)  # no MMA in flight yet
    total = acc  # SERIAL: the ranges summed so far
    for i in range(0, n_blocks, 2):
        acc, a, total, s0_a, s1_a = _piped_block(
            acc, a, total, i, n_blocks, s0_a, s1_a, w_ring, w_ptrs, s_ptrs, x_desc, x_ring, ready, off_m,
            range_blocks, N, WORDS, INT4, BF16, DT, WS, HS, SERIAL, w_ld, a_l)
        if i + 1 < n_blocks:
            acc, a, total, s0_b, s1_b = _piped_block(
                acc, a, total, i + 1, n_blocks, s0_b, s1_b, w_ring, w_ptrs, s_ptrs, x_desc, x_ring, ready,
                off_m, range_blocks, N, WORDS, INT4, BF16, DT, WS, HS, SERIAL, w_ld, a_l)
    acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
    cp.wait_group(0)
    for t in gl.static_range(HS):
        mbarrier.invalidate(ready.index(t))
    if SERIAL:
        acc = total
    _store_result(acc, s_ptr, bias_ptr, y_ptr, s_ptr, s_ptr, tile, pid_n, pid_m, 0, M, N, stride_ym,
                  INT4, HAS_BIAS, 1, ROWS, BLOCK_M, acc_l)


def launch_piped(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias, y: torch.Tensor, plan,
                 block_m: int = 256, int4: bool = True, halves: int = 4, warpgroups: int = 2,
                 max_regs: int = 0, word_stages: int = 3, pdl: int = 0) -> None:
    """``_fragment_gemm_piped_kernel``: unsplit weights or a ``serial`` plan (no partials). ``max_regs``: ptxas's
    register cap (0: none); ``pdl``: ``_early_launch``'s mode."""
    M, K = x2.shape
    N = y.shape[1]
    if plan.split_k > 1 and not plan.serial:
        raise ValueError("piped tiles run split weights serially (plan.serial)")
    if N % (64 * warpgroups):
        raise ValueError(f"N={N} is not a multiple of {64 * warpgroups} rows ({warpgroups} warpgroups)")
    x2 = _rows_16_byte_aligned(x2)
    num_tiles = (N // (64 * warpgroups)) * ((M + block_m - 1) // block_m)
    _fragment_gemm_piped_kernel[(num_tiles,)](
        x_descriptor(x2, block_m), words, scales.contiguous(), bias if bias is not None else scales, y,
        M, N, K, plan.k_per_split, y.stride(0),
        INT4=int4, BF16=x2.dtype == torch.bfloat16, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, HS=halves, WG=warpgroups, WS=word_stages, SERIAL=plan.serial, PDL=pdl,
        num_warps=4 * warpgroups, **({"maxnreg": max_regs} if max_regs else {}), **dependent_launch(pdl > 0))


# ------------------------------------------------------------------------------------------------ paired tiles
@gluon.jit
def _x_ring(x_desc, DT: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """A ring of STAGES x stages for a loader warp and its consumers: two k64 halves [BLOCK_M, 64] per stage (TMA
    boxes), a 'ready' barrier per stage (its TMA landed) and an 'empty' one (its consumers are done), initialised.
    Returns (x_lo, x_hi, ready, empty)."""
    x_lo = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, 64], x_desc.layout)
    x_hi = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, 64], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for t in gl.static_range(STAGES):
        mbarrier.init(ready.index(t), count=1)
        mbarrier.init(empty.index(t), count=1)
    return x_lo, x_hi, ready, empty


@gluon.jit
def _range_exchange(PARTS: gl.constexpr, BLOCK_M: gl.constexpr):
    """Shared memory through which consumers 1 … PARTS - 1 of a paired / parts tile hand their range sums to
    consumer 0: (xchg [PARTS - 1, 64, BLOCK_M] fp32, full: a part's sum is in, spent: consumer 0 has read it)."""
    xchg = gl.allocate_shared_memory(gl.float32, [PARTS - 1, 64, BLOCK_M],
                                     gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    full = gl.allocate_shared_memory(gl.int64, [PARTS - 1, 1], mbarrier.MBarrierLayout())
    spent = gl.allocate_shared_memory(gl.int64, [PARTS - 1, 1], mbarrier.MBarrierLayout())
    for t in gl.static_range(PARTS - 1):
        mbarrier.init(full.index(t), count=1)
        mbarrier.init(spent.index(t), count=1)
    return xchg, full, spent


@gluon.jit
def _split_tile_rows(w_ptr, s_ptr, M, K, BLOCK_M: gl.constexpr, WORDS: gl.constexpr):
    """A one-tile-per-program warpgroup's place (paired and parts tiles): (tile, its 64-row tile, its token tile,
    the thread's word pointers [128, WORDS // 2] at the row tile's first K-block, its first scale pointer)."""
    HW: gl.constexpr = WORDS // 2
    num_pid_m = gl.cdiv(M, BLOCK_M)
    tile = gl.program_id(0)
    pid_n = tile // num_pid_m
    w_ld: gl.constexpr = gl.BlockedLayout([1, HW], [32, 1], [4, 1], [1, 0])
    thr = gl.arange(0, 128, layout=gl.SliceLayout(1, w_ld))
    w_row = (w_ptr + pid_n.to(gl.int64) * (K // TILE_K) * (128 * WORDS) + (thr * WORDS)[:, None]
             + gl.arange(0, HW, layout=gl.SliceLayout(0, w_ld))[None, :])
    s_row = s_ptr + pid_n * TILE_N + (thr // 32) * 16 + (thr % 32) // 4
    return tile, pid_n, tile % num_pid_m, w_row, s_row


@gluon.jit
def _paired_block(acc, i, n, w_lo, w_hi, s0, s1, w_row, s_row, x_lo, x_hi, ready, empty, N, PART: gl.constexpr,
                  RB: gl.constexpr, WORDS: gl.constexpr, INT4: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr,
                  STAGES: gl.constexpr, a_l: gl.constexpr):
    """Stream block i as the batch tiles' K-block (two k64 halves), block i + 2's words into the same registers;
    x's stage handed back to the loader once the warpgroup's MMAs on it are complete."""
    a = _fragments(w_lo, s0[:, None], s1[:, None], INT4, BF16, a_l)
    mbarrier.wait(ready.index(i % STAGES), (i // STAGES) & 1)
    acc = warpgroup_mma(a, x_lo.index(i % STAGES).permute((1, 0)), acc, is_async=True)
    b = _fragments(w_hi, s0[:, None], s1[:, None], INT4, BF16, a_l)
    w_lo, w_hi, s0, s1 = _parts_words(w_row, s_row, i + 2, n, N, PART, 2, RB, WORDS, INT4, DT)
    # the second half's MMAs chained behind the first's (same k16 order), one wait for both: H200, µs waiting after
    # each half → once, int8 4096×4096 M = 256 21.6 → 20.7, 4096×14336 M = 256 67.5 → 65.0, 8192×28672 M = 128
    # 132.3 → 128.6 (2-5 % on all 24 probe cases)
    acc = warpgroup_mma(b, x_hi.index(i % STAGES).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a, b))[0]
    # the warpgroup's MMAs on the stage are complete: one arrival hands it back to the loader
    mbarrier.arrive(empty.index(i % STAGES))
    return acc, w_lo, w_hi, s0, s1


@gluon.jit
def _paired_consumer(x_lo, x_hi, ready, empty, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                     stride_ym, PART: gl.constexpr, INT4: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                     SPLIT_K: gl.constexpr, RB: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup of a paired tile: split ranges PART, PART + 2, … of 64 weight rows × BLOCK_M tokens. Consumer
    0 ends with the tile's epilogue."""
    WORDS: gl.constexpr = 8 if INT4 else 16
    DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    tile, pid_n, pid_m, w_row, s_row = _split_tile_rows(w_ptr, s_ptr, M, K, BLOCK_M, WORDS)
    n = (SPLIT_K // 2) * RB  # this consumer's stream
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    lo_a, hi_a, s0_a, s1_a = _parts_words(w_row, s_row, 0, n, N, PART, 2, RB, WORDS, INT4, DT)
    lo_b, hi_b, s0_b, s1_b = _parts_words(w_row, s_row, 1, n, N, PART, 2, RB, WORDS, INT4, DT)
    acc = gl.zeros([64, BLOCK_M], gl.float32, acc_l)
    total = acc
    for i in range(0, n, 2):
        acc, lo_a, hi_a, s0_a, s1_a = _paired_block(acc, i, n, lo_a, hi_a, s0_a, s1_a, w_row, s_row, x_lo, x_hi,
                                                    ready, empty, N, PART, RB, WORDS, INT4, BF16, DT, STAGES, a_l)
        acc, total = _parts_range_end(acc, total, i, xchg, full, spent, PART, 2, RB, acc_l)
        if i + 1 < n:
            acc, lo_b, hi_b, s0_b, s1_b = _paired_block(acc, i + 1, n, lo_b, hi_b, s0_b, s1_b, w_row, s_row, x_lo,
                                                        x_hi, ready, empty, N, PART, RB, WORDS, INT4, BF16, DT,
                                                        STAGES, a_l)
            acc, total = _parts_range_end(acc, total, i + 1, xchg, full, spent, PART, 2, RB, acc_l)
    if PART == 0:
        _store_result(total, s_ptr, bias_ptr, y_ptr, s_ptr, s_ptr, tile, pid_n, pid_m, 0, M, N, stride_ym,
                      INT4, HAS_BIAS, 1, 64, BLOCK_M, acc_l)


@gluon.jit
def _paired_loader(x_desc, x0_lo, x0_hi, ready0, empty0, x1_lo, x1_hi, ready1, empty1, M, SPLIT_K: gl.constexpr,
                   RB: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """One warp: both consumers' x tiles by TMA, each stage refilled once its consumer handed it back."""
    off_m = gl.program_id(0) % gl.cdiv(M, BLOCK_M) * BLOCK_M
    for i in range(0, (SPLIT_K // 2) * RB):
        phase = ((i // STAGES) & 1) ^ 1  # (the first round passes: the phase before a fresh barrier's first)
        mbarrier.wait(empty0.index(i % STAGES), phase)
        _issue_x(x_desc, x0_lo, x0_hi, ready0, i, off_m, _parts_kb(i, 0, 2, RB) * TILE_K, STAGES, True)
        mbarrier.wait(empty1.index(i % STAGES), phase)
        _issue_x(x_desc, x1_lo, x1_hi, ready1, i, off_m, _parts_kb(i, 1, 2, RB) * TILE_K, STAGES, True)


@gluon.jit
def _fragment_gemm_paired_kernel(x_desc, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, stride_ym, INT4: gl.constexpr,
                                 BF16: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
                                 RB: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                                 CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, PDL: gl.constexpr = 0):
    """Paired tiles (split weights): two warpgroups on one tile of 64 weight rows × BLOCK_M tokens, warp-specialized:
    the default partition runs the even split ranges, a worker warpgroup the odd ones, each with its own x ring that
    a loader warp fills by TMA; the odd consumer hands each range's fp32 sum over through shared memory, and the
    even one sums them in split order. Same k16 chains and sums as the serial batch tiles (so the decode tiles'
    bits), with two warpgroups' MMAs on an SM where the serial tiles have one (split weights give ~one 64-row ×
    128-token tile per SM there), and no CTA barrier around the TMA issues in the consumers' loops. PDL: see
    ``_early_launch``."""
    _early_launch(PDL)
    DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    x0_lo, x0_hi, ready0, empty0 = _x_ring(x_desc, DT, BLOCK_M, STAGES)
    x1_lo, x1_hi, ready1, empty1 = _x_ring(x_desc, DT, BLOCK_M, STAGES)
    xchg, full, spent = _range_exchange(2, BLOCK_M)
    gl.warp_specialize([
        (_paired_consumer, (x0_lo, x0_hi, ready0, empty0, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                            stride_ym, 0, INT4, BF16, HAS_BIAS, SPLIT_K, RB, BLOCK_M, STAGES)),
        (_paired_consumer, (x1_lo, x1_hi, ready1, empty1, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                            stride_ym, 1, INT4, BF16, HAS_BIAS, SPLIT_K, RB, BLOCK_M, STAGES)),
        (_paired_loader, (x_desc, x0_lo, x0_hi, ready0, empty0, x1_lo, x1_hi, ready1, empty1, M, SPLIT_K, RB, BLOCK_M,
                          STAGES)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _split_tile_grid(x2: torch.Tensor, N: int, block_m: int) -> tuple[torch.Tensor, int]:
    """The paired and parts tiles' launch: (x2 as TMA reads it, one program per 64-row × block_m tile)."""
    if N % 64:
        raise ValueError(f"N={N} is not a multiple of 64 rows")
    return _rows_16_byte_aligned(x2), (N // 64) * triton.cdiv(x2.shape[0], block_m)


def launch_paired(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias, y: torch.Tensor, plan,
                  block_m: int = 128, int4: bool = True, stages: int = 2, consumer_regs: int = 232,
                  loader_regs: int = 40, pdl: int = 0) -> None:
    """``_fragment_gemm_paired_kernel`` for a split ``plan`` (an even split count of equal ranges); ``pdl``:
    ``_early_launch``'s mode."""
    M, K = x2.shape
    N = y.shape[1]
    rb = plan.k_per_split // 128
    if plan.split_k < 2 or plan.split_k % 2 or rb * plan.split_k * 128 != K:
        raise ValueError(f"paired tiles need an even split count of equal ranges (split {plan.split_k}, K={K})")
    x2, num_tiles = _split_tile_grid(x2, N, block_m)
    _fragment_gemm_paired_kernel[(num_tiles,)](
        x_descriptor(x2, block_m), words, scales.contiguous(), bias if bias is not None else scales, y,
        M, N, K, y.stride(0), INT4=int4, BF16=x2.dtype == torch.bfloat16, HAS_BIAS=bias is not None,
        SPLIT_K=plan.split_k, RB=rb, BLOCK_M=block_m, STAGES=stages, CONSUMER_REGS=consumer_regs,
        LOADER_REGS=loader_regs, PDL=pdl, num_warps=4, **dependent_launch(pdl > 0))


# ------------------------------------------------------------------------------------------------- parts tiles
@gluon.jit
def _parts_kb(i, PART: gl.constexpr, PARTS: gl.constexpr, RB: gl.constexpr):
    """The K-block of consumer PART's stream block i: it runs split ranges PART, PART + PARTS, … (RB K-blocks
    each) one after the other."""
    return (i // RB) * (PARTS * RB) + PART * RB + i % RB


@gluon.jit
def _parts_words(w_row, s_row, i, n, N, PART: gl.constexpr, PARTS: gl.constexpr, RB: gl.constexpr,
                 WORDS: gl.constexpr, INT4: gl.constexpr, DT: gl.constexpr):
    """Stream block i's weight words (two k64 halves) and int4 scales; masked past the stream."""
    kb = _parts_kb(i, PART, PARTS, RB)
    return _load_halves(w_row + kb * (128 * WORDS), s_row + kb * N, 0, (i < n).to(gl.int32), N, WORDS, INT4, DT)


@gluon.jit
def _parts_issue_x(x_desc, x_lo, x_hi, ready, i, n, off_m, PART: gl.constexpr, PARTS: gl.constexpr,
                   RB: gl.constexpr, STAGES: gl.constexpr):
    """TMA of consumer PART's stream block i (x [BLOCK_M, 128] as two k64 halves) into its slot; none past n."""
    slot = PART * STAGES + i % STAGES
    k = _parts_kb(i, PART, PARTS, RB) * TILE_K
    bar = ready.index(slot)
    mbarrier.expect(bar, 2 * x_desc.block_type.nbytes, pred=i < n)
    tma.async_copy_global_to_shared(x_desc, [off_m, k], bar, x_lo.index(slot), pred=i < n)
    tma.async_copy_global_to_shared(x_desc, [off_m, k + 64], bar, x_hi.index(slot), pred=i < n)


@gluon.jit
def _parts_block(acc, i, n, w_lo, w_hi, s0, s1, w_row, s_row, x_desc, x_lo, x_hi, ready, off_m, N,
                 PART: gl.constexpr, PARTS: gl.constexpr, RB: gl.constexpr, WORDS: gl.constexpr, INT4: gl.constexpr,
                 BF16: gl.constexpr, DT: gl.constexpr, STAGES: gl.constexpr, a_l: gl.constexpr):
    """Stream block i as the paired tiles' K-block on consumer PART's slot of the x ring; once the warpgroup's
    MMAs on the slot are complete it refills the slot with block i + STAGES itself."""
    slot = PART * STAGES + i % STAGES
    a = _fragments(w_lo, s0[:, None], s1[:, None], INT4, BF16, a_l)
    mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
    acc = warpgroup_mma(a, x_lo.index(slot).permute((1, 0)), acc, is_async=True)
    b = _fragments(w_hi, s0[:, None], s1[:, None], INT4, BF16, a_l)
    w_lo, w_hi, s0, s1 = _parts_words(w_row, s_row, i + 2, n, N, PART, PARTS, RB, WORDS, INT4, DT)
    acc = warpgroup_mma(b, x_hi.index(slot).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a, b))[0]
    gl.thread_barrier()  # every warp's MMAs on the slot are complete
    _parts_issue_x(x_desc, x_lo, x_hi, ready, i + STAGES, n, off_m, PART, PARTS, RB, STAGES)
    return acc, w_lo, w_hi, s0, s1


@gluon.jit
def _parts_range_end(acc, total, i, xchg, full, spent, PART: gl.constexpr, PARTS: gl.constexpr, RB: gl.constexpr,
                     acc_l: gl.constexpr):
    """After stream block i: where a range ends, consumers 1 … PARTS - 1 hand their sums over through `xchg`;
    consumer 0 adds its own range's sum and then theirs, in split order (((p0 + p1) + p2) + …)."""
    if (i + 1) % RB == 0:
        r = i // RB  # the consumer's range count
        if PART == 0:
            total = gl.where(r == 0, acc, total + acc)
            for p in gl.static_range(PARTS - 1):
                mbarrier.wait(full.index(p), r & 1)
                total = total + xchg.index(p).load(acc_l)
            gl.thread_barrier()  # every thread has read them
            for p in gl.static_range(PARTS - 1):
                mbarrier.arrive(spent.index(p))
        else:
            mbarrier.wait(spent.index(PART - 1), (r & 1) ^ 1)  # (the first wait passes)
            xchg.index(PART - 1).store(acc)
            gl.thread_barrier()  # every thread has written it
            mbarrier.arrive(full.index(PART - 1))
        acc = gl.zeros_like(acc)
    return acc, total


@gluon.jit
def _parts_consumer(x_desc, x_lo, x_hi, ready, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                    stride_ym, PART: gl.constexpr, PARTS: gl.constexpr, INT4: gl.constexpr, BF16: gl.constexpr,
                    HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, RB: gl.constexpr, BLOCK_M: gl.constexpr,
                    STAGES: gl.constexpr):
    """One warpgroup of a parts tile: split ranges PART, PART + PARTS, … of 64 weight rows × BLOCK_M tokens.
    Consumer 0 ends with the tile's epilogue."""
    WORDS: gl.constexpr = 8 if INT4 else 16
    DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    tile, pid_n, pid_m, w_row, s_row = _split_tile_rows(w_ptr, s_ptr, M, K, BLOCK_M, WORDS)
    n = (SPLIT_K // PARTS) * RB  # this consumer's stream
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    off_m = pid_m * BLOCK_M
    for i in gl.static_range(STAGES):
        _parts_issue_x(x_desc, x_lo, x_hi, ready, i, n, off_m, PART, PARTS, RB, STAGES)
    lo_a, hi_a, s0_a, s1_a = _parts_words(w_row, s_row, 0, n, N, PART, PARTS, RB, WORDS, INT4, DT)
    lo_b, hi_b, s0_b, s1_b = _parts_words(w_row, s_row, 1, n, N, PART, PARTS, RB, WORDS, INT4, DT)
    acc = gl.zeros([64, BLOCK_M], gl.float32, acc_l)
    total = acc
    for i in range(0, n, 2):
        acc, lo_a, hi_a, s0_a, s1_a = _parts_block(acc, i, n, lo_a, hi_a, s0_a, s1_a, w_row, s_row, x_desc, x_lo,
                                                   x_hi, ready, off_m, N, PART, PARTS, RB, WORDS, INT4, BF16, DT,
                                                   STAGES, a_l)
        acc, total = _parts_range_end(acc, total, i, xchg, full, spent, PART, PARTS, RB, acc_l)
        if i + 1 < n:
            acc, lo_b, hi_b, s0_b, s1_b = _parts_block(acc, i + 1, n, lo_b, hi_b, s0_b, s1_b, w_row, s_row, x_desc,
                                                       x_lo, x_hi, ready, off_m, N, PART, PARTS, RB, WORDS, INT4,
                                                       BF16, DT, STAGES, a_l)
            acc, total = _parts_range_end(acc, total, i + 1, xchg, full, spent, PART, PARTS, RB, acc_l)
    if PART == 0:
        _store_result(total, s_ptr, bias_ptr, y_ptr, s_ptr, s_ptr, tile, pid_n, pid_m, 0, M, N, stride_ym,
                      INT4, HAS_BIAS, 1, 64, BLOCK_M, acc_l)


@gluon.jit
def _fragment_gemm_parts_kernel(x_desc, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, stride_ym, INT4: gl.constexpr,
                                BF16: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
                                RB: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                                PARTS: gl.constexpr, CONSUMER_REGS: gl.constexpr, PDL: gl.constexpr = 0):
    """Parts tiles (split weights): the paired tiles with PARTS (2 or 4) warpgroups on one tile of 64 weight rows ×
    BLOCK_M tokens, consumer p on split ranges p, p + PARTS, …, each with its own slots of the x rings, which it
    refills by TMA itself (no loader warp: one register budget fewer, so that four consumers get 128 registers
    each); consumers 1 … PARTS - 1 hand each range's fp32 sum to consumer 0 through shared memory, which sums them
    in split order: the decode tiles' bits with PARTS chains per tile instead of a partial per range through global
    memory. PDL: see ``_early_launch``."""
    _early_launch(PDL)
    DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    x_lo = gl.allocate_shared_memory(DT, [PARTS * STAGES, BLOCK_M, 64], x_desc.layout)
    x_hi = gl.allocate_shared_memory(DT, [PARTS * STAGES, BLOCK_M, 64], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [PARTS * STAGES, 1], mbarrier.MBarrierLayout())
    for t in gl.static_range(PARTS * STAGES):
        mbarrier.init(ready.index(t), count=1)
    xchg, full, spent = _range_exchange(PARTS, BLOCK_M)
    if PARTS == 2:
        gl.warp_specialize([
            (_parts_consumer, (x_desc, x_lo, x_hi, ready, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                               stride_ym, 0, PARTS, INT4, BF16, HAS_BIAS, SPLIT_K, RB, BLOCK_M, STAGES)),
            (_parts_consumer, (x_desc, x_lo, x_hi, ready, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                               stride_ym, 1, PARTS, INT4, BF16, HAS_BIAS, SPLIT_K, RB, BLOCK_M, STAGES)),
        ], [4], [CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_parts_consumer, (x_desc, x_lo, x_hi, ready, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                               stride_ym, 0, PARTS, INT4, BF16, HAS_BIAS, SPLIT_K, RB, BLOCK_M, STAGES)),
            (_parts_consumer, (x_desc, x_lo, x_hi, ready, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                               stride_ym, 1, PARTS, INT4, BF16, HAS_BIAS, SPLIT_K, RB, BLOCK_M, STAGES)),
            (_parts_consumer, (x_desc, x_lo, x_hi, ready, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                               stride_ym, 2, PARTS, INT4, BF16, HAS_BIAS, SPLIT_K, RB, BLOCK_M, STAGES)),
            (_parts_consumer, (x_desc, x_lo, x_hi, ready, xchg, full, spent, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K,
                               stride_ym, 3, PARTS, INT4, BF16, HAS_BIAS, SPLIT_K, RB, BLOCK_M, STAGES)),
        ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])


def launch_parts(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias, y: torch.Tensor, plan,
                 block_m: int = 64, int4: bool = True, stages: int = 2, parts: int = 4, consumer_regs: int = 128,
                 pdl: int = 0) -> None:
    """``_fragment_gemm_parts_kernel`` for a split ``plan`` of equal ranges whose count ``parts`` (2 or 4)
    divides; ``pdl``: ``_early_launch``'s mode."""
    M, K = x2.shape
    N = y.shape[1]
    rb = plan.k_per_split // 128
    if parts not in (2, 4) or plan.split_k % parts or rb * plan.split_k * 128 != K:
        raise ValueError(f"parts tiles need a split count of equal ranges that {parts} divides "
                         f"(split {plan.split_k}, K={K})")
    x2, num_tiles = _split_tile_grid(x2, N, block_m)
    _fragment_gemm_parts_kernel[(num_tiles,)](
        x_descriptor(x2, block_m), words, scales.contiguous(), bias if bias is not None else scales, y,
        M, N, K, y.stride(0), INT4=int4, BF16=x2.dtype == torch.bfloat16, HAS_BIAS=bias is not None,
        SPLIT_K=plan.split_k, RB=rb, BLOCK_M=block_m, STAGES=stages, PARTS=parts, CONSUMER_REGS=consumer_regs,
        PDL=pdl, num_warps=4, **dependent_launch(pdl > 0))


# ---------------------------------------------------------------------------------------------- streamed tiles
@gluon.jit
def _stream_words(w_row, s_row, wg_thr, g, n_blocks, num_tiles, num_pid_m, nprog, N, K, WG: gl.constexpr,
                  WORDS: gl.constexpr, INT4: gl.constexpr, DT: gl.constexpr):
    """A thread's words (two k64 halves) and int4 scales for block g of its program's stream: K-block g % n_blocks
    of the program's (g // n_blocks)-th tile, in the thread's warpgroup's 64 rows; masked past its last tile."""
    tile = gl.program_id(0) + (g // n_blocks) * nprog
    kb = g % n_blocks
    row_block = (tile // num_pid_m) * WG + wg_thr
    w_off = (row_block.to(gl.int64) * (K // TILE_K) + kb) * (128 * WORDS)
    return _load_halves(w_row + w_off[:, None], s_row + kb * N + row_block * TILE_N, 0,
                        (tile < num_tiles).to(gl.int32), N, WORDS, INT4, DT)


@gluon.jit
def _stream_block(acc, b_prev, g, release_prev, w_lo, w_hi, s0, s1, w_row, s_row, wg_thr, x_lo, x_hi, ready, empty,
                  n_blocks, num_tiles, num_pid_m, nprog, N, K, WG: gl.constexpr,
                  WORDS: gl.constexpr, INT4: gl.constexpr, BF16: gl.constexpr, DT: gl.constexpr,
                  STAGES: gl.constexpr, a_l: gl.constexpr):
    """Stream block g in two k64 halves with one MMA group left in flight: each half's words converted while the
    MMA before runs; once the previous block's second half is complete (every warp: Triton syncs the partition
    before an arrive) its x stage goes back to the loader (release_prev: not across a tile's start, whose
    previous stage the epilogue's wait released). Block g + 2's words into the registers of block g's."""
    s = g % STAGES
    a = _fragments(w_lo, s0[:, None], s1[:, None], INT4, BF16, a_l)
    mbarrier.wait(ready.index(s), (g // STAGES) & 1)
    acc = warpgroup_mma(a, x_lo.index(s).permute((1, 0)), acc, is_async=True)
    acc, b_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, b_prev))
    mbarrier.arrive(empty.index((g + STAGES - 1) % STAGES), pred=release_prev)
    b = _fragments(w_hi, s0[:, None], s1[:, None], INT4, BF16, a_l)
    w_lo, w_hi, s0, s1 = _stream_words(w_row, s_row, wg_thr, g + 2, n_blocks, num_tiles, num_pid_m, nprog, N, K, WG,
                                       WORDS, INT4, DT)
    acc = warpgroup_mma(b, x_hi.index(s).permute((1, 0)), acc, is_async=True)
    acc, a = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a))
    return acc, b, w_lo, w_hi, s0, s1


@gluon.jit
def _stream_consumer(x_lo, x_hi, ready, empty, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, stride_ym, num_tiles, RB,
                     WG: gl.constexpr, INT4: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                     BLOCK_M: gl.constexpr, STAGES: gl.constexpr, SERIAL: gl.constexpr):
    """The consumer partition of the streamed tiles (WG warpgroups): its program's tiles K-block after K-block
    (split weights, SERIAL: their ranges of RB K-blocks one after the other, summed in split order), then each
    tile's epilogue (stores) while the loader already fills the next tile's x stages."""
    WORDS: gl.constexpr = 8 if INT4 else 16
    HW: gl.constexpr = WORDS // 2
    DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    nprog = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    n_blocks = K // TILE_K
    my_tiles = gl.cdiv(num_tiles - gl.program_id(0), nprog)
    w_ld: gl.constexpr = gl.BlockedLayout([1, HW], [32, 1], [4 * WG, 1], [1, 0])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4 * WG, 1],
                                                    instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    thr = gl.arange(0, 128 * WG, layout=gl.SliceLayout(1, w_ld))
    wg_thr = thr // 128
    w_row = w_ptr + ((thr % 128) * WORDS)[:, None] + gl.arange(0, HW, layout=gl.SliceLayout(0, w_ld))[None, :]
    s_row = s_ptr + (thr % 128 // 32) * 16 + (thr % 32) // 4
    lo_a, hi_a, s0_a, s1_a = _stream_words(w_row, s_row, wg_thr, 0, n_blocks, num_tiles, num_pid_m, nprog, N, K, WG,
                                           WORDS, INT4, DT)
    lo_b, hi_b, s0_b, s1_b = _stream_words(w_row, s_row, wg_thr, 1, n_blocks, num_tiles, num_pid_m, nprog, N, K, WG,
                                           WORDS, INT4, DT)
    b = gl.zeros([64 * WG, 64], DT, a_l)
    n_ranges = n_blocks // RB  # SERIAL: the split ranges, one after the other (RB even: the launcher checks)
    for t in range(0, my_tiles):
        tile = gl.program_id(0) + t * nprog
        acc = gl.zeros([64 * WG, BLOCK_M], gl.float32, acc_l)
        total = acc  # SERIAL: the ranges summed so far
        for r in range(0, n_ranges):
            g0 = t * n_blocks + r * RB
            for i in range(0, RB, 2):
                acc, b, lo_a, hi_a, s0_a, s1_a = _stream_block(
                    acc, b, g0 + i, i > 0, lo_a, hi_a, s0_a, s1_a, w_row, s_row, wg_thr, x_lo, x_hi, ready, empty,
                    n_blocks, num_tiles, num_pid_m, nprog, N, K, WG, WORDS, INT4, BF16, DT, STAGES, a_l)
                acc, b, lo_b, hi_b, s0_b, s1_b = _stream_block(
                    acc, b, g0 + i + 1, True, lo_b, hi_b, s0_b, s1_b, w_row, s_row, wg_thr, x_lo, x_hi, ready,
                    empty, n_blocks, num_tiles, num_pid_m, nprog, N, K, WG, WORDS, INT4, BF16, DT, STAGES, a_l)
            acc, b = warpgroup_mma_wait(num_outstanding=0, deps=(acc, b))
            mbarrier.arrive(empty.index((g0 + RB - 1) % STAGES))
            if SERIAL:  # the decode tiles' sum of the partials: ((p0 + p1) + p2) + …, p0 as it is (keeps a -0)
                total = gl.where(r == 0, acc, total + acc)
                acc = gl.zeros_like(acc)
        if SERIAL:
            acc = total
        _store_result(acc, s_ptr, bias_ptr, y_ptr, s_ptr, s_ptr, tile, tile // num_pid_m,
                      tile % num_pid_m, 0, M, N, stride_ym, INT4, HAS_BIAS, 1, 64 * WG, BLOCK_M, acc_l)


@gluon.jit
def _stream_loader(x_desc, x_lo, x_hi, ready, empty, M, K, num_tiles, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """One warp: the x tiles of the program's stream by TMA, each stage refilled once the consumers handed it
    back."""
    nprog = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    n_blocks = K // TILE_K
    my_tiles = gl.cdiv(num_tiles - gl.program_id(0), nprog)
    for g in range(0, my_tiles * n_blocks):
        tile = gl.program_id(0) + (g // n_blocks) * nprog
        mbarrier.wait(empty.index(g % STAGES), ((g // STAGES) & 1) ^ 1)  # (the first round passes)
        _issue_x(x_desc, x_lo, x_hi, ready, g, tile % num_pid_m * BLOCK_M, g % n_blocks * TILE_K, STAGES, True)


@gluon.jit
def _fragment_gemm_stream_kernel(x_desc, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, stride_ym, num_tiles, RB,
                                 SERIAL: gl.constexpr, INT4: gl.constexpr, BF16: gl.constexpr, HAS_BIAS: gl.constexpr,
                                 BLOCK_M: gl.constexpr, STAGES: gl.constexpr, WG: gl.constexpr,
                                 LOADER_REGS: gl.constexpr, PDL: gl.constexpr = 0):
    """Streamed tiles (split weights whose tiles fill one wave, their ranges run serially; unsplit ones too):
    persistent programs, one per SM, each walking tiles of 64 · WG weight rows × BLOCK_M tokens (every nprog-th,
    so neighbouring SMs share a tile's weight rows or its x at a time); warp-specialized: one consumer partition of
    WG warpgroups (the batch tiles' operands: each warpgroup its 64 rows, all sharing the x stage) with one wgmma
    group in flight across K-blocks, and a loader warp filling the x stages by TMA, the next tile's while the
    consumers store this one. The batch tiles' k16 chain, dequantization and epilogue (so the decode tiles' bits).
    Two warpgroups in one partition, not two partitions of one: with two consumer partitions Triton 3.6 caps the
    function at 168 registers and ptxas serializes every wgmma of both (C7512, also with ptxas 13.0 and a patched
    .maxnreg 255). PDL: see ``_early_launch``."""
    _early_launch(PDL)
    DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    x_lo, x_hi, ready, empty = _x_ring(x_desc, DT, BLOCK_M, STAGES)
    gl.warp_specialize([
        (_stream_consumer, (x_lo, x_hi, ready, empty, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, stride_ym,
                            num_tiles, RB, WG, INT4, BF16, HAS_BIAS, BLOCK_M, STAGES, SERIAL)),
        (_stream_loader, (x_desc, x_lo, x_hi, ready, empty, M, K, num_tiles, BLOCK_M, STAGES)),
    ], [1], [LOADER_REGS])


def launch_streamed(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias, y: torch.Tensor, plan,
                    block_m: int = 256, int4: bool = True, stages: int = 3, warpgroups: int = 2,
                    loader_regs: int = 40, programs: int = 0, pdl: int = 0) -> None:
    """``_fragment_gemm_stream_kernel`` for an unsplit weight or a ``serial`` plan of split ranges of an even
    number of K-blocks: min(tiles, ``programs`` or the SM count) programs; ``pdl``: ``_early_launch``'s mode."""
    M, K = x2.shape
    N = y.shape[1]
    rows = 64 * warpgroups
    rb = plan.k_per_split // 128 if plan.split_k > 1 else K // 128
    if plan.split_k > 1 and not plan.serial:
        raise ValueError("streamed tiles run split weights serially (plan.serial)")
    if N % rows or rb % 2 or rb * 128 * plan.split_k != K:
        raise ValueError(f"streamed tiles need N % {rows} == 0 and ranges of an even number of K-blocks "
                         f"(N={N}, K={K}, split {plan.split_k})")
    x2 = _rows_16_byte_aligned(x2)
    num_tiles = (N // rows) * ((M + block_m - 1) // block_m)
    grid = min(num_tiles, programs or fragment.num_sms(x2.device, fragment.DEFAULT_SMS))
    _fragment_gemm_stream_kernel[(grid,)](
        x_descriptor(x2, block_m), words, scales.contiguous(), bias if bias is not None else scales, y,
        M, N, K, y.stride(0), num_tiles, rb, SERIAL=plan.split_k > 1, INT4=int4, BF16=x2.dtype == torch.bfloat16,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, STAGES=stages, WG=warpgroups, LOADER_REGS=loader_regs,
        PDL=pdl, num_warps=4 * warpgroups, **dependent_launch(pdl > 0))
