"""Fragment-major int4 and int8 weights and the Hopper GEMM that feeds them to wgmma from the registers they were
loaded into (``w4a16_fragment_gemm``, ``w8a16_fragment_gemm``).

Why: the Triton w4a16 tiles load a weight tile row-contiguously and move the dequantized tile into wgmma's
register-operand layout through shared memory (sm_90a: four STS / BAR / LDSM rounds per K-block); ncu put the
decode programs' time mostly in barrier and shared-memory stalls. Stored *fragment-major*, each thread of a
warpgroup finds its A fragments for a whole 64-row × 128-column tile as one contiguous 32-byte run: two 16-byte
loads, the package's word dequantization in place, and ``warpgroup_mma`` takes the registers as they are. No
shared memory and no barrier for the weight (sm_90a: 220 instead of 344 instructions per K-block); only x, the
B operand, goes through a cp.async ring. H100, CUDA graphs, same run, µs Triton tile → this op, int4: 28672×4096
M = 1 36.2 → 25.5 (tinygemm 32.9, gemlite 37.5), 8192×28672 70.7 → 47.9, 4096×14336 20.7 → 15.3, M = 64 62.6 →
44.4 on 28672×4096; int8 (against the tile-major w8a16 kernel): 44.6 → 41.9, 83.0 → 81.2, 25.3 → 23.9, M = 64
56.7 → 50.6 (benchmarks/NOTES.md).

Layout (``fragment_major_int4``): 64 × 128 tiles, tile (i, j) at word (i · K / 128 + j) · 1024. In a tile, thread
t = 32 w + 4 g + c (warp w, lane group g, lane c) owns words 8 t … 8 t + 7, one per k16 step s. Its fragment
rows are r0 = 16 w + g and r0 + 8, its columns 16 s + 2 c + {0, 1} and + 8; nibble 4 e + 2 h + r of word s holds
row r0 + 8 r, column 16 s + 8 h + 2 c + e. So the nibble pairs (j, j + 4) that one lop3 turns into an f16x2 are
one A register, and each register has one row: its scale is one of the thread's two.

The results are bit for bit those of ``w4a16_gemm`` on the packed layout run with the same split count (the same
split ranges, chain of k16 MMA steps, dequantization and rounding; its own split rule takes fewer splits on two
shapes): a GPU test checks it. The split depends on N, K and the GPU only, so the op is batch-invariant wherever a
Gluon kernel serves: batch tiles (``batch_tile_for``: x shared by several warpgroups through TMA) from M = 65 to
LARGE_M_BATCH (1024) on unsplit weights (from 33 on those of at least 128 · SMs rows; from M = 256 piped tiles,
``piped_tile_for``: the same operands with the MMAs kept in flight) and from 129 to 512 on split ones
(``serial_tile_for``; on weights of 2^27 elements or more and at 512 where they fill their waves), paired tiles on
split weights whose 128- or 64-token tiles fill most of one wave (``paired_tile_for``: two warp-specialized
warpgroups on one tile, even and odd split ranges; where whole 64-token tiles fill it and four divides the split
count, parts tiles, ``parts_tile_for``: four warpgroups on round-robin ranges), streamed tiles on split weights
whose 256-token tiles fill most of one wave (``streamed_tile_for``: persistent, warp-specialized, the ranges
serially; 8192-row weights at M = 384-512 on 132 SMs), decode tiles below LARGE_M_FRAGMENT (512) wherever no
batch tile serves; from there dequantize + cuBLAS (``gluon_tile_for`` names the kernel). Serves symmetric group-128
weights (the GPTQ / AWQ / compressed-tensors W4A16 default) with N % 64 == 0 and K % 128 == 0 on sm_90;
``fragment_fits`` says which. The int8 layout (``fragment_major_int8``) is the same tiles with one byte per
weight; ``w8a16_fragment_gemm`` gives ``w8a16_gemm``'s bits (per-channel scales applied to the fp32 sum), and
``ifq`` stores sm_90 layers that way.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import ACT_DTYPES, check_same_device, check_shape, check_tensor
from .._registry import register_op
from ..dispatch import Candidate, KernelFamily
from ..reference.gemm import w8a16_gemm_ref
from ..reference.int4 import unpack_int4_rows, w4a16_gemm_ref
from ..runtime import interpreter_active, num_sms, reference_forced
from ..tuning import m_bucket
from ._splitk import DEFAULT_SMS, plan_split, split_k_on
from .w4a16 import SCALE_DTYPES, dequantize_packed
from .w8a16 import CHANNEL_SCALE_DTYPES

TILE_N, TILE_K = 64, 128  # a tile: wgmma's 64 rows × one K-block
GROUP_SIZE = 128  # the one group size the layout serves: a K-block's scales are one row
# From here on dequantize (one pass over the fragment tiles) + cuBLAS; below it the Gluon kernel, whose rows are
# batch-invariant. H100, M = 512, µs kernel / dequantize + cuBLAS (the dequantization timed at M = 1024 on the same
# card): 28672×4096 337 / ~248, 4096×14336 190 / ~120, 4096×4096 64 / ~42; at M = 256 the kernel still leads on
# the large shapes (28672×4096 169 / ~182). w4a16_gemm on the packed layout switches at LARGE_M (1024).
LARGE_M_FRAGMENT = 512
# Batch tiles (``_fragment_gemm_tma_kernel``: x through TMA, shared by several warpgroups of 64 weight rows), with
# the decode tiles' bits, so rows stay batch-invariant wherever they serve:
# - unsplit weights (split count 1; it depends on N and K only), 64 < M ≤ LARGE_M_BATCH. H100, µs decode tiles or
#   dequantize + cuBLAS (the op before) → batch tiles, same run: int8 28672×4096 M = 256 139.7 → 122.2,
#   M = 512 290.3 → 231.8; 28672×8192 M = 256 293.4 → 237.9, M = 1024 972.3 → 802.1; int4 28672×8192
#   M = 256 298.3 → 233.5, M = 1024 947.8 → 857.0 (cuBLAS fp16 226.4 / 716.3). Warpgroups per program, token tile
#   and x stages by width (int4 unpacks cheaper, so four warpgroups share one x tile there).
# - split weights, 128 < M ≤ LARGE_M_FRAGMENT: the split ranges one after the other in one program (SERIAL), no
#   partials; the shape of the tile from SERIAL_BATCH_TILES (``serial_tile_for``). At M = LARGE_M_FRAGMENT only where
#   the tiles fill their waves to ≥ 90 % (dequantize + cuBLAS otherwise). H100, µs op → serial (2, 128, 3), int8 /
#   int4: 4096×14336 M = 512 142.7 → 112.6 / 132.9 → 116.2; 8192×28672 M = 256 285.1 → 223.0 / 298.9 → 229.6,
#   M = 512 567.2 → 481.2 / 553.0 → 457.8; 4096×4096 M = 512 43.4 → 37.2 / 40.1 → 36.8; where the last wave is
#   part-empty it lost to dequantize + cuBLAS (6144×4096 M = 512, 192 tiles: 64.1 → 71.6).
BATCH_TILE = {True: (4, 128, 4), False: (2, 128, 3)}
# - unsplit weights whose two-warpgroup tiles alone give every SM a program (N ≥ 128 · SMs), 32 < M ≤ 64: two
#   warpgroups on the decode tiles' 64-token tile. H200, CUDA graphs, one run, µs decode tiles → (2, 64, 3) at M = 40
#   / 48 / 56 / 64: int8 28672×4096 50.4 / 46.6 / 51.4 / 46.4 → 44.3 / 43.7 / 45.0 / 45.9, 28672×8192 100.9 / 93.7 /
#   105.7 / 94.3 → 86.4 / 87.6 / 85.2 / 89.6; int4 28672×4096 40.8 / 41.2 / 43.8 / 43.8 → 39.1 / 39.7 / 40.1 / 41.8,
#   28672×8192 80.9 / 81.2 / 86.4 / 86.1 → 76.6 / 77.8 / 79.0 / 79.5 (four warpgroups, or four x stages: within
#   ±2 µs of two). Below 33 tokens the 32-token decode tiles serve.
SMALL_BATCH_TILE = (2, 64, 3)
# Serial tiles for split weights: (warpgroups, token tile, x stages, programs per SM, time of a full wave relative
# to the first). The time of a launch is taken as its waves (tiles / (programs per SM · SMs), rounded up) times the
# last field; the cheapest serves. Programs per SM as the probe's wave steps show them (H200, 132 SMs, int8
# 6144×4096): one warpgroup on 128 tokens 96 / 192 / 288 tiles 24.9 / 33.7 / 55.9 µs (two fit an SM), on 64 tokens
# 288 / 384 / 480 tiles 32.4 / 36.3 / 54.2 (three), two warpgroups on 128 one, four on 64 one (48-120 tiles
# 42.3-44.0, 144-168 85.1-85.7). Full waves against one warpgroup on 128 tokens' (same run): 1.05, 1.07, 1.30.
# One warpgroup on 128 tokens is not used where the last token tile is at most half full (M % 128 in 1..64: int8
# 8192×28672 M = 192 343.6 µs against 226.7 at M = 256, same tiles; two warpgroups do not show it).
# Weights of 2^27 elements or more take them only where the waves are ≥ 90 % full (as at M = LARGE_M_FRAGMENT):
# there the decode tiles beat part-empty second waves (H200, 8192×28672, int8 / int4: M = 320 396.7 / 380.4 against
# 456.7 / 453.3, M = 384 421.3 / 418.4 against 489.3 / 443.8), on smaller ones they lost even to those.
# H200, one run, µs op before (decode tiles; the (2, 128) serial tiles where they filled 90 %) → after (cuBLAS
# fp16), int8 / int4: 6144×4096 M = 192 42.3 / 39.8 → 32.4 / 31.9 (20.2), M = 256 45.5 / 43.3 → 34.4 / 33.7
# (24.7), M = 320 69.4 / 65.2 → 44.5 / 42.7 (31.8), M = 384 73.2 / 70.2 → 57.3 / 56.7 (33.4), M = 448 88.5 / 85.8
# → 69.6 / 65.1 (42.5); 4096×4096 M = 256 30.6 / 29.9 → 24.6 / 23.7 (15.4), M = 384 44.1 / 42.3 → 33.1 / 32.3
# (23.8); 4096×14336 M = 256 92.7 / 90.1 → 77.8 / 75.4 (59.2), M = 320 130.9 / 124.5 → 110.4 / 114.0 (69.1);
# 8192×28672 M = 192 272.8 / 248.7 → 253.3 / 248.7 (179.2), M = 256 260.1 / 249.6 → 255.1 / 237.3 (206.6). In
# three runs on that card the same config took 115.9, 124.5 and 145.5 µs (4096×14336 M = 512, two warpgroups), so
# the wave weights are coarse on purpose. Every config gives the decode tiles' bits (probe: every case).
SERIAL_BATCH_TILES = ((1, 128, 3, 2, 1.00), (1, 64, 3, 3, 1.05), (2, 128, 3, 1, 1.07), (4, 64, 3, 1, 1.30))
LARGE_M_BATCH = 1024
# Piped tiles (``_fragment_gemm_piped_kernel``): unsplit weights, PIPED_MIN_M ≤ M ≤ LARGE_M_BATCH. The batch tiles'
# operands, but a warpgroup converts the next k64 half into a second A register set while this half's MMAs run (one
# wgmma group left in flight instead of waiting after each), weight words through a swizzled cp.async ring instead
# of registers. (warpgroups, token tile, x halves in flight, word stages); one program per SM. H100, CUDA graphs,
# µs batch tiles → piped (cuBLAS fp16), same run: int4 (two samples each) 28672×4096 M = 256 120.1, 125.2 → 105.4,
# 106.0 (105.9); M = 512 243.8, 248.4 → 201.9, 206.6 (188.0); M = 1024 443.7, 446.2 → 385.0, 409.3 (354.6);
# 28672×8192 M = 256 230.7, 255.0 → 197.1, 198.3 (216.9); M = 512 450.4, 474.0 → 402.5, 387.3 (369.0); M = 1024
# 837.6, 850.5 → 673.3, 761.5 (751.1). int8 28672×4096 M = 256 117.8 → 114.0 (103.9), M = 512 247.9 → 232.2
# (181.7), M = 1024 450.7 → 437.9 (368.0); 28672×8192 242.0 → 223.4 (212.4), 504.6 → 435.2 (370.2), 833.6 → 785.3
# (730.1); int8 needed the swizzle (unswizzled, its 64-byte rows of words read back with 4-way bank conflicts:
# 473.5 µs at 28672×4096 M = 1024). Not split weights (the SERIAL sums spill), not 128-token tiles (with one or
# two programs per SM: slower than 256).
PIPED_TILE = (2, 256, 4, 3)
PIPED_MIN_M = 256
PIPED = True
# Decode tiles launched by programmatic dependent launch (``decode_pdl_mode``): each program loads its first
# K-blocks of weight words while the previous kernel of the stream finishes, and waits for it only before reading
# x. Split weights (there the previous call's last-arrival sums leave a tail where most SMs idle), H100, CUDA graphs,
# µs without → with, int8 / int4, M = 1: 6144×4096 12.2 → 11.0 / 8.5 → 7.6, 4096×4096 9.6 → 9.0 / 7.3 → 6.4,
# 4096×14336 23.7 → 21.3 / 15.5 → 12.8, 8192×28672 81.3 → 79.0 / 47.7 → 45.7 (M = 16: 0.4-1.6 µs less on each).
# Unsplit weights too since the one-shift int4 words (H100, before them: 28672×4096 int4 25.5 → 26.4, 28672×8192
# 48.0 → 51.3 at M = 1). H200, CUDA graphs, one run, two samples each, µs plain / early trigger (mode 1) / trigger
# at exit (mode 2), same bits: int8 28672×4096 M = 1 31.5, 31.4 / 29.8, 29.8 / 31.2, 31.2, M = 4 31.6, 32.1 / 30.2,
# 30.2 / 31.4, 31.4, M = 16 33.7, 33.7 / 32.4, 32.5 / 33.8, 33.7; int4 28672×4096 M = 1 21.9, 22.0 / 20.2, 20.2 /
# 21.7, 21.7, M = 16 24.9, 25.0 / 23.5, 23.4 / 24.8, 24.6, 28672×8192 M = 1 41.5, 41.2 / 39.6, 39.7 / 40.9, 41.0.
# But int4 at 2-8 tokens on weights whose programs run 32 K-blocks or more: 28672×4096 M = 4 22.5, 22.4 / 24.0, 23.8
# / 22.2, 22.2, 28672×8192 M = 4 41.9, 41.8 / 46.9, 46.4 / 41.9, 41.6, split 8192×28672 (56 K-blocks per range) M = 4
# 39.0, 39.1 / 42.6, 42.6 / 38.7, 38.7, while on the short ranges of the 4096-row weights the early trigger gains
# most: 4096×4096 (8 K-blocks) M = 4 6.9, 7.0 / 5.8, 5.8 / 6.8, 6.8, 4096×14336 (14) 13.1, 13.2 / 11.1, 11.1 / 12.9,
# 12.9 (6144×4096, 8: 8.0 / 8.1 / 7.8). That variant alone compiles to 96 registers (sm_90a, Triton 3.6; the others
# 100-123: five programs fit an SM instead of four); why the long ranges lose there is not pinned down.
DECODE_PDL = True
# Split decode tiles whose ranges run fewer than SPLIT_SUM_MAX_BLOCKS K-blocks: the partials summed by a second
# kernel (``launch_split_sum``, launched dependently, early trigger) instead of by the last program of each tile (a
# release fence, an atomic and a load of the partials: three L2 round trips at the end of every program). Same bits.
# H200, CUDA graphs, one run, µs last program → sum kernel, int8 / int4: 4096×4096 (8 K-blocks per range) M = 1
# 7.6 → 7.0 / 5.7 → 5.5, M = 4 7.7 → 7.3 / 5.8 → 5.6, M = 16 8.3 → 8.8 / 6.7 → 6.3, M = 32 9.5 → 8.6 / 8.2 → 7.2;
# 6144×4096 (8) M = 1 9.1 → 8.5 / 6.8 → 6.6, M = 4 9.5 → 8.7 / 8.0 → 6.9, M = 32 11.8 → 11.5 / 11.9 → 11.6;
# 4096×14336 (14) M = 1 16.2 → 16.3 / 12.3 → 11.3, M = 16 18.8 → 20.4 / 12.7 → 12.8, M = 32 22.1 → 19.7 / 20.0 →
# 18.7; 8192×28672 (56) M = 1 55.5 → 55.7 / 37.4 → 36.8, M = 16 59.9 → 62.7 / 44.5 → 45.6, M = 32 66.9 → 68.4 /
# 69.7 → 65.7 (no lead either way on long ranges, whose combine is a small part of the program). Timing the
# split programs alone (every program storing its range's result into y, wrong values): the last-program sum
# cost 1.6-2.2 µs on the 8-block ranges at M = 1-16, 3.0-3.4 µs on 4096×14336. The sum kernel triggering only
# at its exit, or launched only as the split programs exit, lost 0.7-2.0 µs at M = 1-4 (benchmarks/NOTES.md).
SPLIT_SUM_MAX_BLOCKS = 32


# int4 at 17-32 tokens (32-token tiles) on split weights with more than SUM_AT_EXIT_MIN_PER_SM split programs per
# SM: the sum kernel on ranges of every length, in PDL mode 2 (the next kernel launched as its programs exit, not at
# once). H200, CUDA graphs, two runs, µs the op then (last program on 8192×28672's 56-block ranges, the sum kernel
# in mode 1 elsewhere) → sum kernel in mode 2, M = 17 / 24 / 32: 6144×4096 (2.9 programs per SM) 10.9 / 11.2 / 11.5
# → 9.0-9.1 / 9.2 / 9.5; 4096×14336 (3.9) 17.8-17.9 / 18.2-18.3 / 18.6 → 16.1 / 16.4-16.5 / 16.8-16.9; 8192×28672
# (3.9) 59.6-59.9 / 60.8-63.0 / 65.5-66.4 → 53.2-56.6 / 54.5-55.2 / 55.0-56.9; but 4096×4096 (1.9) 6.8-7.2 →
# 7.7-8.0. int8 gained 0.1-0.5 µs on 6144×4096 and lost 1.1-1.8 on 4096×14336: it keeps the rule above.
SUM_AT_EXIT_MIN_PER_SM = 2


def split_sum_launch(split_k: int, range_blocks: int, int4: bool = False, block_m: int = 8,
                     programs_per_sm: float = 0.0) -> tuple:
    """How split decode tiles whose ranges run ``range_blocks`` K-blocks sum their partials: (by
    ``launch_split_sum``?, that kernel's PDL mode, None for the split kernel's). The sum kernel on ranges under
    ``SPLIT_SUM_MAX_BLOCKS``, and in mode 2 for int4 32-token tiles (``SUM_AT_EXIT_MIN_PER_SM``)."""
    if split_k <= 1:
        return False, None
    if int4 and block_m == 32 and programs_per_sm > SUM_AT_EXIT_MIN_PER_SM:
        return True, 2
    return range_blocks < SPLIT_SUM_MAX_BLOCKS, None


# Decode tiles with two K-blocks per wgmma group (``_k_pair`` in ``_fragment_gluon``: both blocks converted, their
# sixteen k16 steps issued as one group, one barrier and one MMA wait per two blocks; the same bits), four K-blocks
# of words in flight, six x stages. The pair costs registers (sm_90a, int4 M = 1: 103 → 163, three programs per
# SM), so uncapped it serves launches of at most PAIR_MAX_PER_SM programs per SM; launches of 3.4-3.9 per SM lost 9-35 %
# (H200, µs one K-block → pairs, int4 28672×4096 M = 1 20.2 → 25.4, 4096×14336 11.2 → 14.4). Below that, H200, CUDA
# graphs, three runs (one, then two the same day), µs one K-block → pairs, M = 1 / 2 / 4 / 8 / 16:
#   int4 6144×4096 (384 programs, 2.9 per SM) 6.6 / 6.7 / 6.9 / 7.4 / 8.3-8.4 → 6.1 / 6.4 / 6.5-6.6 / 7.0 / 7.6
#   int4 4096×4096 (1.9 per SM) 5.5 / 5.3 / 5.6-5.7 / 6.3 / 6.1 → 5.3-5.4 / 5.4-5.5 / 5.5 / 5.7 / 6.5-6.6
#   int8 4096×4096 7.0 / 7.0 / 7.3 / 7.8 / 8.5 → 7.0 / 7.2 / 6.6-7.1 / 6.9 / 7.8-7.9
#   int8 6144×4096 8.4-8.7 / 8.6 / 8.8 / 9.4-9.5 / 10.4-10.5 → 8.7 / 8.9-9.0 / 9.0-9.1 / 9.4 / 11.6-11.7
# Taken where they led in every run by more than 0.2 µs: on launches of more than two programs per SM int4 at 1-16
# tokens; on launches of at most two, 3-8 tokens (int4) and 3-16 (int8). (Why the widths differ is not known: the
# same kernel, differently specialized.) With two K-blocks of words in flight the pairs gained at most 0.6 µs
# (int8 4096×4096 M = 4) and lost up to 3.3 (int4 4096×14336 M = 16 12.7 → 16.0).
# Capped at PAIR_CAPPED_REGS registers (sm_90a: no spills for int4, 172 → 180 instructions per K-block; int8 spills
# 300 B), four programs fit an SM: int4 up to 8 tokens on launches of more than three and at most four programs per
# SM. H200, two runs, µs one K-block → capped pairs, M = 1 / 2 / 4 / 8 / 16: 4096×14336 (3.9 per SM) 11.2-11.3 / 11.4
# / 11.4-11.5 / 11.8 / 12.7 → 10.9 / 11.1 / 11.1 / 11.3-11.4 / 15.0; 28672×8192 (3.4) 39.1-39.4 / 41.1-41.4 /
# 41.6-41.7 / 42.2-42.4 / 45.6-46.6 → 38.7 / 40.6-40.7 / 40.9-41.0 / 41.3-41.5 / 45.6-46.3; 8192×28672 (3.9, the sum
# kernel after both) 36.8 / 39.5 / 40.0-40.1 / 40.0-40.4 / 44.6-44.7 → 35.8-35.9 / 38.3-38.7 / 38.7-38.9 / 39.4-39.7 /
# 44.0-44.3; 28672×4096 (3.4) 20.3-20.4 / 22.1-22.2 / 22.2-22.3 / 22.4-22.6 / 23.2-23.8 → 20.1-20.2 / 22.1-22.2 /
# 22.2-22.3 / 22.2-22.3 / 23.2-23.5.
DECODE_PAIR = True
PAIR_STAGES = 6
PAIR_MAX_PER_SM = 3
PAIR_CAPPED_MAX_PER_SM, PAIR_CAPPED_REGS = 4, 128


def decode_pair(k: int, k_per_split: int, int4: bool, m: int, programs_per_sm: float) -> tuple:
    """(two K-blocks per wgmma group?, register cap or 0) for the decode tiles (``DECODE_PAIR``; even block
    counts)."""
    if not (DECODE_PAIR and m <= 16 and 0 < programs_per_sm <= PAIR_CAPPED_MAX_PER_SM
            and k % (2 * TILE_K) == 0 and k_per_split % (2 * TILE_K) == 0):
        return False, 0
    if programs_per_sm > PAIR_MAX_PER_SM:
        return (True, PAIR_CAPPED_REGS) if int4 and m <= 8 else (False, 0)
    if programs_per_sm > 2:
        return int4, 0
    return 3 <= m <= (8 if int4 else 16), 0


def decode_pdl_mode(m: int, int4: bool, range_blocks: int) -> int:
    """The decode tiles' PDL mode for M tokens whose programs each run ``range_blocks`` K-blocks (``DECODE_PDL``):
    1 (early trigger), 2 (trigger at exit) for int4 at 2-8 tokens on ranges of 32 K-blocks or more."""
    if not DECODE_PDL:
        return 0
    return 2 if int4 and 1 < m <= 8 and range_blocks >= 32 else 1


# Programmatic dependent launch of the streamed, parts, paired, piped and batch tiles (``_early_launch``'s mode: 0
# plain, 1 the next kernel launched at once, 2 as this one's programs exit). Off: H200, same run, µs plain / 1 / 2,
# two samples each, gains of ≤ 0.8 µs on the 4096-row paired tiles at 128 tokens (int4 4096×4096 13.6, 13.6 / 12.9,
# 12.7 / 13.4, 13.3) and losses of up to 6 µs elsewhere (int8 4096×14336 M = 384 101.9, 104.3 / 108.8, 110.0 /
# 106.5, 106.5; 8192×28672 M = 256 232.7, 240.3 / 247.1, 242.3 / 240.1, 243.3); the rest within the spread.
GLUON_PDL = 0
# Paired tiles (``_fragment_gemm_paired_kernel``): split weights whose tiles of 64 rows × 128 tokens (else 64) fill
# PAIRED_MIN_FILL to 1 of one wave at one program per SM. Two warp-specialized warpgroups share a tile, one on the
# even split ranges and one on the odd ones (each with its own x ring, filled by a TMA loader warp), summed in split
# order: the decode tiles' bits with two warpgroups' MMAs on each SM where the serial tiles run one (ncu, H200,
# int8 4096×4096 M = 256: tensor pipe 44 % → 53 %). H200, CUDA graphs, µs the op (decode tiles up to M = 128,
# serial tiles above) → paired (cuBLAS fp16), int8 / int4, same run: 6144×4096 M = 128 27.1 / 22.6 → 20.9 / 19.7
# (14.9 / 15.8); 8192×28672 M = 128 137.3 / 131.4 → 131.8 / 116.6 (137.3 / 138.9); 4096×4096 M = 256 24.5 / 23.5
# → 21.9 / 20.4 (14.7 / 15.4); 4096×14336 M = 256 80.4 / 78.8 → 64.3 / 59.9 (56.9 / 57.6). Where they take two
# waves or more they lose (6144×4096 M = 256 34.0 → 40.9), and 4096-row weights at M ≤ 128 (64 tiles: half the SMs)
# lose to the decode tiles (17.0 → 19.6). A last token tile at most half full is slow, as for the serial (1, 128)
# tiles (8192×28672 M = 192: 258.0 → 335.7): not taken there. Where 128-token tiles are too few, 64-token ones that
# fill the wave serve (4096-row weights at 97-128 tokens; µs decode tiles → paired 64-token tiles (cuBLAS fp16),
# int8 / int4: 4096×4096 M = 128 17.3 / 15.8 → 15.6 / 13.7 (13.8 / 14.1), 4096×14336 M = 128 50.5 / 46.2 → 46.4 /
# 40.8 (37.7 / 37.8); at M = 80, last tile a quarter full, 15.9 → 20.2).
PAIRED_BLOCK_MS, PAIRED_STAGES = (128, 64), 2
PAIRED_MIN_FILL = 0.7
# Streamed tiles (``_fragment_gemm_stream_kernel``): split weights whose tiles of 128 rows × 256 tokens fill
# STREAMED_MIN_FILL to 1 of one wave, up to LARGE_M_FRAGMENT, the last token tile at least half full. Persistent
# programs, one per SM: two warpgroups in one consumer partition sharing the x stage, a TMA loader warp, the split
# ranges one after the other (the decode tiles' bits). Where the serial tiles run two waves of 128-token tiles,
# these read each weight word once per 256 tokens. H200, CUDA graphs, one run, µs op → streamed (cuBLAS fp16),
# int8 / int4: 8192×28672 M = 384 418.8 / 405.8 → 417.1 / 361.6 (287.4 / 288.5), M = 448 416.3 / 420.1 → 387.1 /
# 375.4 (368.4 / 360.4), M = 512 493.2 / 463.1 → 409.4 / 386.7 (367.6 / 358.0; an earlier run 494.8 / 408.4 →
# 407.3 / 390.6); 8192×8192 M = 384 147.3 / 125.9 → 139.9 / 119.8 (83.5 / 84.4), M = 448 147.4 / 144.6 → 131.4 /
# 125.3 (105.7 / 104.6), M = 512 148.3 / 135.4 → 133.2 / 127.0 (108.2 / 106.8). A last token tile a quarter full
# loses (8192×28672 M = 320: 371.0 → 469.2 int8), so do part-filled waves (4096-row weights, 64 tiles, and 6144
# rows, 96: 4096×14336 M = 512 119.6 → 182.8) and two waves (8192×28672 M = 640: 570.6 → 705.9). 128-token
# streamed tiles were within the runs' spread of the serial tiles (8192×28672 M = 256: 229.7 vs 242.5, then
# 262.4 vs 229.2), one warpgroup on 64 rows behind everywhere; on the unsplit weights the streamed tiles tie the
# piped ones (28672×4096 int8 M = 512 223.7 vs 230.3, int4 218.5 vs 213.5). Every case gave the decode tiles' bits.
STREAMED_TILE = (2, 256, 3)
STREAMED_MIN_FILL = 0.9
STREAMED = True
# Parts tiles (``_fragment_gemm_parts_kernel``): the paired tiles with four warpgroups per tile of 64 rows × 64
# tokens, consumer p on split ranges p, p + 4, … (split counts that four divides), each refilling its own x slots
# (no loader warp: four consumers get 128 registers each), where whole 64-token tiles (M % 64 == 0) fill
# PARTS_MIN_FILL to 1 of one wave: four chains per SM on a tile where the decode tiles had one program per range
# and its fp32 partial through global memory, and the paired tiles two chains. H200, CUDA graphs, one run, µs
# op → parts (cuBLAS fp16), int8 / int4: 6144×4096 M = 64 16.9 / 15.8 → 14.9 / 13.1 (14.2), 8192×28672 M = 64
# 86.7 / 87.1 → 83.1 / 71.7 (124.2), 4096×4096 M = 128 15.5 / 13.6 → 14.7 / 13.1 (13.5), 4096×14336 M = 128 46.3 /
# 39.7 → 45.1 / 37.4 (38.5). Where the wave is part-empty (4096×4096 M = 64: 64 tiles, 12.5 → 13.9 int8), takes
# two (6144×4096 M = 128: 20.3 → 27.3) or the last tile is part-full (6144×4096 M = 33: 13.4 → 20.3; 4096×4096
# M = 96: 16.1 → 19.2) they lose; every case gave the decode tiles' bits.
PARTS_TILE = (64, 2, 4)  # (token tile, x stages per consumer, warpgroups)
PARTS_MIN_FILL = 0.7


def fragment_fits(n: int, k: int) -> bool:
    """Whole 64 × 128 tiles (the layout has no partial tiles)."""
    return n % TILE_N == 0 and k % TILE_K == 0


def _check_fits(n: int, k: int) -> None:
    if not fragment_fits(n, k):
        raise ValueError(f"fragment-major weights need N % {TILE_N} == 0 and K % {TILE_K} == 0, got N={n}, K={k}")


# Rows repacked at a time: the int64 scratch stays at ~16 bytes per weight of one chunk (128 MB at K = 8192)
# instead of the whole layer's (3.8 GB for 28672×8192) while a model loads.
REPACK_ROWS = 1024


def fragment_major_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight [K // 8, N] int32 (``w4a16_gemm``'s packed layout) → the fragment-major words, shaped [N, K // 8]."""
    check_tensor("qweight", qweight, dtypes=(torch.int32,), dim=2)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    _check_fits(n, k)
    out = torch.empty((n, k // 8), dtype=torch.int32, device=qweight.device)
    shifts = torch.arange(0, 32, 4, device=qweight.device)
    for n0 in range(0, n, REPACK_ROWS):  # tiles of consecutive 64-row blocks are consecutive in the layout
        rows = min(REPACK_ROWS, n - n0)
        nib = unpack_int4_rows(qweight[:, n0:n0 + rows]).to(torch.int64)  # [K, rows]
        # (k, n) as (tk, s, h, c, e) × (tn, w, r, g) → (tn, tk, w, g, c, s, e, h, r): nibble 4 e + 2 h + r of word s
        t = nib.reshape(k // TILE_K, 8, 2, 4, 2, rows // TILE_N, 4, 2, 8).permute(5, 0, 6, 8, 3, 1, 4, 2, 7)
        words = (t.reshape(-1, 8) << shifts).sum(dim=1)
        out[n0:n0 + rows] = torch.where(words >= 2**31, words - 2**32, words).reshape(rows, k // 8)
    return out


def fragment_major_int8(q: torch.Tensor) -> torch.Tensor:
    """Row-major int8 [N, K] → fragment-major int32 words [N, K // 4]: in each 64 × 128 tile thread t's 16 words,
    two per k16 step s (column half h), word (s, h) holding bytes (r0, k), (r0, k + 1), (r0 + 8, k),
    (r0 + 8, k + 1) for k = 16 s + 8 h + 2 c (rows and lanes as the int4 layout). The kernel's int8 mode reads
    it (the per-channel scale then applies to the fp32 sum, as in ``w8a16_gemm``)."""
    check_tensor("q", q, dtypes=(torch.int8,), dim=2)
    n, k = q.shape
    _check_fits(n, k)
    t = q.reshape(n // TILE_N, 4, 2, 8, k // TILE_K, 8, 2, 4, 2)  # (tn, w, r, g, tk, s, h, c, e)
    t = t.permute(0, 4, 1, 3, 7, 5, 6, 2, 8)  # (tn, tk, w, g, c, s, h, r, e): byte 2 r + e of word (s, h)
    return t.contiguous().reshape(-1, 4).view(torch.int32).reshape(n, k // 4)


def row_major_from_fragment_int8(words: torch.Tensor) -> torch.Tensor:
    """The inverse of ``fragment_major_int8``: words [N, K // 4] → int8 [N, K]."""
    check_tensor("words", words, dtypes=(torch.int32,), dim=2)
    n, k = words.shape[0], words.shape[1] * 4
    _check_fits(n, k)
    t = words.contiguous().view(torch.int8).reshape(n // TILE_N, k // TILE_K, 4, 8, 4, 8, 2, 2, 2)
    return t.permute(0, 2, 7, 3, 1, 5, 6, 4, 8).reshape(n, k)  # (tn, tk, w, g, c, s, h, r, e) → (n, k)


def packed_from_fragment(words: torch.Tensor) -> torch.Tensor:
    """The inverse of ``fragment_major_int4``: words [N, K // 8] → qweight [K // 8, N]."""
    check_tensor("words", words, dtypes=(torch.int32,), dim=2)
    n, k = words.shape[0], words.shape[1] * 8
    _check_fits(n, k)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nib = (words.reshape(-1, 1) >> shifts) & 0xF  # [words, 8]: nibble 4 e + 2 h + r
    t = nib.reshape(n // TILE_N, k // TILE_K, 4, 8, 4, 8, 2, 2, 2)  # (tn, tk, w, g, c, s, e, h, r)
    t = t.permute(1, 5, 7, 4, 6, 0, 2, 8, 3)  # → (tk, s, h, c, e) × (tn, w, r, g) = (k, n)
    rows = t.reshape(k // 8, 8, n).to(torch.int64)  # packed row k // 8, nibble k % 8
    packed = (rows << shifts.to(torch.int64)[None, :, None]).sum(dim=1)  # disjoint bits: the sum is an OR
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@dataclass(frozen=True)
class FragmentProblem:
    M: int
    N: int
    K: int
    dtype: torch.dtype
    device: torch.device


def fragment_kernel_runs_on(device: torch.device) -> tuple[bool, str]:
    """Whether the Gluon kernel can run on ``device`` (an sm_90 GPU with Triton's Gluon dialect)."""
    if device.type != "cuda":
        return False, "needs a CUDA device"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False, "needs an sm_90 GPU (Hopper wgmma)"
    try:
        from . import _fragment_gluon  # noqa: F401  (Triton's Gluon dialect)
    except ImportError as e:
        return False, f"Gluon unavailable: {e}"
    return True, ""


def _gluon_runnable(p: FragmentProblem) -> tuple[bool, str]:
    if reference_forced():
        return False, "reference forced"
    return fragment_kernel_runs_on(p.device)


def block_m_for(m: int, n: int, k: int) -> int:
    """Token tile by M, from the H100 probe (benchmarks/NOTES.md; six Llama shapes, one run): 8 up to M = 8
    (M = 1: 8 beat 16 on all six), 16 up to 16, 32 up to 32, 64 up to 64, and up to 128 while the weight is under
    2^27 elements (M = 128: 64-token tiles won on the four smaller shapes, e.g. 6144×4096 24.2 vs 31.7 µs,
    128-token ones on the two 70B shapes, 155 vs 167), else 128. 32-token tiles at 17-32 tokens (H200, same run,
    M = 32, µs 64- → 32-token tiles, int8 / int4): 6144×4096 14.3 → 11.9 / 12.8 → 12.2, 4096×4096 11.8 → 9.4 /
    10.9 → 8.3, 4096×14336 25.6 → 21.9 / 22.8 → 20.3, 28672×4096 43.5 → 35.8 / 38.7 → 31.1; at 48 and 64 tokens
    two of them lost (6144×4096 int8 M = 64: 15.9 → 18.0)."""
    for bm in (8, 16, 32, 64):
        if m <= bm:
            return bm
    return 64 if m <= 128 and n * k < 2**27 else 128


def blocks_ahead(block_m: int, programs_per_sm: float = 0.0) -> int:
    """K-blocks of weight words in flight (the kernel's AHEAD): 3 with decode token tiles (M ≤ 16; H100, int4,
    six Llama shapes at M = 1, 4, 16, same run: geomean 20.76 / 20.27 / 20.81 µs for 2 / 3 / 4), 2 with larger
    tiles (more register sets cost occupancy there; sm_90a, int4, 64-token tile: 128 registers at 2, 184 at 3),
    except 64-token tiles of a launch with at most two programs per SM, which two of the 184-register programs
    still fill (H200, same run, µs 2 → 3, int8 / int4: 4096×4096 M = 48 11.7 / 10.3 → 10.9 / 9.5, M = 64 12.5 /
    10.9 → 11.7 / 10.4; 4096×14336 M = 64, 3.9 programs per SM, int8 30.5 → 32.6; 32-token tiles lost at two per
    SM too, 4096×4096 M = 32 9.5 / 8.2 → 9.9 / 8.7)."""
    if block_m <= 16 or (block_m == 64 and 0 < programs_per_sm <= 2):
        return 3
    return 2


def batch_tile_for(device: torch.device, m: int, n: int, k: int, int4: bool):
    """(warpgroups, token tile, x stages, serial) of the batch-tile kernel for this problem, or None: the decode
    tiles up to M = 64 (unsplit weights of at least 128 · SMs rows: up to 32, SMALL_BATCH_TILE above; split weights:
    up to 128, and on weights of 2^27 elements or more where the serial tiles leave waves part-empty), dequantize +
    cuBLAS above LARGE_M_BATCH (split weights: above LARGE_M_FRAGMENT, and at it where the serial tiles leave waves
    part-empty), N not a multiple of 128."""
    if m <= 32 or n % (2 * TILE_N):
        return None
    if split_k_on(device, "w4a16_fragment", n, k, TILE_K) == 1:
        if m <= 64:
            return SMALL_BATCH_TILE + (False,) if n >= 2 * TILE_N * num_sms(device, DEFAULT_SMS) else None
        if m > LARGE_M_BATCH:
            return None
        warpgroups, block_m, stages = BATCH_TILE[int4]
        while n % (TILE_N * warpgroups):
            warpgroups //= 2
        return warpgroups, block_m, stages, False
    if not 2 * TILE_N < m <= LARGE_M_FRAGMENT:
        return None
    return serial_tile_for(m, n, k, num_sms(device, DEFAULT_SMS))


def serial_tile_for(m: int, n: int, k: int, sms: int):
    """(warpgroups, token tile, x stages, True): the serial tile of SERIAL_BATCH_TILES with the fewest weighted
    waves for M tokens on N rows (ties: the earlier), or None where its waves must be ≥ 90 % full and are not: at
    M = LARGE_M_FRAGMENT (dequantize + cuBLAS serves there) and on weights of 2^27 elements or more (decode tiles)."""
    best = None
    for warpgroups, block_m, stages, per_sm, wave_time in SERIAL_BATCH_TILES:
        if n % (TILE_N * warpgroups) or (warpgroups == 1 and block_m == 128 and 0 < m % 128 <= 64):
            continue
        tiles = n // (TILE_N * warpgroups) * triton.cdiv(m, block_m)
        waves = triton.cdiv(tiles, per_sm * sms)
        if best is None or waves * wave_time < best[0]:
            best = waves * wave_time, tiles / (waves * per_sm * sms), (warpgroups, block_m, stages, True)
    if best is None or ((m >= LARGE_M_FRAGMENT or n * k >= 2**27) and best[1] < 0.9):
        return None
    return best[2]


def piped_tile_for(device: torch.device, m: int, n: int, k: int, int4: bool, batch=False):
    """(warpgroups, token tile, x halves, word stages) of the piped tiles for this problem, or None: weights that
    the unsplit batch tiles serve with two or more warpgroups, from PIPED_MIN_M tokens. ``batch``: this problem's
    ``batch_tile_for`` where the caller has it."""
    if not (PIPED and m >= PIPED_MIN_M):
        return None
    if batch is False:
        batch = batch_tile_for(device, m, n, k, int4)
    if batch is None or batch[3] or n % (TILE_N * PIPED_TILE[0]):
        return None
    return PIPED_TILE


def paired_tile_for(device: torch.device, m: int, n: int, k: int) -> Optional[int]:
    """The token tile of the paired tiles for this problem, or None: a split weight of an even count of equal
    ranges, 64 < M < LARGE_M_FRAGMENT, the first of PAIRED_BLOCK_MS whose last token tile is more than half full
    and whose tiles fill PAIRED_MIN_FILL to 1 wave."""
    if not TILE_N < m < LARGE_M_FRAGMENT:
        return None
    split = split_k_on(device, "w4a16_fragment", n, k, TILE_K)
    if split < 2 or split % 2 or (k // TILE_K) % split:
        return None
    sms = num_sms(device, DEFAULT_SMS)
    for block_m in PAIRED_BLOCK_MS:
        if 0 < m % block_m <= block_m // 2:
            continue
        if PAIRED_MIN_FILL * sms <= n // TILE_N * triton.cdiv(m, block_m) <= sms:
            return block_m
    return None


def streamed_tile_for(device: torch.device, m: int, n: int, k: int):
    """(warpgroups, token tile, x stages) of the streamed tiles for this problem, or None: a split weight whose
    ranges are equal and of an even count of K-blocks, M ≤ LARGE_M_FRAGMENT with the last token tile at least half
    full, and tiles filling STREAMED_MIN_FILL to 1 of one wave."""
    warpgroups, block_m, stages = STREAMED_TILE
    if not STREAMED or m > LARGE_M_FRAGMENT or 0 < m % block_m < block_m // 2 or n % (TILE_N * warpgroups):
        return None
    split = split_k_on(device, "w4a16_fragment", n, k, TILE_K)
    blocks = k // TILE_K
    if split < 2 or blocks % split or (blocks // split) % 2:
        return None
    sms = num_sms(device, DEFAULT_SMS)
    tiles = n // (TILE_N * warpgroups) * triton.cdiv(m, block_m)
    return STREAMED_TILE if STREAMED_MIN_FILL * sms <= tiles <= sms else None


def parts_tile_for(device: torch.device, m: int, n: int, k: int):
    """(token tile, x stages, warpgroups) of the parts tiles for this problem, or None: a split weight of equal
    ranges whose count the warpgroups divide, M < LARGE_M_FRAGMENT in whole token tiles, and tiles filling
    PARTS_MIN_FILL to 1 of one wave."""
    block_m, _stages, parts = PARTS_TILE
    if not 0 < m < LARGE_M_FRAGMENT or m % block_m:
        return None
    split = split_k_on(device, "w4a16_fragment", n, k, TILE_K)
    if split < parts or split % parts or (k // TILE_K) % split:
        return None
    sms = num_sms(device, DEFAULT_SMS)
    return PARTS_TILE if PARTS_MIN_FILL * sms <= n // TILE_N * (m // block_m) <= sms else None


def gluon_tile_for(device: torch.device, m: int, n: int, k: int, int4: bool) -> tuple[str, tuple]:
    """(kernel, tile) of the Gluon kernel that serves this problem: the first rule that takes it, in this order:
    streamed tiles (``streamed_tile_for``), parts tiles (``parts_tile_for``), paired tiles (``paired_tile_for``;
    the tile: its token tile), piped tiles (``piped_tile_for``), batch tiles (``batch_tile_for``: unsplit, or split
    weights' ranges run serially), else the decode tiles on ``block_m_for``'s token tile."""
    tile = streamed_tile_for(device, m, n, k)
    if tile is not None:
        return "streamed", tile
    tile = parts_tile_for(device, m, n, k)
    if tile is not None:
        return "parts", tile
    paired = paired_tile_for(device, m, n, k)
    if paired is not None:
        return "paired", (paired,)
    batch = batch_tile_for(device, m, n, k, int4)
    tile = piped_tile_for(device, m, n, k, int4, batch)
    if tile is not None:
        return "piped", tile
    if batch is not None:
        return "batch", batch
    return "decode", (block_m_for(m, n, k),)


def _dequant_suits(p, int4: bool) -> tuple[bool, str]:
    if p.device.type != "cuda" or p.M < LARGE_M_FRAGMENT:
        return False, f"meant for CUDA with M >= {LARGE_M_FRAGMENT}"
    kernel, _tile = gluon_tile_for(p.device, p.M, p.N, p.K, int4)
    if kernel != "decode":
        return False, f"the {kernel} tiles serve this problem"
    return True, ""


def _run_gluon(p, x2, words, scales, bias, int4=True):
    from ._fragment_gluon import launch, launch_paired, launch_parts, launch_piped, launch_streamed, launch_tma

    kernel, tile = gluon_tile_for(x2.device, p.M, p.N, p.K, int4)
    y = torch.empty((p.M, p.N), dtype=x2.dtype, device=x2.device)

    def plan(num_tiles=0, **how):
        return plan_split(x2.device, "w4a16_fragment", p.M, p.N, p.K, TILE_K, num_tiles, y, **how)

    if kernel == "streamed":
        warpgroups, block_m, stages = tile
        launch_streamed(x2, words, scales, bias, y, plan(serial=True), block_m, int4=int4, stages=stages,
                        warpgroups=warpgroups, pdl=GLUON_PDL)
    elif kernel == "parts":
        block_m, stages, parts = tile
        launch_parts(x2, words, scales, bias, y, plan(serial=True), block_m, int4=int4, stages=stages, parts=parts,
                     pdl=GLUON_PDL)
    elif kernel == "paired":
        launch_paired(x2, words, scales, bias, y, plan(serial=True), tile[0], int4=int4, stages=PAIRED_STAGES,
                      pdl=GLUON_PDL)
    elif kernel == "piped":
        warpgroups, block_m, halves, word_stages = tile
        launch_piped(x2, words, scales, bias, y, plan(split_k=1), block_m, int4=int4, halves=halves,
                     warpgroups=warpgroups, word_stages=word_stages, pdl=GLUON_PDL)
    elif kernel == "batch":
        warpgroups, block_m, stages, serial = tile
        num_tiles = p.N // (TILE_N * warpgroups) * triton.cdiv(p.M, block_m)
        launch_tma(x2, words, scales, bias, y, plan(num_tiles, serial=serial), block_m, int4=int4, stages=stages,
                   warpgroups=warpgroups, pdl=GLUON_PDL)
    else:
        (block_m,) = tile
        # split from N, K and the SM count (PROGRAMS_PER_SM), always through partials (no serial variant)
        num_tiles = p.N // TILE_N * triton.cdiv(p.M, block_m)
        split = plan(num_tiles, serial=False)
        per_sm = num_tiles * split.split_k / num_sms(x2.device, DEFAULT_SMS)
        range_blocks = split.k_per_split // TILE_K
        sum_kernel, sum_pdl = split_sum_launch(split.split_k, range_blocks, int4, block_m, per_sm)
        ahead = blocks_ahead(block_m, per_sm)
        pair, max_regs = decode_pair(p.K, split.k_per_split, int4, p.M, per_sm)
        if pair:  # the words of two pairs in flight
            ahead = 4
        launch(x2, words, scales, bias, y, split, block_m, int4=int4, ahead=ahead,
               pdl=decode_pdl_mode(p.M, int4, range_blocks), sum_kernel=sum_kernel, sum_pdl=sum_pdl, pair=pair,
               max_regs=max_regs, **({"stages": PAIR_STAGES} if pair else {}))
    return y


# The dequantization pass (from LARGE_M_FRAGMENT on split weights, above LARGE_M_BATCH on unsplit ones): K-tiles
# of one 64-row block per program and warps per program, by width. H200, CUDA graphs, one run, µs (1, 4) → (1, 8)
# → (2, 8) (the floor: words, scales and W at the copy bandwidth): int8 4096×14336 51.5 → 45.6 → 44.7 (41.8),
# 28672×4096 93.4 → 87.6 → 87.4 (83.7), 8192×28672 193.5 → 173.4 → 173.2 (167.3), 4096×4096 16.6 → 13.8 → 13.1
# (12.0); int4 4096×14336 39.3 → 38.4 → 45.2 (35.1), 28672×4096 75.0 → 74.3 → 85.3 (70.2), 4096×4096 12.8 → 11.3 →
# 14.4 (10.0); four K-tiles on four warps spill (int8 4096×14336: 739 µs).
DEQUANT_TILES = {False: (2, 8), True: (1, 8)}  # int4?


@triton.jit
def _store_tile_rows(v, out_ptr, tn, tk, K, KT: tl.constexpr):
    """Store KT dequantized 64 × 128 tiles of one row block, held as [KT, 128 threads (w, g, c), 8 k16 steps s,
    column half h, row r, element e] (both widths' decoders end there), at their place in W [N, K], in row order:
    the permute is a layout change the compiler does through shared memory, so the stores are whole rows."""
    v = tl.permute(tl.reshape(v, (KT, 4, 8, 4, 8, 2, 2, 2)), (1, 6, 2, 0, 4, 5, 3, 7))  # (w, r, g, kt, s, h, c, e)
    rows = tn * 64 + tl.arange(0, 64)
    cols = tk * 128 + tl.arange(0, KT * 128)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
             tl.reshape(v, (64, KT * 128)).to(out_ptr.dtype.element_ty))


@triton.jit
def _program_tiles(w_ptr, K, KT: tl.constexpr, WORDS: tl.constexpr):
    """This program's KT consecutive fragment-major tiles of one 64-row block (WORDS words per thread of a tile):
    (row block tn, its first K-tile tk, kt [KT, 1, 1], each thread's first row r0 [1, 128, 1], the words
    [KT, 128 threads, WORDS])."""
    tiles_k = K // 128
    tn = tl.program_id(0) // (tiles_k // KT)
    tk = tl.program_id(0) % (tiles_k // KT) * KT
    kt = tl.arange(0, KT)[:, None, None]
    t = tl.arange(0, 128)[None, :, None]  # thread of a tile
    words = tl.load(w_ptr + (tn.to(tl.int64) * tiles_k + tk) * (128 * WORDS) + kt * (128 * WORDS) + t * WORDS
                    + tl.arange(0, WORDS)[None, None, :])
    return tn, tk, kt, tn * 64 + 16 * (t // 32) + (t % 32) // 4, words


@triton.jit
def _dequant_fragment_kernel(w_ptr, s_ptr, out_ptr, N, K, KT: tl.constexpr):
    """W [N, K] from KT consecutive fragment-major tiles of one row block per program, (q − 8) · s rounded once as
    ``dequantize_packed``, stored in row order (``_store_tile_rows``)."""
    tn, tk, kt, r0, words = _program_tiles(w_ptr, K, KT, 8)  # a thread's words: its k16 steps
    DT: tl.constexpr = out_ptr.dtype.element_ty
    sa = tl.load(s_ptr + (tk + kt) * N + r0).to(DT).to(tl.float32)
    sb = tl.load(s_ptr + (tk + kt) * N + r0 + 8).to(DT).to(tl.float32)
    v0 = ((words & 0xF) - 8).to(tl.float32) * sa  # nibble 4 e + 2 h + r: row r0 + 8 r, column 16 s + 8 h + 2 c + e
    v1 = (((words >> 4) & 0xF) - 8).to(tl.float32) * sb
    v2 = (((words >> 8) & 0xF) - 8).to(tl.float32) * sa
    v3 = (((words >> 12) & 0xF) - 8).to(tl.float32) * sb
    v4 = (((words >> 16) & 0xF) - 8).to(tl.float32) * sa
    v5 = (((words >> 20) & 0xF) - 8).to(tl.float32) * sb
    v6 = (((words >> 24) & 0xF) - 8).to(tl.float32) * sa
    v7 = (((words >> 28) & 0xF) - 8).to(tl.float32) * sb
    # [kt, t, s, h, r, e]
    v = tl.join(tl.join(tl.join(v0, v2), tl.join(v1, v3)), tl.join(tl.join(v4, v6), tl.join(v5, v7)))
    _store_tile_rows(v, out_ptr, tn, tk, K, KT)


@triton.jit
def _dequant_fragment_int8_kernel(w_ptr, s_ptr, out_ptr, N, K, KT: tl.constexpr):
    """W [N, K] = q · s[row] (an fp32 product rounded once, as ``dequantize_int8``) from KT consecutive
    fragment-major int8 tiles of one row block per program, stored in row order (``_store_tile_rows``)."""
    tn, tk, _kt, r0, words = _program_tiles(w_ptr, K, KT, 16)  # a thread's words: (k16 step s, column half h)
    sa = tl.load(s_ptr + r0).to(tl.float32)
    sb = tl.load(s_ptr + r0 + 8).to(tl.float32)
    v0 = ((words << 24) >> 24).to(tl.float32) * sa  # byte 2 r + e: row r0 + 8 r, column 16 s + 8 h + 2 c + e
    v1 = ((words << 16) >> 24).to(tl.float32) * sa
    v2 = ((words << 8) >> 24).to(tl.float32) * sb
    v3 = (words >> 24).to(tl.float32) * sb
    v = tl.join(tl.join(v0, v2), tl.join(v1, v3))  # [kt, t, s h, r, e]
    _store_tile_rows(v, out_ptr, tn, tk, K, KT)


def _dequant_launch(kernel, words, scales, out, n, k, tiles, int4):
    """One dequantization pass: ``tiles`` = (K-tiles per program, warps), the width's DEQUANT_TILES by default; the
    K-tiles fall back to a divisor of K / 128."""
    k_tiles, warps = tiles or DEQUANT_TILES[int4]
    k_tiles = math.gcd(k_tiles, k // TILE_K)
    kernel[((n // TILE_N) * (k // TILE_K) // k_tiles,)](words, scales.contiguous(), out, n, k, KT=k_tiles,
                                                          num_warps=warps)
    return out


def dequantize_fragment_int8(words: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                             tiles: Optional[tuple] = None) -> torch.Tensor:
    """W [N, K] in ``dtype`` from fragment-major int8 words and per-channel scales [N]: the values
    ``dequantize_int8`` gives the row-major weight. One Triton pass on CUDA (or under the interpreter), torch
    elsewhere."""
    n, k = words.shape[0], words.shape[1] * 4
    if words.device.type == "cuda" or interpreter_active():
        out = torch.empty((n, k), dtype=dtype, device=words.device)
        return _dequant_launch(_dequant_fragment_int8_kernel, words, scales, out, n, k, tiles, False)
    q = row_major_from_fragment_int8(words)
    return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def dequantize_fragment(words: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                        tiles: Optional[tuple] = None) -> torch.Tensor:
    """Wᵀ [K, N] in ``dtype`` (a transposed view) from fragment-major words: the values ``dequantize_packed``
    gives the packed weight. One Triton pass on CUDA (or under the interpreter); elsewhere through the packed
    layout."""
    n, k = words.shape[0], words.shape[1] * 8
    if words.device.type == "cuda" or interpreter_active():
        out = torch.empty((n, k), dtype=dtype, device=words.device)
        return _dequant_launch(_dequant_fragment_kernel, words, scales, out, n, k, tiles, True).t()
    return dequantize_packed(packed_from_fragment(words), scales, None, GROUP_SIZE, dtype)


def _run_dequant_matmul(p, x2, words, scales, bias):
    w = dequantize_fragment(words, scales, x2.dtype)
    return torch.addmm(bias, x2, w) if bias is not None else x2 @ w


def _run_reference(p, x2, words, scales, bias):
    return w4a16_gemm_ref(x2, packed_from_fragment(words), scales, None, GROUP_SIZE, bias, None)


W4A16_FRAGMENT: KernelFamily = KernelFamily(
    "w4a16_fragment",
    [
        Candidate("dequant_matmul", can_implement=lambda p: (True, ""), run=_run_dequant_matmul,
                  suits=partial(_dequant_suits, int4=True)),
        Candidate("gluon", can_implement=_gluon_runnable, run=_run_gluon),
        Candidate("reference", can_implement=lambda p: (True, ""), run=_run_reference),
    ],
    problem_key=lambda p: (p.N, p.K, m_bucket(p.M), p.dtype, p.device.type),
)


def _validate(x, words, scales, bias, int4=True) -> None:
    """int4: words [N, K // 8], group-128 scales [K // 128, N]; int8: words [N, K // 4], scales [N]."""
    check_tensor("x", x, dtypes=ACT_DTYPES)
    check_tensor("words", words, dtypes=(torch.int32,), dim=2)
    check_tensor("scales", scales, dtypes=SCALE_DTYPES if int4 else CHANNEL_SCALE_DTYPES, dim=2 if int4 else 1)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    per_word = 8 if int4 else 4
    n, k = words.shape[0], x.shape[-1]
    if words.shape[1] * per_word != k:
        raise ValueError(f"x has K={k} but the fragment-major {'int4' if int4 else 'int8'} words "
                         f"[N, K // {per_word}] hold K={words.shape[1] * per_word}")
    _check_fits(n, k)
    check_shape("scales", scales, (k // GROUP_SIZE, n) if int4 else (n,))
    if bias is not None:
        check_tensor("bias", bias, dtypes=(x.dtype,), dim=1)
        check_shape("bias", bias, (n,))
    check_same_device(x=x, words=words, scales=scales, bias=bias)


def _fake(x, words, scales, bias=None, int4=True):
    _validate(x, words, scales, bias, int4)
    return x.new_empty((*x.shape[:-1], words.shape[0]))


def _gemm(family: KernelFamily, x, words, scales, bias) -> torch.Tensor:
    """The op body shared by both widths (inputs validated): flatten x, pick the candidate, restore x's shape."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    p = FragmentProblem(x2.shape[0], words.shape[0], x2.shape[1], x.dtype, x.device)
    if p.M == 0:
        return x.new_empty((*lead, p.N))
    return family.select(p).run(p, x2, words, scales, bias).reshape(*lead, p.N)


def _sample_layers(device):
    """(x, fp weight, bias) for the registered ops' checks: a 3 × 64 × 256 fp16 layer, a 1 × 128 × 128 bf16 one."""
    g = torch.Generator(device="cpu").manual_seed(0)
    for (m, n, k), dtype, with_bias in (((3, 64, 256), torch.float16, False), ((1, 128, 128), torch.bfloat16, True)):
        x = torch.randn(m, k, generator=g).to(dtype).to(device)
        b = torch.randn(n, generator=g).to(dtype).to(device) if with_bias else None
        yield x, (torch.randn(n, k, generator=g) * 0.05).to(dtype), b


def _samples(device):
    from ..quantization.int4 import quantize_weight_int4

    for x, w, b in _sample_layers(device):
        w4 = quantize_weight_int4(w, GROUP_SIZE, sym=True)
        yield (x, fragment_major_int4(w4.qweight).to(device), w4.scales.to(device), b), {}


@register_op("w4a16_fragment_gemm", fake=_fake, samples=_samples)
def w4a16_fragment_gemm(
    x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] · Wᵀ (+ bias) for a symmetric group-128 int4 weight stored fragment-major
    (``fragment_major_int4``), scales [K // 128, N]. The same results as ``w4a16_gemm`` on the packed weight.

    Kernel chosen by ``W4A16_FRAGMENT``: the Gluon kernels on sm_90 (``gluon_tile_for``: streamed, parts, paired,
    piped, batch or decode tiles), dequantize + cuBLAS from LARGE_M_FRAGMENT where the decode tiles would serve (or
    anywhere on CUDA when forced), the fp32 reference elsewhere. Registered as
    ``torch.ops.angel_kernels.w4a16_fragment_gemm``."""
    _validate(x, words, scales, bias)
    return _gemm(W4A16_FRAGMENT, x, words, scales, bias)


# ----------------------------------------------------------------------------------------- int8 (w8a16, ifq)
def _run_dequant_matmul_int8(p, x2, words, scales, bias):
    w = dequantize_fragment_int8(words, scales, x2.dtype)  # scaled before the product: x · qᵀ can overflow fp16
    return torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()


def _run_reference_int8(p, x2, words, scales, bias):
    return w8a16_gemm_ref(x2, row_major_from_fragment_int8(words), scales, bias)


W8A16_FRAGMENT: KernelFamily = KernelFamily(
    "w8a16_fragment",
    [
        Candidate("dequant_matmul", can_implement=lambda p: (True, ""), run=_run_dequant_matmul_int8,
                  suits=partial(_dequant_suits, int4=False)),
        Candidate("gluon", can_implement=_gluon_runnable, run=partial(_run_gluon, int4=False)),
        Candidate("reference", can_implement=lambda p: (True, ""), run=_run_reference_int8),
    ],
    problem_key=lambda p: (p.N, p.K, m_bucket(p.M), p.dtype, p.device.type),
)


def _samples_int8(device):
    from ..quantization.int8 import quantize_weight_int8

    for x, w, b in _sample_layers(device):
        q, s = quantize_weight_int8(w)
        yield (x, fragment_major_int8(q).to(device), s.to(device), b), {}


@register_op("w8a16_fragment_gemm", fake=partial(_fake, int4=False), samples=_samples_int8)
def w8a16_fragment_gemm(
    x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y [..., N] = (x [..., K] · qᵀ) · scales (+ bias) for an int8 weight stored fragment-major
    (``fragment_major_int8``: words [N, K // 4]) with one scale per output channel [N]: ``w8a16_gemm``'s results on
    the row- or tile-major weight (the same split rule and k16 chain; a GPU test checks the bits on three shapes at
    M = 1-300 and at 1024, against ``w8a16_gemm``'s kernel where a batch tile serves, its dequantize + cuBLAS
    elsewhere; where only one of the two dequantizes, they agree within rounding).

    Kernel chosen by ``W8A16_FRAGMENT``: the Gluon kernels' int8 mode on sm_90 (``gluon_tile_for``: streamed,
    paired, piped, batch or decode tiles), dequantize + cuBLAS from LARGE_M_FRAGMENT where the decode tiles would
    serve (or anywhere on CUDA when forced), the fp32 reference elsewhere. Registered as
    ``torch.ops.angel_kernels.w8a16_fragment_gemm``."""
    _validate(x, words, scales, bias, int4=False)
    return _gemm(W8A16_FRAGMENT, x, words, scales, bias)
