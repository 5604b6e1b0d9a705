"""Paged decode attention over an int8 (per-token-head scales) or fp16/bf16 KV cache: flash-decoding split-KV.

One program serves one (sequence, KV head) and all the query rows that read that head — the ``H_q / H_kv``
query heads of the GQA group (× the query tokens of the sequence, ``NUM_QUERIES``; 1 for decode) — so each KV
byte is read once. ``q·kᵀ`` and ``p·v`` run on tensor cores, the rows padded to the MMA's 16-row M side, or
(``HEADS_N``) to its 8-wide N side with the tiles transposed (``k·qᵀ``, ``vᵀ·pᵀ``): 4 real rows of 8 instead of 16
halve the accumulator and score registers (the shipped int8 tile: 255 → 168 registers).

Dequantization is fused: the scores of an int8 K tile are ``(q · k_int8ᵀ) · k_scale[token]`` (K itself is
never dequantized), and the V scales are folded into the probabilities, ``p · (v_scale / max v_scale)``, with the
tile's max scale applied to the fp32 product (so small scales cannot underflow fp16's range). Softmax in fp32,
base 2 (``scale · log2 e`` folded into the per-token score factor).

Split-KV policy (``SplitPolicy``): a sequence's context ``[kv_lo, L)`` is cut into tiles of ``BLOCK_N`` tokens
(aligned to absolute positions) and the tiles into ``num_splits = ceil(tiles / tiles_per_split)`` contiguous
splits, ``tiles_per_split = max(ceil(tiles / max_splits), min(min_split_tiles, ceil(tiles / min_splits)))``:
at least ``min_split_tiles`` per split, except that a short context still gets ``min_splits`` splits (one tile
each at 1k tokens: B=1×1k int8 12.2 → 9.3 µs on the H100) without cutting a 4k context into single-tile programs
(B=32×4k 141.5 vs 164.0 µs). ``max_splits`` comes from the device's SM count and the number of KV heads (the
config's ``PROGRAMS_PER_SM`` programs per SM for a single sequence, rounded down to a power of two unless
``EXACT_SPLITS``, at most ``SPLITS_CAP``, default ``MAX_SPLITS_CAP``), so the partition of a sequence depends on
its own length and on constants of the model and GPU, never on the batch.
Each split's partial output (``partial_dtype``: fp16 for fp16 queries, else fp32) and log-sum-exp (fp32) go to
scratch; a second kernel combines a sequence's splits in a fixed order (deterministic, no atomics); a sequence
with one split is written directly.
The grid's split dimension (how many programs share a sequence's splits, each looping over every
``grid_splits``-th split) does follow the batch size, to keep the SMs busy at any batch — it changes which
program computes a split, never what the split computes, so outputs are bitwise batch-invariant.

Host checks cost no device sync: ``seq_lens`` and ``block_table`` contents are checked only when they live on
the CPU. On CUDA, a length beyond the block table's capacity (``max_blocks · block_size``) is clamped to it in
the kernel (no out-of-bounds read of the table) and block ids are trusted (an id ≥ num_blocks reads out of
bounds); ``seq_lens[b] == 0`` gives zeros.

Candidates (``ANGEL_KERNELS_FORCE_PAGED_DECODE`` / ``ANGEL_KERNELS_DISABLE=paged_decode.<name>``):
``split_kv`` (Triton, above) and ``reference`` (fp32 pure torch, the CPU path).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .._int8_words import int8_words_to_float, mma_operand_fence
from .._registry import register_op
from ..dispatch import Candidate, KernelFamily
from ..reference.attention import paged_attention_ref
from ..runtime import (dependent_launch, dependent_launch_supported, interpreter_active, reference_forced,
                       triton_runnable_on)
from ..runtime import num_sms as runtime_num_sms
from ..tuning import KernelConfig, default_store
from .kv_cache import (INLINE_SCALE_BYTES, PagedAttentionProblem, check_attention_inputs, check_attention_options,
                       check_block_table_on_host, inline_scale_views, random_kv_caches, row_alignment)

KERNEL_NAME = "paged_decode.split_kv"
LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)  # the same constant, visible inside kernels
# a single sequence gets about this many programs per SM across its KV heads (latency of short decodes)
PROGRAMS_PER_SM = 2
# Default upper bound of a sequence's splits (a config's SPLITS_CAP overrides it). The scratch holds
# batch × query heads × splits × head dim partials: 1 MB per sequence at 128 splits for Llama-3-8B heads in fp16.
MAX_SPLITS_CAP = 64
# The split kernel's partial outputs (normalized, one per split): PARTIAL_DTYPE, or ``partial_dtype``'s choice when
# None; the reduce kernel's warps: REDUCE_WARPS, or ``reduce_warps``'s when 0. Module constants so that probes can
# vary them.
PARTIAL_DTYPE = None
REDUCE_WARPS = 0
# Interpreter: a pretend 4-SM device so CPU tests see several splits (and grid-strided splits) at ~300 tokens.
INTERPRETER_SMS = 4
INTERPRETER_CONFIG = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=0, num_warps=4, num_stages=1,
                                  extra=(("MIN_SPLIT_TILES", 1),))


PagedDecodeProblem = PagedAttentionProblem  # one problem description for the decode and varlen kernels


@dataclass(frozen=True)
class SplitPolicy:
    """How a sequence's context is partitioned (Python mirror of the kernels' ``_split_range``)."""

    block_n: int
    min_split_tiles: int
    max_splits: int
    min_splits: int = 1

    def split_tiles(self, seq_len: int, num_queries: int = 1, sliding_window: Optional[int] = None):
        """(first_tile, num_tiles, tiles_per_split, num_splits) of a sequence."""
        kv_lo = max(0, seq_len - num_queries + 1 - sliding_window) if sliding_window else 0
        first = kv_lo // self.block_n
        tiles = max(0, -(-seq_len // self.block_n) - first)
        per_split = max(-(-tiles // self.max_splits), min(self.min_split_tiles, max(1, -(-tiles // self.min_splits))))
        return first, tiles, per_split, -(-tiles // per_split)

    def num_splits(self, seq_len: int, num_queries: int = 1, sliding_window: Optional[int] = None) -> int:
        return self.split_tiles(seq_len, num_queries, sliding_window)[3]

    def max_num_splits(self, capacity: int) -> int:
        """Upper bound of ``num_splits`` over every length ≤ capacity (scratch size)."""
        tiles = -(-capacity // self.block_n)
        return max(1, min(self.max_splits, max(-(-tiles // self.min_split_tiles), min(tiles, self.min_splits))))


# ------------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _split_range(L, window, NUM_QUERIES: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 BLOCK_N: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, MAX_SPLITS: tl.constexpr,
                 MIN_SPLITS: tl.constexpr):
    """A sequence's partition: (first_tile, end_tile, tiles_per_split, num_splits). Depends on L only."""
    if HAS_WINDOW:
        kv_lo = tl.maximum(L - NUM_QUERIES + 1 - window, 0)
    else:
        kv_lo = L * 0
    first_tile = kv_lo // BLOCK_N
    end_tile = tl.cdiv(L, BLOCK_N)
    num_tiles = tl.maximum(end_tile - first_tile, 0)
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles, MAX_SPLITS),
                                 tl.minimum(MIN_SPLIT_TILES, tl.maximum(tl.cdiv(num_tiles, MIN_SPLITS), 1)))
    num_splits = tl.cdiv(num_tiles, tiles_per_split)
    return first_tile, end_tile, tiles_per_split, num_splits


@triton.jit
def int8_to_fp16(x, MAGIC: tl.constexpr):
    """int8 → fp16, exact. MAGIC: fp16 1152 + x has the bits 0x6480 + x for x in [-128, 127] (exponent of
    [1024, 2048), mantissa x + 128), so a 16-bit integer add, a bitcast and an fp16 subtract replace the int → float
    conversion, whose 16/clk/SM throughput is below what reading an int8 cache at 3 TB/s needs (K and V: ~14
    conversions per clk per SM on an H100)."""
    if MAGIC:
        return (x.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    else:
        return x.to(tl.float16)


@triton.jit
def _split_q(q, step):
    """q [M, D] fp → (hi, lo) int8 with q ≈ step · (hi + lo / 254) per row: hi = round(q / step) in [-127, 127],
    the remainder (|r| ≤ 1/2) scaled by 254 and rounded again, so lo is in [-127, 127] too."""
    y = q.to(tl.float32) / step[:, None]
    hi = tl.floor(y + 0.5)
    lo = tl.floor((y - hi) * 254.0 + 0.5)
    return hi.to(tl.int8), lo.to(tl.int8)


@triton.jit
def _split_q_rows(q, q2, D_SPLIT: tl.constexpr):
    """A query tile (and with D_SPLIT 2 its second head-dim half q2) for int8 MMAs: step = each row's absmax / 127
    over the whole head, q ≈ step · (hi + lo / 254) to within step / 508 (2^-16 of the row's largest element,
    finer than q's own fp16 rounding). Returns (hi, lo, hi2, lo2, step / 254); hi2, lo2 unused (0) without halves."""
    amax = tl.max(tl.abs(q.to(tl.float32)), axis=1)
    if D_SPLIT == 2:
        amax = tl.maximum(amax, tl.max(tl.abs(q2.to(tl.float32)), axis=1))
    step = tl.where(amax > 0, amax / 127.0, 1.0)
    hi, lo = _split_q(q, step)
    if D_SPLIT == 2:
        hi2, lo2 = _split_q(q2, step)
    else:
        hi2 = 0
        lo2 = 0
    return hi, lo, hi2, lo2, step / 254.0


@triton.jit
def _int8_qk(k_tok, q_hi, q_lo, q2_hi, q2_lo, dims, pos_ok, K_ALIGN: tl.constexpr, BF16: tl.constexpr,
             ASM: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, PART: tl.constexpr,
             D_SPLIT: tl.constexpr, MASK: tl.constexpr = True, HEADS_N: tl.constexpr = 0):
    """q·kᵀ of a KV tile on int8 MMAs (``_split_q_rows`` parts; the keys go to the MMAs as loaded), as fp32 before
    the row step and the key scales. int32, exact: |hi·k| ≤ 127² · HEAD_DIM, and · 254 stays below 2^31 up to
    HEAD_DIM 256. HEADS_N: the transposed product k · qᵀ [BLOCK_N, rows] (q parts given as [PART, rows])."""
    kt = _kv_tile(k_tok, 0, dims, pos_ok, 1 - HEADS_N, False, False, K_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N, PART,
                  MASK=MASK)
    s_hi = _mma(q_hi, kt, None, HEADS_N, tl.int32)
    s_lo = _mma(q_lo, kt, None, HEADS_N, tl.int32)
    if D_SPLIT == 2:
        kt = _kv_tile(k_tok, PART, dims, pos_ok, 1 - HEADS_N, False, False, K_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N,
                      PART, MASK=MASK)
        s_hi = _mma(q2_hi, kt, s_hi, HEADS_N, tl.int32)
        s_lo = _mma(q2_lo, kt, s_lo, HEADS_N, tl.int32)
    return (s_hi * 254 + s_lo).to(tl.float32)


@triton.jit
def _mma(query_side, kv_side, acc, HEADS_N: tl.constexpr, OUT: tl.constexpr = tl.float32):
    """The tile product in either orientation: ``query_side · kv_side`` (query rows on the MMA's M side: q · kᵀ,
    p · v), or with HEADS_N ``kv_side · query_side`` on operands that come transposed (k · qᵀ gives the scores as
    [BLOCK_N, rows], vᵀ · pᵀ the output as [PART, rows])."""
    if HEADS_N:
        return tl.dot(kv_side, query_side, acc, out_dtype=OUT)
    else:
        return tl.dot(query_side, kv_side, acc, out_dtype=OUT)


@triton.jit
def _exp2_step(s, m_i, scale, row_scale, FOLD: tl.constexpr, ROW_FOLD: tl.constexpr, TOK_AXIS: tl.constexpr = 1):
    """The online-softmax step (base 2) of a masked score tile: (m_new, alpha, p). FOLD: s still lacks the scalar
    ``scale``, ROW_FOLD: the per-row ``row_scale``; either (> 0) scales the row max (max(s · c) = c · max(s),
    rounding being monotonic) and goes into the exponent's FFMA, one multiply per score fewer. TOK_AXIS: the
    tile's token axis (0 for transposed [BLOCK_N, rows] tiles)."""
    if FOLD:
        m_new = tl.maximum(m_i, tl.max(s, axis=TOK_AXIS) * scale)
    elif ROW_FOLD:
        m_new = tl.maximum(m_i, tl.max(s, axis=TOK_AXIS) * row_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=TOK_AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
    alpha = tl.exp2(m_i - m_safe)
    if FOLD:
        p = tl.exp2(s * scale - tl.expand_dims(m_safe, TOK_AXIS))
    elif ROW_FOLD:
        p = tl.exp2(s * tl.expand_dims(row_scale, TOK_AXIS) - tl.expand_dims(m_safe, TOK_AXIS))
    else:
        p = tl.exp2(s - tl.expand_dims(m_safe, TOK_AXIS))
    return m_new, alpha, p


@triton.jit
def _kv_tile(tok_ptrs, first_dim: tl.constexpr, dims, pos_ok, TRANS: tl.constexpr, WORDS: tl.constexpr,
             MAGIC: tl.constexpr, ALIGN: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr, FP32: tl.constexpr,
             BLOCK_N: tl.constexpr, PART: tl.constexpr, FENCE: tl.constexpr = False, MASK: tl.constexpr = True):
    """Dims [first_dim, first_dim + PART) of BLOCK_N cache rows (one pointer per token, ALIGN-byte aligned) as
    [BLOCK_N, PART], or [PART, BLOCK_N] with TRANS (keys, for q·kᵀ). int8 rows: WORDS reads int32 words (ALIGN >= 4)
    and converts them a word at a time (fp32 if FP32); otherwise MAGIC converts element by element (fp16 queries).
    Other rows come back as stored. FENCE: a converted int8 tile reaches the MMA with the 16-bit operand layout
    (``mma_operand_fence``). MASK=False: rows past pos_ok are read too (their pointers must stay valid)."""
    if not MASK:
        pos_ok = tl.full((BLOCK_N,), 1, tl.int1)  # a constant: the loads drop their masks
    if WORDS:
        words = tl.multiple_of((tok_ptrs + first_dim).to(tl.pointer_type(tl.int32)), ALIGN)
        w = tl.load(words[:, None] + tl.arange(0, PART // 4)[None, :], mask=pos_ok[:, None], other=0)
        t = int8_words_to_float(w, BF16, ASM, FP32, BLOCK_N, PART)
        if TRANS:
            t = tl.trans(t)
    else:
        if TRANS:
            t = tl.load(tok_ptrs[None, :] + first_dim + dims[:, None], mask=pos_ok[None, :], other=0)
        else:
            t = tl.load(tok_ptrs[:, None] + first_dim + dims[None, :], mask=pos_ok[:, None], other=0)
        if MAGIC:
            t = int8_to_fp16(t, True)
    if FENCE and ASM and (WORDS or MAGIC):
        t = mma_operand_fence(t)
    return t


@triton.jit
def _page_offset(blk, stride, ASM: tl.constexpr):
    """blk · stride as int64 for block ids and a stride in [0, 2^31): one 32 × 32 → 64-bit multiply on a GPU (the
    int64 product of the sign-extended values takes four instructions per token)."""
    if ASM:
        return tl.inline_asm_elementwise(asm="mul.wide.u32 $0, $1, $2;", constraints="=l,r,r",
                                         args=[blk, blk * 0 + stride], dtype=tl.int64, is_pure=True, pack=1)
    else:
        return blk.to(tl.int64) * stride


@triton.jit
def _tile_pages(bt_row, stride_btn, first, pos_ok, stride_kcb, stride_vcb, stride_ksb, stride_vsb,
                PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_ADDR: tl.constexpr, ASM: tl.constexpr):
    """For the KV tile [first, first + BLOCK_N) (first a multiple of BLOCK_N): each token's slot in its page and
    the int64 offsets of its page in the K, V, K-scale and V-scale caches (block ids past pos_ok read as 0).
    PAGE_ADDR: page index and slot from the tile start (BLOCK_N and PAGE are powers of two: one divides the
    other) and the offsets by ``_page_offset``."""
    if PAGE_ADDR:
        blk = tl.load(bt_row + (first // PAGE + tl.arange(0, BLOCK_N) // PAGE) * stride_btn, mask=pos_ok, other=0)
        slot = first % PAGE + tl.arange(0, BLOCK_N) % PAGE
        return (slot, _page_offset(blk, stride_kcb, ASM), _page_offset(blk, stride_vcb, ASM),
                _page_offset(blk, stride_ksb, ASM), _page_offset(blk, stride_vsb, ASM))
    else:
        pos = first + tl.arange(0, BLOCK_N)
        blk = tl.load(bt_row + (pos // PAGE) * stride_btn, mask=pos_ok, other=0).to(tl.int64)
        return pos % PAGE, blk * stride_kcb, blk * stride_vcb, blk * stride_ksb, blk * stride_vsb


@triton.jit
def _paged_attn_split_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr,
    qk_scale, soft_cap, window, capacity, num_kv_heads, grid_splits,
    stride_qb, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    stride_btb, stride_btn,
    stride_ob, stride_ot, stride_oh,
    stride_pob, stride_pot, stride_poh, stride_pos,
    stride_plb, stride_plt, stride_plh,
    GROUP: tl.constexpr, NUM_QUERIES: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, MAX_SPLITS: tl.constexpr,
    MIN_SPLITS: tl.constexpr,
    QUANT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    MAGIC: tl.constexpr, K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, D_SPLIT: tl.constexpr,
    WORDS: tl.constexpr = False,  # int8 cache read as int32 words, converted a word at a time (_int8_words)
    ASM: tl.constexpr = False,  # WORDS on a GPU: the PTX conversion
    QK_INT8: tl.constexpr = False,  # int8 caches: q·kᵀ on int8 tensor cores, q split in two int8 parts (_split_q)
    FENCE_V: tl.constexpr = False,  # int8 caches: the converted V tile with the 16-bit MMA operand layout
    PAGE_ADDR: tl.constexpr = False,  # page and slot from the tile index, page offsets by a 32-bit wide multiply,
    #                                   int8 K/V rows read unmasked (rows past the length read block 0)
    HEADS_N: tl.constexpr = 0,  # query rows on the MMA's N side (8 wide): transposed tiles, s [BLOCK_N, rows]
    #                             and acc [PART, rows], half the accumulator registers of a 16-row M side
    PDL: tl.constexpr = 0,  # programmatic dependent launch (``pdl_modes``): 1 early, 2 late, 3 the reduce only
):
    if PDL == 1 or PDL == 2:
        # launched before the previous kernel of the stream finished: wait for its writes (q, the caches)
        gdc_wait()
    if PDL == 1 or PDL == 3:
        # let the reduce kernel launch as soon as every program here has started (2: as they exit)
        gdc_launch_dependents()
    BF16: tl.constexpr = q_ptr.dtype.element_ty == tl.bfloat16
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid // num_kv_heads).to(tl.int64)
    kvh = pid % num_kv_heads
    L = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), capacity)
    first_tile, end_tile, tiles_per_split, num_splits = _split_range(
        L, window, NUM_QUERIES, HAS_WINDOW, BLOCK_N, MIN_SPLIT_TILES, MAX_SPLITS, MIN_SPLITS)

    # query rows: row r = query token r // GROUP, query head kvh · GROUP + r % GROUP
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * NUM_QUERIES
    t = rows // GROUP
    qh = kvh * GROUP + rows % GROUP
    # D_SPLIT = 2: the head dim in two halves, each with its own K/V operand and accumulator, so only half of
    # the int8 → fp16 operands is live at a time (a full 128-wide int8 tile needed all 255 registers and spilled)
    PART: tl.constexpr = HEAD_DIM // D_SPLIT
    dims = tl.arange(0, PART)
    q_rows = q_ptr + b * stride_qb + t[:, None] * stride_qt + qh[:, None] * stride_qh
    q = tl.load(q_rows + dims[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    if D_SPLIT == 2:
        q2 = tl.load(q_rows + PART + dims[None, :], mask=row_ok[:, None], other=0.0)
        if DOT_FP32:
            q2 = q2.to(tl.float32)
    else:
        q2 = 0.0  # unused
    if QK_INT8:  # the keys stay int8 and go to the MMA as loaded
        q_hi, q_lo, q2_hi, q2_lo, q_row_scale = _split_q_rows(q, q2, D_SPLIT)
    else:
        q_row_scale = 0.0  # unused
    # tile axes: [rows, tokens] / acc [rows, PART], or transposed with HEADS_N
    TOK_AXIS: tl.constexpr = 1 - HEADS_N
    ROW_AXIS: tl.constexpr = HEADS_N
    if HEADS_N:
        q = tl.trans(q)
        if QK_INT8:
            q_hi = tl.trans(q_hi)
            q_lo = tl.trans(q_lo)
        if D_SPLIT == 2:
            q2 = tl.trans(q2)
            if QK_INT8:
                q2_hi = tl.trans(q2_hi)
                q2_lo = tl.trans(q2_lo)
    # int8 q·kᵀ: the per-row step (> 0 by construction) goes into the row max and the exponent (_exp2_step); a
    # soft-cap needs the scaled score first
    ROW_FOLD: tl.constexpr = QK_INT8 and not HAS_SOFTCAP
    # keys visible to row r: [row_lo, row_hi) (causal within the sequence's last NUM_QUERIES positions)
    row_hi = L - (NUM_QUERIES - 1) + t
    if HAS_WINDOW:
        row_lo = tl.maximum(row_hi - window, 0)
    else:
        row_lo = row_hi * 0
    o_rows = out_ptr + b * stride_ob + t[:, None] * stride_ot + qh[:, None] * stride_oh + dims[None, :]

    if num_splits == 0:  # nothing to attend to (seq_len 0): zeros, written once
        if pid_s == 0:
            zeros = tl.zeros((BLOCK_M, PART), dtype=tl.float32).to(out_ptr.dtype.element_ty)
            tl.store(o_rows, zeros, mask=row_ok[:, None])
            if D_SPLIT == 2:
                tl.store(o_rows + PART, zeros, mask=row_ok[:, None])

    bt_row = bt_ptr + b * stride_btb
    for split in range(pid_s, num_splits, grid_splits):
        tile_lo = first_tile + split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, end_tile)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HEADS_N:
            acc = tl.zeros((PART, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, PART), dtype=tl.float32)
        if D_SPLIT == 2:
            acc2 = tl.zeros_like(acc)
        # int8 V: acc holds the output in units of the last tile's largest V scale (``v_unit``), so each tile's
        # p · v accumulates inside the MMA (acc · alpha · v_unit / v_max as its accumulator input) instead of a
        # zero-initialised product scaled and added after it (sm_90a, the shipped one-warp tile: 64 zeroing
        # moves, 64 multiplies and 64 adds fewer per tile)
        v_unit = 1.0
        for tile in range(tile_lo, tile_hi):
            pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            pos_ok = pos < L
            slot, k_page, v_page, ks_page, vs_page = _tile_pages(
                bt_row, stride_btn, tile * BLOCK_N, pos_ok, stride_kcb, stride_vcb, stride_ksb, stride_vsb, PAGE,
                BLOCK_N, PAGE_ADDR, ASM)
            # int8 rows past the length (masked block ids: 0) are read unmasked with PAGE_ADDR; their scores are
            # masked below and their int8 values are finite, so p = 0 removes them
            KV_MASK: tl.constexpr = not (PAGE_ADDR and QUANT)
            # row starts, with the alignment the launcher proved (vector loads / cp.async need it spelled out:
            # Triton only knows 16-divisible pointers and strides, vLLM's packed rows are 4-byte aligned)
            k_tok = tl.multiple_of(kc_ptr + k_page + slot * stride_kcs + kvh * stride_kch, K_ALIGN)
            if QK_INT8:
                s = _int8_qk(k_tok, q_hi, q_lo, q2_hi, q2_lo, dims, pos_ok, K_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N,
                             PART, D_SPLIT, KV_MASK, HEADS_N)
                if not ROW_FOLD:
                    s = s * tl.expand_dims(q_row_scale, TOK_AXIS)
            else:
                kt = _kv_tile(k_tok, 0, dims, pos_ok, 1 - HEADS_N, WORDS, MAGIC, K_ALIGN, BF16, ASM, DOT_FP32,
                              BLOCK_N, PART, MASK=KV_MASK)
                # int8 → fp16/bf16 is exact for [-128, 127]; the interpreter's bf16 dot is wrong: fp32 there
                s = _mma(q, kt.to(q.dtype), None, HEADS_N)
                if D_SPLIT == 2:
                    kt = _kv_tile(k_tok, PART, dims, pos_ok, 1 - HEADS_N, WORDS, MAGIC, K_ALIGN, BF16, ASM, DOT_FP32,
                                  BLOCK_N, PART, MASK=KV_MASK)
                    s = _mma(q2, kt.to(q.dtype), s, HEADS_N)
            if QUANT:
                k_sc = tl.load(ks_ptr + ks_page + slot * stride_kss + kvh * stride_ksh,
                               mask=pos_ok, other=0.0)
                s = s * tl.expand_dims(k_sc * qk_scale, ROW_AXIS)
            else:
                s = s * qk_scale
            if HAS_SOFTCAP:  # s holds scale · q·k here; cap · tanh(s / cap), tanh via exp, then to base 2
                e = tl.exp(2.0 * s / soft_cap)
                s = (soft_cap * LOG2E_C) * (1.0 - 2.0 / (e + 1.0))
            tok = tl.expand_dims(pos, ROW_AXIS)
            visible = (tl.expand_dims(pos_ok, ROW_AXIS) & (tok < tl.expand_dims(row_hi, TOK_AXIS))
                       & (tok >= tl.expand_dims(row_lo, TOK_AXIS)))
            s = tl.where(visible, s, float("-inf"))
            m_new, alpha, p = _exp2_step(s, m_i, qk_scale, q_row_scale, False, ROW_FOLD, TOK_AXIS)
            l_i = l_i * alpha + tl.sum(p, axis=TOK_AXIS)
            v_tok = tl.multiple_of(vc_ptr + v_page + slot * stride_vcs + kvh * stride_vch, V_ALIGN)
            v = _kv_tile(v_tok, 0, dims, pos_ok, HEADS_N, WORDS, MAGIC, V_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N, PART,
                         FENCE_V, KV_MASK)
            if QUANT:
                v_sc = tl.load(vs_ptr + vs_page + slot * stride_vss + kvh * stride_vsh,
                               mask=pos_ok, other=0.0)
                v_max = tl.max(v_sc, axis=0)
                v_max = tl.where(v_max > 0, v_max, 1.0)
                p = p * tl.expand_dims(v_sc / v_max, ROW_AXIS)
                alpha = alpha * (v_unit / v_max)
                v_unit = v_max
            if not DOT_FP32:
                p = p.to(q.dtype)
            acc = _mma(p, v.to(p.dtype), acc * tl.expand_dims(alpha, TOK_AXIS), HEADS_N)
            if D_SPLIT == 2:
                v = _kv_tile(v_tok, PART, dims, pos_ok, HEADS_N, WORDS, MAGIC, V_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N,
                             PART, FENCE_V, KV_MASK)
                acc2 = _mma(p, v.to(p.dtype), acc2 * tl.expand_dims(alpha, TOK_AXIS), HEADS_N)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc * tl.expand_dims(v_unit / l_safe, TOK_AXIS)
        if HEADS_N:
            o = tl.trans(o)
        if D_SPLIT == 2:
            o2 = acc2 * tl.expand_dims(v_unit / l_safe, TOK_AXIS)
            if HEADS_N:
                o2 = tl.trans(o2)
        if num_splits == 1:
            tl.store(o_rows, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
            if D_SPLIT == 2:
                tl.store(o_rows + PART, o2.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            part = b * stride_pob + t * stride_pot + qh * stride_poh + split * stride_pos  # [BLOCK_M]
            tl.store(po_ptr + part[:, None] + dims[None, :], o, mask=row_ok[:, None])
            if D_SPLIT == 2:
                tl.store(po_ptr + part[:, None] + PART + dims[None, :], o2, mask=row_ok[:, None])
            tl.store(plse_ptr + b * stride_plb + t * stride_plt + qh * stride_plh + split, lse, mask=row_ok)


@triton.jit
def _paged_attn_reduce_kernel(
    lens_ptr, po_ptr, plse_ptr, out_ptr,
    window, capacity, num_q_heads,
    stride_pob, stride_pot, stride_poh, stride_pos,
    stride_plb, stride_plt, stride_plh,
    stride_ob, stride_ot, stride_oh,
    NUM_QUERIES: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, MAX_SPLITS: tl.constexpr, MIN_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PDL: tl.constexpr = False,
):
    """One program per (sequence, query token, query head): combine its splits' partials in split order. PDL: this
    kernel was launched while the split kernel ran (it waits for it before reading the partials)."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    h = pid % num_q_heads
    t = (pid // num_q_heads) % NUM_QUERIES
    b = (pid // (num_q_heads * NUM_QUERIES)).to(tl.int64)
    L = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), capacity)
    _f, _e, _tps, num_splits = _split_range(L, window, NUM_QUERIES, HAS_WINDOW, BLOCK_N, MIN_SPLIT_TILES, MAX_SPLITS,
                                            MIN_SPLITS)
    if PDL:
        gdc_wait()
    if num_splits > 1:  # 0 and 1 split were written by the split kernel
        splits = tl.arange(0, SPLITS_PAD)
        ok = splits < num_splits
        lse = tl.load(plse_ptr + b * stride_plb + t * stride_plt + h * stride_plh + splits, mask=ok,
                      other=float("-inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)
        dims = tl.arange(0, HEAD_DIM)
        part = po_ptr + b * stride_pob + t * stride_pot + h * stride_poh
        o = tl.load(part + splits[:, None] * stride_pos + dims[None, :], mask=ok[:, None], other=0.0)
        den = tl.sum(w, axis=0)
        den = tl.where(den > 0, den, 1.0)
        o = tl.sum(o * w[:, None], axis=0) / den
        tl.store(out_ptr + b * stride_ob + t * stride_ot + h * stride_oh + dims, o.to(out_ptr.dtype.element_ty))



# ------------------------------------------------------------------------------------------------- launching
def register_cap(cfg: KernelConfig) -> dict:
    """Launch options for the config's MAX_REGS (ptxas register cap, 0 = none): at 4 warps, ≤ 168 registers let
    3 programs share an SM, ≤ 128 four (the int8 tile with WORDS and head-dim halves needs 248 uncapped)."""
    regs = int(dict(cfg.extra).get("MAX_REGS", 0))
    return {"maxnreg": regs} if regs else {}


def words_path(cfg: KernelConfig, quant: bool, k_align: int, v_align: int) -> bool:
    """Whether a launch reads the int8 cache as int32 words: the config asks for it (WORDS) and every K and V row
    starts on a 4-byte boundary (``row_alignment`` in elements = bytes for int8)."""
    return quant and bool(dict(cfg.extra).get("WORDS", 0)) and min(k_align, v_align) >= 4


def page_addressing(cfg: KernelConfig, *caches) -> bool:
    """Whether a launch computes page offsets by 32-bit multiplies: the config asks for it (PAGE_ADDR) and every
    cache's per-block stride (``caches``: K, V and the optional scale caches) fits 32 bits unsigned."""
    return bool(dict(cfg.extra).get("PAGE_ADDR", 0)) and all(c.stride(0) < 2**31 for c in caches if c is not None)


def fits_one_wave(programs: int, per_sm: int, device: torch.device) -> bool:
    """Whether a grid of ``programs`` runs as one wave at ``per_sm`` programs per SM."""
    return programs <= per_sm * num_sms(device)


def uses_pdl(programs: int, device: torch.device) -> bool:
    """Programmatic dependent launch (sm_90 and later) for grids of at most one program per SM: the split kernel
    launches while the previous kernel of the stream finishes and the reduce kernel while the split kernel runs,
    each waiting (``gdc_wait``) before it reads what the one before wrote — launch latency hidden, the same bits.
    H100, CUDA graphs, one run, µs without / with, int8 and fp16: B=1×1k 8.5 / 7.5 and 10.1 / 8.5, B=1×4k
    16.9 / 16.1 and 22.9 / 21.4 (128 programs); with a full wave of programs it cost (B=8×4k int8, 1024 one-warp
    programs: 33.3 / 34.1; fp16 55.1 / 58.2) and larger batches did not move."""
    if not dependent_launch_supported(device):
        return False
    return fits_one_wave(programs, 1, device)


def pdl_modes(programs: int, quant: bool, device: torch.device, per_sm: int = 1) -> tuple:
    """(the split kernel's PDL mode, whether the reduce kernel launches dependently). Grids of at most one program
    per SM: both early (``uses_pdl``, mode 1). Fuller grids over fp16 / bf16 caches: both dependent, but the split
    kernel with no early trigger (mode 2: the reduce kernel launches as the split programs exit, so none of its
    programs sits resident beside running split programs). H100, CUDA graphs, one run, µs plain / mode 2 (two
    samples each): fp16 B=8×4k 54.9, 54.6 / 53.9, 53.4; 32×4k 195.7, 195.4 / 194.9, 194.9; 64×16k 1466.5, 1462.2 /
    1459.9, 1455.7. Not int8 (8×4k 32.7, 32.5 / 33.6, 33.4; 1×32k 32.7, 32.5 / 33.6, 33.6). int8 grids of one
    wave (at most ``per_sm`` programs per SM, the config's PROGRAMS_PER_SM): the split kernel a plain launch that
    triggers at once and the reduce kernel dependent (mode 3: its programs wait beside the split programs, which
    leave room for them). H100, one run: 8×4k 33.3 → 32.2 µs, 1×32k 33.5 → 32.5 (1024 one-warp programs); with
    several waves it cost (32×4k 112.7 → 114.8). H200, CUDA graphs, one run, two samples each, µs plain → mode 3
    (same bits): 8×4k 28.02, 27.98 → 26.82, 26.81; 1×32k 28.45, 28.51 → 27.35, 27.42."""
    if uses_pdl(programs, device):
        return 1, True
    if not dependent_launch_supported(device):
        return 0, False
    if quant:
        return (3, True) if fits_one_wave(programs, per_sm, device) else (0, False)
    return 2, True


def split_stages(cfg: KernelConfig, programs: int, device: torch.device) -> int:
    """The split kernel's pipeline stages: the config's ``ONE_WAVE_STAGES`` where all ``programs`` fit one wave (at
    most PROGRAMS_PER_SM per SM), else its num_stages. Stages change when tiles are loaded, never what is computed,
    so the bits are the same either way (the GPU tier's batch-invariance test compares a sequence alone, one wave,
    with it in a batch of 64). One-warp int8 tiles, H200, CUDA graphs, two runs, µs 2 → 3 stages: 8×4k 25.5-25.6 →
    24.9, 1×32k 26.7 → 26.1-26.2, 4×8k 26.9-27.2 → 26.3-26.5, 2×16k 26.3-26.4 → 25.8-25.9, 1×4k 14.0 → 13.9; on grids
    of several waves it moved times by -1 to +1 % (32×4k 81.4 → 80.5, 64×16k 593.8 → 597.9), no rule there. No
    tuning space varies it (``probe_decode_ceiling.py --variants ONE_WAVE_STAGES=3`` times it); shipping a tune keeps
    a table entry's value."""
    one_wave = int(dict(cfg.extra).get("ONE_WAVE_STAGES", 0))
    per_sm = int(dict(cfg.extra).get("PROGRAMS_PER_SM", PROGRAMS_PER_SM))
    if one_wave and fits_one_wave(programs, per_sm, device):
        return one_wave
    return cfg.num_stages


def partial_dtype(q_dtype: torch.dtype, packed_rows: bool) -> torch.dtype:
    """The split partials' dtype (``PARTIAL_DTYPE`` unless None): fp16 for fp16 queries (as FlashInfer's split-KV
    decode keeps its partial outputs in the output dtype; the log-sum-exps stay fp32), fp32 otherwise. A normalized
    partial is a convex combination of V rows, so it lies in V's range; it costs one more rounding. H200, CUDA
    graphs, int8 cache, one run, two samples each, µs fp32 → fp16 partials, our pages: 8×4k 26.1, 26.1 → 25.4,
    25.4; 32×4k 83.8, 83.8 → 80.8, 80.6; 32×16k 305.5, 303.7 → 294.8, 294.5 (half the partials' bytes, written
    and read back: 3 % of the KV bytes at 256-token splits). Not vLLM's packed int8 rows, where the same switch cost
    a third (28.9, 28.9 → 38.7, 38.7; 100.2, 100.5 → 142.8, 142.8; 379.1, 380.3 → 536.5, 535.5; the split kernel's
    sm_90a code has no spills either way, 182 → 164 registers: not explained), so the two layouts' outputs differ
    by that rounding. Not bf16 queries (bf16 partials gave the int8 word and element paths, bit for bit equal with
    fp32 ones, other bits in the GPU tier; not pinned down, not timed)."""
    if PARTIAL_DTYPE is not None:
        return PARTIAL_DTYPE
    return torch.float16 if q_dtype == torch.float16 and not packed_rows else torch.float32


def reduce_warps(splits_pad: int, head_dim: int) -> int:
    """The reduce kernel's warps for partials of ``splits_pad`` (a power of two) × ``head_dim``: about 64 partial
    elements per thread, at most 4 (2 below head dim 128). A program sums over the split rows; with fewer elements per
    thread those rows spread over warps and the sum crosses them through shared memory. H200, CUDA graphs, int8
    cache, fp32 partials, one run, µs call with 1 / 2 / 4 / 8 warps: 16 splits 8×4k 26.0 / 27.1 / 26.7 / 28.2,
    32×4k 83.8 / 84.8 / 85.7 / 92.1; 64 splits 32×16k 305.4 / 303.9 / 302.9 / 308.3, 64×16k 605.5 / 599.7 / 594.7 /
    610.8; 128 splits 1×32k 42.3 / 29.3 / 27.0 / 29.5. The count follows the scratch's split slots (the block
    table's capacity), never the batch. ``REDUCE_WARPS`` overrides it when set."""
    if REDUCE_WARPS:
        return REDUCE_WARPS
    most = 4 if head_dim >= 128 else 2
    return max(1, min(most, splits_pad * head_dim // 2048))


def num_sms(device: torch.device) -> int:
    return runtime_num_sms(device, INTERPRETER_SMS)


def max_splits_for(num_kv_heads: int, device: torch.device, programs_per_sm: int = PROGRAMS_PER_SM,
                   pow2: bool = True, cap: int = MAX_SPLITS_CAP) -> int:
    """Splits of one long sequence: ~programs_per_sm programs per SM across its KV heads, a power of two (or,
    with ``pow2`` off, the count itself), at most ``cap``.

    H100 SXM (132 SMs), 8 KV heads, 2 per SM: 32 splits → 256 programs for a single 32k-token sequence; 3 per SM
    without rounding: 49; 8 per SM: 128 where the cap allows it (one-warp int8 programs).
    """
    target = max(1, programs_per_sm * num_sms(device) // num_kv_heads)
    return min(cap, 1 << (target.bit_length() - 1) if pow2 else target)


def heuristic_config(p: PagedDecodeProblem) -> KernelConfig:
    """Untuned default. Head dim 128: the H100 winners (per-case timing, Llama-3-8B heads), which also serve
    untuned GPUs: int8 one-warp programs on 32-token tiles (whole head dim, the query rows on the MMA's N side, K
    and V by the word path, V with the 16-bit MMA layout (FENCE_V), page addressing, 2 stages, 256-token splits
    with a floor of 16 splits, 8 programs per SM and up to 128 splits for one sequence; see below); vLLM's packed
    int8 rows the word path alone (the H200's table has one-warp programs for them: NOTES.md); fp16 64-token tiles
    in head-dim halves, 1024-token splits with a floor of 8 splits (tuning run, B=64×16k: 1465 vs 1500 µs with
    64-token splits), page addressing, exactly 3 programs per SM for one sequence.
    Other head dims: BLOCK_N keeps a K and a V tile at 8 KB (int8) / 16 KB (fp16) for D = 64, and 256-token
    splits, whose partial output (4 query heads × D, fp16 or fp32, written and read back once) costs ≤ 3-6 % of the
    split's int8 KV bytes (≤ 1.5-3 % for fp16), the worst case at large batch."""
    if p.head_dim == 128 and p.kv_dtype == torch.int8 and p.packed_rows:
        # vLLM's packed rows (4-byte aligned): the word path alone, as timed on them (H100, B=64×16k: 1705 µs;
        # the 16-byte-row winner below took 3678 there)
        return KernelConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3,
                            extra=(("D_SPLIT", 1), ("MIN_SPLITS", 8), ("MIN_SPLIT_TILES", 2), ("PROGRAMS_PER_SM", 2),
                                   ("WORDS", 1)))
    if p.head_dim == 128 and p.kv_dtype == torch.int8:
        # One warp per program, 32-token tiles: no warp waits for another inside a tile (a 4-warp program spreads
        # the score tile over its warps by token, so every tile's row max and sum, and P for P·V, cross warps
        # through shared memory). H100, same run: B=8×4k 33.5 µs (4 warps × 128 tokens: 40.9), 32×4k 116.4
        # (130.4), 64×16k 853.1 (901.7); but B=1×4k 17.9 (13.1): 256-token splits leave a single sequence 128
        # one-warp programs (NOTES.md). SPLITS_CAP 128: a 32k context in 128 splits of 256 tokens instead of 64 of
        # 512 (B=1×32k 39.4 → 34.0 µs, the 1024 programs of 8 KV heads fill 132 SMs × 8; B=8×32k 213 → 227: the
        # partials double and each program's prologue is spread over half the tokens). HEADS_N: 168 instead of 255
        # registers; per-case tuning (H100, same run, µs, the previous default with int8 q·kᵀ and 3 stages → this):
        # B=1×1k 9.1 → 8.5, 1×4k 17.6 → 17.0, 8×4k 33.7 → 33.2, 32×4k 118.4 → 113.1, 64×16k 870.8 → 862.8 (with
        # int8 q·kᵀ as well: within 1 % of it).
        return KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=1, num_stages=2,
                            extra=(("D_SPLIT", 1), ("FENCE_V", 1), ("HEADS_N", 1), ("MIN_SPLITS", 16),
                                   ("MIN_SPLIT_TILES", 8), ("PAGE_ADDR", 1), ("PROGRAMS_PER_SM", 8),
                                   ("SPLITS_CAP", 128), ("WORDS", 1)))
    if p.head_dim == 128:  # a single sequence's splits: 3 programs per SM, not rounded to a power of two
        return KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2,
                            extra=(("D_SPLIT", 2), ("EXACT_SPLITS", 1), ("MIN_SPLITS", 8), ("MIN_SPLIT_TILES", 16),
                                   ("PAGE_ADDR", 1), ("PROGRAMS_PER_SM", 3)))
    block_n = 64 if p.head_dim <= 128 else 32
    return KernelConfig(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=p.head_dim, num_warps=4, num_stages=2,
                        extra=(("MIN_SPLIT_TILES", 256 // block_n),))


def config_for(p: PagedDecodeProblem) -> KernelConfig:
    if interpreter_active() and p.device.type == "cpu":
        return INTERPRETER_CONFIG
    return default_store().lookup(KERNEL_NAME, p.key(), p.device) or heuristic_config(p)


def split_policy(p: PagedDecodeProblem, cfg: Optional[KernelConfig] = None) -> SplitPolicy:
    cfg = cfg or config_for(p)
    extra = dict(cfg.extra)
    per_sm = extra.get("PROGRAMS_PER_SM", PROGRAMS_PER_SM)
    max_splits = max_splits_for(p.num_kv_heads, p.device, per_sm, pow2=not extra.get("EXACT_SPLITS", 0),
                                cap=extra.get("SPLITS_CAP", MAX_SPLITS_CAP))
    return SplitPolicy(cfg.BLOCK_N, extra["MIN_SPLIT_TILES"], max_splits, extra.get("MIN_SPLITS", 1))


def launch_paged_attention(
    q: torch.Tensor,  # [B, Q, H_q, D]: the last Q positions of each sequence (Q = 1: decode)
    key_cache, value_cache, block_table, seq_lens, scale: float, k_scale=None, v_scale=None,
    sliding_window: Optional[int] = None, soft_cap: Optional[float] = None,
    *, cfg: Optional[KernelConfig] = None, policy: Optional[SplitPolicy] = None,
    grid_splits: Optional[int] = None,
) -> torch.Tensor:
    """Split kernel + reduce kernel with an explicit config / policy / grid; returns [B, Q, H_q, D]."""
    B, Q, Hq, D = q.shape
    Hkv = key_cache.shape[2]
    page = key_cache.shape[1]
    k_align, v_align = row_alignment(key_cache), row_alignment(value_cache)
    quant = key_cache.dtype == torch.int8
    p = PagedDecodeProblem(Hq, Hkv, D, page, q.dtype, key_cache.dtype, q.device,
                           packed_rows=quant and min(k_align, v_align) < 16)
    cfg = cfg or config_for(p)
    policy = policy or split_policy(p, cfg)
    if policy.block_n != cfg.BLOCK_N:
        raise ValueError(f"policy.block_n {policy.block_n} != config BLOCK_N {cfg.BLOCK_N}")
    out = torch.empty((B, Q, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    group = Hq // Hkv
    extra = dict(cfg.extra)
    heads_n = int(extra.get("HEADS_N", 0))
    # query rows: a 16-row MMA M side, or an 8-wide N side with HEADS_N
    block_m = max(8 if heads_n else 16, triton.next_power_of_2(group * Q))
    capacity = block_table.shape[1] * page
    max_ns = policy.max_num_splits(capacity)
    if max_ns > 1:
        partial_o = torch.empty((B, Q, Hq, max_ns, D), dtype=partial_dtype(q.dtype, p.packed_rows),
                                device=q.device)
        partial_lse = torch.empty((B, Q, Hq, max_ns), dtype=torch.float32, device=q.device)
    else:  # no sequence can have two splits: no scratch, no reduction
        partial_o = partial_lse = out
    if grid_splits is None:
        # parallelism only (see module doc): one program per split. Fewer programs looping over several splits
        # leave a tail: at batch 64 × 16k, 512 programs of 32 splits each on 132 SMs × 3 resident (fp16 tiles,
        # 2 stages) ran as 1.3 waves, 69 % of the floor.
        grid_splits = max_ns
    per_sm = int(extra.get("PROGRAMS_PER_SM", PROGRAMS_PER_SM))
    programs = B * Hkv * grid_splits
    pdl, reduce_pdl = pdl_modes(programs, quant, q.device, per_sm)
    ks_strides = k_scale.stride() if quant else (0, 0, 0)
    vs_strides = v_scale.stride() if quant else (0, 0, 0)
    po_strides = partial_o.stride()[:4] if max_ns > 1 else (0, 0, 0, 0)
    pl_strides = partial_lse.stride()[:3] if max_ns > 1 else (0, 0, 0)
    has_softcap = soft_cap is not None
    consts = dict(BLOCK_N=policy.block_n, MIN_SPLIT_TILES=policy.min_split_tiles, MAX_SPLITS=policy.max_splits,
                  MIN_SPLITS=policy.min_splits,
                  HAS_WINDOW=sliding_window is not None)
    window = int(sliding_window) if sliding_window is not None else 0
    _paged_attn_split_kernel[(B * Hkv, grid_splits)](
        q, key_cache, value_cache, k_scale if quant else key_cache, v_scale if quant else value_cache,
        block_table, seq_lens, out, partial_o, partial_lse,
        float(scale) * (1.0 if has_softcap else LOG2E), float(soft_cap) if has_softcap else 1.0,
        window, capacity, Hkv, grid_splits,
        q.stride(0), q.stride(1), q.stride(2),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        *ks_strides, *vs_strides,
        block_table.stride(0), block_table.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        *po_strides, *pl_strides,
        GROUP=group, NUM_QUERIES=Q, BLOCK_M=block_m, HEAD_DIM=D, PAGE=page,
        QUANT=quant, HAS_SOFTCAP=has_softcap, DOT_FP32=q.device.type == "cpu",
        MAGIC=quant and q.dtype == torch.float16 and bool(extra.get("MAGIC", 1)),
        K_ALIGN=k_align, V_ALIGN=v_align,
        D_SPLIT=int(extra.get("D_SPLIT", 1)),
        WORDS=words_path(cfg, quant, k_align, v_align),
        ASM=q.device.type == "cuda",
        QK_INT8=quant and bool(extra.get("QK_INT8", 0)),
        FENCE_V=quant and bool(extra.get("FENCE_V", 0)),
        PAGE_ADDR=page_addressing(cfg, key_cache, value_cache, k_scale, v_scale),
        HEADS_N=heads_n, PDL=pdl,
        num_warps=cfg.num_warps, num_stages=split_stages(cfg, programs, q.device), **consts, **register_cap(cfg),
        **dependent_launch(pdl in (1, 2)),
    )
    if max_ns > 1:
        splits_pad = triton.next_power_of_2(max_ns)
        _paged_attn_reduce_kernel[(B * Q * Hq,)](
            seq_lens, partial_o, partial_lse, out,
            window, capacity, Hq,
            *po_strides, *pl_strides,
            out.stride(0), out.stride(1), out.stride(2),
            NUM_QUERIES=Q, HEAD_DIM=D, SPLITS_PAD=splits_pad,
            num_warps=reduce_warps(splits_pad, D), **consts, PDL=reduce_pdl,
            **dependent_launch(reduce_pdl),
        )
    return out


# ------------------------------------------------------------------------------------------------- dispatch
def _run_split_kv(p, q, *args, **kwargs):
    return launch_paged_attention(q[:, None], *args, **kwargs)[:, 0]


def _run_reference(p, q, key_cache, value_cache, block_table, seq_lens, scale, k_scale, v_scale,
                   sliding_window, soft_cap):
    return paged_attention_ref(q[:, None], key_cache, value_cache, block_table, seq_lens, scale, k_scale, v_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap)[:, 0]


PAGED_DECODE: KernelFamily[PagedDecodeProblem] = KernelFamily(
    "paged_decode",
    [
        Candidate("split_kv", can_implement=lambda p: triton_runnable_on(p.device), run=_run_split_kv),
        Candidate("reference", can_implement=lambda p: (True, ""), run=_run_reference),
    ],
    problem_key=lambda p: (p.key(), p.dtype, p.device.type),
)


# ----------------------------------------------------------------------------------------------- validation
def _validate(q, key_cache, value_cache, block_table, seq_lens, scale, k_scale, v_scale, sliding_window, soft_cap):
    num_seqs, _ = check_attention_inputs(q, key_cache, value_cache, k_scale, v_scale, block_table, seq_lens,
                                         q_layout="batch")
    if q.shape[0] != num_seqs:
        raise ValueError(f"q has {q.shape[0]} rows but block_table and seq_lens {num_seqs}: one query per sequence")
    check_attention_options(scale, sliding_window, soft_cap)


def _decode_fake(q, key_cache, value_cache, block_table, seq_lens, k_scale=None, v_scale=None, *,
                 scale, sliding_window=None, soft_cap=None):
    _validate(q, key_cache, value_cache, block_table, seq_lens, scale, k_scale, v_scale, sliding_window, soft_cap)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _samples(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    B, Hq, Hkv, D, nb, bs = 2, 4, 2, 64, 6, 16
    lens = torch.tensor([5, 40], dtype=torch.int32)
    table = torch.randperm(nb, generator=g)[: 2 * 3].reshape(B, 3).to(torch.int32)
    q = torch.randn(B, Hq, D, generator=g).half().to(device)
    for cache_dtype, extra in ((torch.int8, {}), (torch.float16, {"sliding_window": 7, "soft_cap": 30.0})):
        if cache_dtype == torch.int8:
            kc = torch.randint(-127, 128, (nb, bs, Hkv, D), generator=g, dtype=torch.int8)
            vc = torch.randint(-127, 128, (nb, bs, Hkv, D), generator=g, dtype=torch.int8)
            ks = (torch.rand(nb, bs, Hkv, generator=g) * 0.02 + 1e-3).to(device)
            vs = (torch.rand(nb, bs, Hkv, generator=g) * 0.02 + 1e-3).to(device)
        else:
            kc = torch.randn(nb, bs, Hkv, D, generator=g).half()
            vc = torch.randn(nb, bs, Hkv, D, generator=g).half()
            ks = vs = None
        yield (q, kc.to(device), vc.to(device), table.to(device), lens.to(device), ks, vs), {
            "scale": D ** -0.5, **extra}


@register_op("paged_decode_attention", fake=_decode_fake, samples=_samples)
def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *,
    scale: float,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
) -> torch.Tensor:
    """Decode attention: out [B, H_q, D] for one query token per sequence, q [B, H_q, D] fp16/bf16.

    key_cache/value_cache [num_blocks, block_size, H_kv, D]: int8 with k_scale/v_scale fp32
    [num_blocks, block_size, H_kv], or q's dtype (see ``kv_cache``). block_table int32 [B, max_blocks],
    seq_lens int32 [B] (tokens in the cache, the current one included). ``scale``: softmax scale;
    ``sliding_window``: tokens seen, the current one included; ``soft_cap``: logits → cap · tanh(logits / cap).
    Registered as ``torch.ops.angel_kernels.paged_decode_attention``.
    """
    _validate(q, key_cache, value_cache, block_table, seq_lens, scale, k_scale, v_scale, sliding_window, soft_cap)
    check_block_table_on_host(block_table, seq_lens, key_cache.shape[0], key_cache.shape[1])
    p = PagedDecodeProblem(q.shape[1], key_cache.shape[2], q.shape[2], key_cache.shape[1], q.dtype,
                           key_cache.dtype, q.device)
    cand = PAGED_DECODE.select(p, force="reference" if reference_forced() else None)
    return cand.run(p, q, key_cache, value_cache, block_table, seq_lens, scale, k_scale, v_scale,
                    sliding_window, soft_cap)


# --------------------------------------------------------------------------------------------------- tuning
def tuning_space(p: PagedDecodeProblem) -> list[KernelConfig]:
    """Tile width × warps (1: no cross-warp exchange per tile) × stages × smallest split (64–1024 tokens) ×
    programs per SM for one long sequence (the largest split count: 2, 4 or 8 per SM, rounded to a power of two,
    or 3 per SM exactly; one-warp programs at 8 per SM with a cap of 128 splits) × head-dim halves (D_SPLIT), and
    for int8 caches the word path, int8 q·kᵀ and a register cap (WORDS, QK_INT8, MAX_REGS) × the short-context
    split floor (MIN_SPLITS 1, 8 or 16) × page addressing (PAGE_ADDR, with FENCE_V for int8 caches) × the query
    rows' MMA side (HEADS_N).
    Every config is a valid partition, and the
    store keys it by model shape only (``p.key()``), so whichever wins, outputs stay batch-invariant."""
    from itertools import product

    configs = []
    # WORDS (int8 caches): fewer instructions per tile and no spills at BLOCK_N 128 / D_SPLIT 2 (sm_90a SASS:
    # 2220 → 1781 per tile, 48 B of spills → 0), one more shared-memory pass; timing decides
    # QK_INT8 (int8 caches): keys straight from shared memory into int8 MMAs, no conversion (sm_90a SASS at BLOCK_N
    # 128 / D_SPLIT 2 with WORDS: 1781 → 1538 per tile)
    # MAX_REGS 168 (int8, 4 warps): 3 programs per SM where the uncapped tile needs more (D_SPLIT 2 with WORDS:
    # 248 registers uncapped, 168 with 40 B of spills)
    int8 = p.kv_dtype == torch.int8
    int8_options = (0, 1) if int8 else (0,)
    # PAGE_ADDR (page addressing) and, for int8, FENCE_V with it: sm_90a, int8 BLOCK_N 128 with WORDS and
    # QK_INT8, 1808 → 1260 instructions per tile; the H100 winners use both (NOTES.md)
    # HEADS_N (query rows on an 8-wide MMA N side, transposed tiles): sm_90a, the int8 one-warp 32-token tile with
    # WORDS and QK_INT8, 255 → 168 registers and 1213 → 950 instructions per tile; fp16 64-token halves on 4 warps
    # 122 → 96 registers, 892 → 848
    for bn, warps, stages, min_tokens, per_sm, d_split, words, qk_int8, max_regs, min_splits, page, heads_n in product(
            (32, 64, 128), (1, 2, 4, 8), (1, 2, 3, 4), (64, 128, 256, 512, 1024), (2, 3, 4, 8), (1, 2), int8_options,
            int8_options, (0, 168) if int8 else (0,), (1, 8, 16), (0, 1), (0, 1)):
        if bn * p.head_dim > 16384 or min_tokens < bn:  # K and V tiles beyond ~32 K registers' worth spill
            continue
        if max_regs and warps != 4:
            continue
        if d_split == 2 and (bn < 64 or p.head_dim < 128):  # halves only pay where the full tiles spill
            continue
        extra = (("D_SPLIT", d_split),)
        extra += (("EXACT_SPLITS", 1),) if per_sm == 3 else ()  # rounded to a power of two, 3 per SM is 2
        extra += (("FENCE_V", 1),) if page and int8 else ()
        extra += (("HEADS_N", 1),) if heads_n else ()
        if max_regs:
            extra += (("MAX_REGS", max_regs),)  # sorted by name, as the store reads them
        extra += (("MIN_SPLITS", min_splits),) if min_splits > 1 else ()
        extra += (("MIN_SPLIT_TILES", min_tokens // bn),) + ((("PAGE_ADDR", 1),) if page else ())
        extra += (("PROGRAMS_PER_SM", per_sm),)
        if qk_int8:
            extra += (("QK_INT8", 1),)
        if per_sm == 8 and warps == 1:  # 8 per SM is 128 splits at 8 KV heads on 132 SMs: above the default cap
            extra += (("SPLITS_CAP", 128),)
        if words:
            extra += (("WORDS", 1),)
        configs.append(KernelConfig(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=p.head_dim, num_warps=warps, num_stages=stages,
                                    extra=extra))
    return configs


TUNE_CASES = ((1, 32768), (8, 4096), (64, 16384))  # (batch, context): latency-bound, mid, bandwidth-bound


def tune(num_q_heads: int, num_kv_heads: int, head_dim: int, *, block_size: int = 16, kv_dtype=torch.int8,
         dtype=torch.float16, cases=TUNE_CASES, device="cuda", store=None, bench=None, configs=None,
         packed_rows: bool = False):
    """Warm-up step: time ``tuning_space`` (or ``configs``) on the sum of ``cases`` (shuffled block tables, full
    contexts), check each config against the heuristic config's output (relative error ≤ 1e-3), record the
    fastest. Returns (best config, {config: µs}). ``packed_rows`` (int8): the caches in vLLM's packed
    int8_per_token_head layout (``inline_scale_views``; 8- and 4-byte aligned rows), recorded under that key.

    Timed over rotating input sets, each holding every case, until together they exceed twice the L2 size (the
    default cases hold 2.3 GB of int8 KV for Llama-3-8B heads: one set); set 0 is the checked one.
    ``bench(calls) -> µs`` defaults to CUDA-graph replay over the sets (see ``tune_kernel``)."""
    from functools import partial

    from ..testing import relative_error
    from ..tuning import l2_bytes, rotation_count, tune_kernel

    device = torch.device(device)
    if packed_rows and kv_dtype != torch.int8:
        raise ValueError("packed_rows is vLLM's int8 layout: kv_dtype must be torch.int8")
    p = PagedDecodeProblem(num_q_heads, num_kv_heads, head_dim, block_size, dtype, kv_dtype, device,
                           packed_rows=packed_rows)
    gen = torch.Generator(device=device).manual_seed(0)

    def packed(kc, vc, ks, vs):
        """The same values in vLLM's packed layout: per (block, slot, head) [K | K scale | V | V scale]."""
        raw = torch.empty(*kc.shape[:3], 2 * (head_dim + INLINE_SCALE_BYTES), dtype=torch.int8, device=device)
        views = inline_scale_views(raw.transpose(1, 2), head_dim)
        for view, t in zip(views, (kc, vc, ks, vs)):
            view.copy_(t)
        return views

    def make_set():
        inputs = []
        for batch, context in cases:
            blocks = -(-context // block_size)
            nb = batch * blocks
            table = torch.randperm(nb, device=device, generator=gen).reshape(batch, blocks).to(torch.int32)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            q = torch.randn(batch, num_q_heads, head_dim, device=device, generator=gen).to(dtype)
            shape = (nb, block_size, num_kv_heads, head_dim)
            kc, vc, ks, vs = random_kv_caches(shape, kv_dtype, device, gen)
            if packed_rows:
                kc, vc, ks, vs = packed(kc, vc, ks, vs)
            inputs.append((q[:, None], kc, vc, table, lens, head_dim ** -0.5, ks, vs))
        return inputs

    sets = [make_set()]
    set_bytes = sum(t.numel() * t.element_size() for args in sets[0] for t in args if isinstance(t, torch.Tensor))
    sets += [make_set() for _ in range(1, rotation_count(set_bytes, l2_bytes(device)))]

    def make_call(cfg):
        policy = split_policy(p, cfg)

        def run(inputs):
            return [launch_paged_attention(*args, cfg=cfg, policy=policy) for args in inputs]

        return [partial(run, inputs) for inputs in sets]

    baseline = make_call(heuristic_config(p))[0]()

    def check(outs):
        for out, ref in zip(outs, baseline):
            err = relative_error(out, ref)
            if not err <= 1e-3:
                raise ValueError(f"relative error {err} vs the default config")

    return tune_kernel(store or default_store(), KERNEL_NAME, p.key(), configs or tuning_space(p), make_call, device,
                       check=check, bench=bench)
