"""Paged attention for variable-length queries: prefill, chunked prefill and prefix-cached prefill (and decode
tokens mixed into the same batch), over an int8 (per-token-head scales) or fp16/bf16 KV cache.

Queries are packed like vLLM's: ``q [T, H_q, D]``, sequence ``b`` owns rows ``query_start_loc[b] :
query_start_loc[b + 1]`` and those ``Q_b`` tokens are the last ``Q_b`` of its ``seq_lens[b]`` cached tokens
(the new tokens' K/V are written to the cache first, by ``write_kv_cache``). Each query sees the cached keys at
positions ≤ its own (causal), within the sliding window if there is one.

Program = (query tile, KV head): a tile is ``BLOCK_Q`` consecutive query tokens of one sequence × the
``H_q / H_kv`` query heads that read the KV head (GQA), ``BLOCK_M = BLOCK_Q · group`` rows of one MMA tile, so a
K/V tile loaded once serves the whole group. Tiles are numbered per sequence from ``query_start_loc[b] //
BLOCK_Q + b`` (a sequence of ``Q_b`` tokens has ``cdiv(Q_b, BLOCK_Q)`` ≤ ``Q_b // BLOCK_Q + 1`` tiles, so the
numbering never overlaps and ``T // BLOCK_Q + B`` tiles × ``H_kv`` programs cover every batch, launched last
tile first); a program finds its sequence by binary search over ``query_start_loc``. The KV loop runs over the
tiles a query tile can see: those entirely before its first query need no causal mask (the common case: a
1000-token prompt with ``BLOCK_Q`` 32 masks 1 or 2 of ~16 KV tiles per program), the rest are masked per element.
Dequantization is fused as in the decode kernel (K scale on the scores, V scales folded into the probabilities);
softmax in fp32, base 2.

Fresh prompts over an int8 cache (``FRESH_COPY`` in the config, shipped on the H100): a prompt with no cached
prefix reads only its own new tokens, and each KV tile of a 1024-token prompt is seen by ~32 query tiles, each of
which converted it from int8 again. Such sequences are served by a second launch instead: one small kernel writes
their rows dequantized (int8 · scale, rounded once to q's dtype) into a [T, H_kv, D] copy (2 × T × H_kv × D
elements, freed after the call), and the plain-cache kernel path reads it with the plain-cache config; the other
sequences (a cached prefix, decode tokens) take the int8 path as before. Which launch serves a sequence depends on
that sequence only (batch-invariant). H100, int8 time / SDPA flash fp16's in the same run, before → after:
1×1024 0.93 → 0.78 (41.9 µs), 4×1024 1.30 → 1.02 (159.4 µs), 1×4096 1.06 → 0.84 (426.3 µs).

A batch whose queries are all single tokens (``max_query_len == 1``) goes to the split-KV decode kernel
(``paged_decode``): a query tile of 1 token would leave ~97 % of a 128-row MMA tile empty, and long decodes need
the KV split across SMs. No split-KV here: prefill has ``cdiv(Q_b, BLOCK_Q) · H_kv`` programs per sequence.

Candidates (``ANGEL_KERNELS_FORCE_PAGED_PREFILL`` / ``ANGEL_KERNELS_DISABLE=paged_prefill.<name>``): ``varlen``
(Triton, above) and ``reference`` (fp32 pure torch, the CPU path).
"""
import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import check_same_device, check_tensor
from .._registry import register_op
from ..dispatch import Candidate, KernelFamily
from ..reference.attention import paged_varlen_attention_ref
from ..runtime import interpreter_active, reference_forced, triton_runnable_on
from ..tuning import KernelConfig, default_store
from .kv_cache import (PagedAttentionProblem, check_attention_inputs, check_attention_options,
                       check_block_table_on_host, random_kv_caches)
from .paged_decode import (LOG2E, LOG2E_C, _exp2_step, _int8_qk, _kv_tile, _split_q_rows, _tile_pages,
                           page_addressing, paged_decode_attention, row_alignment, words_path)

KERNEL_NAME = "paged_prefill.varlen"
# Interpreter: small tiles so CPU tests see several query tiles per sequence and several KV tiles per tile.
INTERPRETER_CONFIG = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=0, num_warps=4, num_stages=1)


PagedPrefillProblem = PagedAttentionProblem  # one problem description for the decode and varlen kernels
# FRESH_COPY serves prompts of at least this many tokens (no cached prefix) on their dequantized rows: a shorter
# one has few query tiles to convert its KV tiles for, and a batch whose longest query is shorter (decode tokens,
# tree verification) skips the copy and its launch (host-side, from max_query_len)
FRESH_MIN_TOKENS = 64
_FRESH_MIN = tl.constexpr(FRESH_MIN_TOKENS)  # the same, inside kernels


# ------------------------------------------------------------------------------------------------------ kernel
@triton.jit
def _find_sequence(qsl_ptr, tile_id, num_seqs, BLOCK_Q: tl.constexpr, TILES: tl.constexpr = True):
    """The last sequence b whose first tile ``qsl[b] // BLOCK_Q + b`` is ≤ tile_id (binary search). TILES=False:
    tile_id is a query token, and b the last sequence whose first token ``qsl[b]`` is ≤ it (sequences without
    queries share the next one's start, and the last of equals is the one that owns the token)."""
    lo = tile_id * 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if TILES:
            first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        else:
            first = tl.load(qsl_ptr + mid)
        go_right = first <= tile_id
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    return lo


@triton.jit
def _fresh_prompt(L, q_len):
    """Whether FRESH_COPY serves the sequence on its dequantized rows: no cached prefix, ≥ FRESH_MIN_TOKENS queries
    (the varlen kernel's SEQS and the copy kernel agree through this)."""
    return (L - q_len <= 0) & (q_len >= _FRESH_MIN)


@triton.jit
def _attend_kv_tile(
    acc, acc2, m_i, l_i, v_unit, q, q2, q_lo, q2_lo, q_row_scale, n0, L, row_lo, row_hi, bt_row, stride_btn,
    kc_ptr, vc_ptr, ks_ptr, vs_ptr, kvh, qk_scale, soft_cap,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, MAGIC: tl.constexpr, MASKED: tl.constexpr,
    K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, WORDS: tl.constexpr, ASM: tl.constexpr, D_SPLIT: tl.constexpr,
    PAGE_ADDR: tl.constexpr, BF16: tl.constexpr, QK_INT8: tl.constexpr, FENCE_V: tl.constexpr,
    copy_row0, FROM_COPY: tl.constexpr,
):
    """One online-softmax step over the KV tile [n0, n0 + BLOCK_N). Unmasked tiles lie entirely below L and
    before every row's first query position. D_SPLIT 2: q, K, V and the accumulator in head-dim halves (q2, acc2:
    the second halves; unused scalars otherwise). v_unit: int8 V, the accumulator's unit (as paged_decode's split
    kernel: the last tile's largest V scale, so p · v accumulates inside the MMA). QK_INT8: q and q2 are the int8
    high parts of the query, q_lo and q2_lo the low parts, q_row_scale their per-row step (``_split_q_rows``);
    unused scalars otherwise.
    FROM_COPY: kc_ptr / vc_ptr are a contiguous [T, H_kv, D] copy (``dequantized_fresh_kv``), position p at row
    ``copy_row0 + p`` (slot stride = row stride); no block table."""
    PART: tl.constexpr = HEAD_DIM // D_SPLIT
    DT: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    dims = tl.arange(0, PART)
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        pos_ok = pos < L
    else:
        pos_ok = tl.full((BLOCK_N,), 1, tl.int1)  # all true (a constant: the loads below drop their masks)
    if FROM_COPY:
        row = (copy_row0 + pos).to(tl.int64)
        k_tok = tl.multiple_of(kc_ptr + row * stride_kcs + kvh * stride_kch, K_ALIGN)
        v_tok = tl.multiple_of(vc_ptr + row * stride_vcs + kvh * stride_vch, V_ALIGN)
    else:
        slot, k_page, v_page, ks_page, vs_page = _tile_pages(
            bt_row, stride_btn, n0, pos_ok, stride_kcb, stride_vcb, stride_ksb, stride_vsb, PAGE, BLOCK_N, PAGE_ADDR,
            ASM)
        k_tok = tl.multiple_of(kc_ptr + k_page + slot * stride_kcs + kvh * stride_kch, K_ALIGN)
        v_tok = tl.multiple_of(vc_ptr + v_page + slot * stride_vcs + kvh * stride_vch, V_ALIGN)
    if QK_INT8:  # the keys go to int8 MMAs as loaded (paged_decode's _int8_qk)
        s = _int8_qk(k_tok, q, q_lo, q2, q2_lo, dims, pos_ok, K_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N, PART, D_SPLIT)
    else:
        # int8 rows: WORDS reads int32 words (paged_decode's word conversion), else MAGIC converts element-wise
        kt = _kv_tile(k_tok, 0, dims, pos_ok, True, WORDS, MAGIC, K_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N, PART)
        if DOT_FP32:  # the interpreter's bf16 dot is wrong: fp32 there
            s = tl.dot(q, kt.to(tl.float32))
        else:
            s = tl.dot(q, kt.to(DT))  # int8 → fp16/bf16 is exact for [-128, 127]
        if D_SPLIT == 2:
            kt = _kv_tile(k_tok, PART, dims, pos_ok, True, WORDS, MAGIC, K_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N,
                          PART)
            if DOT_FP32:
                s = tl.dot(q2, kt.to(tl.float32), s)
            else:
                s = tl.dot(q2, kt.to(DT), s)
    # Plain fp caches keep s = q·k unscaled: the scale (> 0, checked) goes into the max once per row and into the
    # exponent's FFMA (_exp2_step), one multiply per score fewer (the softmax, not the MMAs, issues most of this
    # loop). int8 q·kᵀ does the same with its per-row step (> 0 by construction); a soft-cap needs the scaled score.
    FOLD: tl.constexpr = not QUANT and not HAS_SOFTCAP
    ROW_FOLD: tl.constexpr = QK_INT8 and not HAS_SOFTCAP
    if QK_INT8 and not ROW_FOLD:
        s = s * q_row_scale[:, None]
    if QUANT:
        k_sc = tl.load(ks_ptr + ks_page + slot * stride_kss + kvh * stride_ksh, mask=pos_ok, other=0.0)
        s = s * (k_sc * qk_scale)[None, :]
    elif not FOLD:
        s = s * qk_scale
    if HAS_SOFTCAP:  # s holds scale · q·k here; cap · tanh(s / cap), tanh via exp, then to base 2
        e = tl.exp(2.0 * s / soft_cap)
        s = (soft_cap * LOG2E_C) * (1.0 - 2.0 / (e + 1.0))
    if MASKED:
        visible = pos_ok[None, :] & (pos[None, :] < row_hi[:, None]) & (pos[None, :] >= row_lo[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new, alpha, p = _exp2_step(s, m_i, qk_scale, q_row_scale, FOLD, ROW_FOLD)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _kv_tile(v_tok, 0, dims, pos_ok, False, WORDS, MAGIC, V_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N, PART, FENCE_V)
    if QUANT:
        v_sc = tl.load(vs_ptr + vs_page + slot * stride_vss + kvh * stride_vsh, mask=pos_ok, other=0.0)
        v_max = tl.max(v_sc, axis=0)
        v_max = tl.where(v_max > 0, v_max, 1.0)
        p = p * (v_sc / v_max)[None, :]
        alpha = alpha * (v_unit / v_max)
        v_unit = v_max
    if not DOT_FP32:
        p = p.to(DT)
    acc = tl.dot(p, v.to(p.dtype), acc * alpha[:, None])
    if D_SPLIT == 2:
        v = _kv_tile(v_tok, PART, dims, pos_ok, False, WORDS, MAGIC, V_ALIGN, BF16, ASM, DOT_FP32, BLOCK_N, PART,
                     FENCE_V)
        acc2 = tl.dot(p, v.to(p.dtype), acc2 * alpha[:, None])
    return acc, acc2, m_new, l_i, v_unit


@triton.jit
def _paged_varlen_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, qsl_ptr, out_ptr,
    qk_scale, soft_cap, window, capacity, num_seqs, num_kv_heads,
    stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    stride_btb, stride_btn,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    MAGIC: tl.constexpr, K_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr,
    WORDS: tl.constexpr = False,  # int8 cache read as int32 words (see paged_decode)
    ASM: tl.constexpr = False,  # WORDS on a GPU: the PTX conversion
    D_SPLIT: tl.constexpr = 1,  # head-dim halves (see _attend_kv_tile)
    PAGE_ADDR: tl.constexpr = False,  # page offsets by a 32-bit wide multiply (see paged_decode)
    QK_INT8: tl.constexpr = False,  # int8 caches: q·kᵀ on int8 MMAs, q split in two int8 parts (see paged_decode)
    FENCE_V: tl.constexpr = False,  # int8 caches: the converted V tile with the 16-bit MMA operand layout
    FROM_COPY: tl.constexpr = False,  # kc / vc: fresh prompts' dequantized rows (_attend_kv_tile)
    SEQS: tl.constexpr = 0,  # the sequences served: 0 all, 1 fresh prompts (FRESH_MIN_TOKENS), 2 the others
):
    BF16: tl.constexpr = q_ptr.dtype.element_ty == tl.bfloat16
    # Longest first: one grid axis, the KV heads of a query tile side by side and the tiles in reverse, so a
    # sequence's last query tiles (the most KV tiles under the causal mask) start first and the short ones fill
    # the tail. H100, µs int8 / fp16 (tiles in order, heads on a second axis → this): 1×1024 70 → 52 / 50 → 35,
    # 4×1024 223 → 208 / 173 → 161, 1×4096 638 → 571 / 503 → 449; a 512-token chunk after 3584 cached equal.
    num_tiles = tl.num_programs(0) // num_kv_heads
    tile_id = num_tiles - 1 - tl.program_id(0) // num_kv_heads
    kvh = tl.program_id(0) % num_kv_heads
    b = _find_sequence(qsl_ptr, tile_id, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    q_tile = tile_id - (q_start // BLOCK_Q + b)  # this program's tile within its sequence
    b64 = b.to(tl.int64)
    L = tl.minimum(tl.maximum(tl.load(lens_ptr + b64), 0), capacity)
    ctx = L - q_len  # cached tokens before the sequence's first query
    serve = q_tile * BLOCK_Q < q_len
    fresh = _fresh_prompt(L, q_len)  # served by FRESH_COPY's launch on the copy
    if SEQS == 1:
        serve = serve & fresh
    if SEQS == 2:
        serve = serve & (fresh == 0)
    if serve:

        rows = tl.arange(0, BLOCK_M)
        tok = q_tile * BLOCK_Q + rows // GROUP  # query token within the sequence
        row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
        qh = kvh * GROUP + rows % GROUP
        PART: tl.constexpr = HEAD_DIM // D_SPLIT
        dims = tl.arange(0, PART)
        q_rows = (q_start + tok).to(tl.int64)
        q_ptrs = q_ptr + q_rows[:, None] * stride_qt + qh[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        if D_SPLIT == 2:
            q2 = tl.load(q_ptrs + PART, mask=row_ok[:, None], other=0.0)
            if DOT_FP32:
                q2 = q2.to(tl.float32)
            acc2 = tl.zeros((BLOCK_M, PART), dtype=tl.float32)
        else:
            q2 = 0.0  # unused
            acc2 = 0.0
        if QK_INT8:  # q and q2 become the int8 high parts (paged_decode's _split_q_rows)
            q, q_lo, q2, q2_lo, q_row_scale = _split_q_rows(q, q2, D_SPLIT)
        else:
            q_lo = 0.0  # unused
            q2_lo = 0.0
            q_row_scale = 0.0
        row_hi = ctx + tok + 1  # keys [row_lo, row_hi) are visible to the row
        if HAS_WINDOW:
            row_lo = tl.maximum(row_hi - window, 0)
        else:
            row_lo = row_hi * 0

        first_q = ctx + q_tile * BLOCK_Q  # position of the tile's first query
        last_q = tl.minimum(first_q + BLOCK_Q, L) - 1
        kv_end = last_q + 1
        if HAS_WINDOW:
            kv_start = tl.maximum(first_q + 1 - window, 0)
            n_lo = (kv_start // BLOCK_N) * BLOCK_N
            n_full = n_lo  # every tile is masked with a window (its lower edge moves with each row)
        else:
            n_lo = first_q * 0
            n_full = ((first_q + 1) // BLOCK_N) * BLOCK_N  # tiles ending at or before first_q + 1: unmasked
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, PART), dtype=tl.float32)
        v_unit = 1.0
        bt_row = bt_ptr + b64 * stride_btb
        for n0 in range(n_lo, n_full, BLOCK_N):
            acc, acc2, m_i, l_i, v_unit = _attend_kv_tile(
                acc, acc2, m_i, l_i, v_unit, q, q2, q_lo, q2_lo, q_row_scale, n0, L, row_lo, row_hi, bt_row,
                stride_btn,
                kc_ptr, vc_ptr, ks_ptr, vs_ptr, kvh, qk_scale, soft_cap,
                stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
                HEAD_DIM, PAGE, BLOCK_N, QUANT, HAS_SOFTCAP, DOT_FP32, MAGIC, False, K_ALIGN, V_ALIGN, WORDS,
                ASM, D_SPLIT, PAGE_ADDR, BF16, QK_INT8, FENCE_V, q_start - ctx, FROM_COPY)
        for n0 in range(n_full, kv_end, BLOCK_N):
            acc, acc2, m_i, l_i, v_unit = _attend_kv_tile(
                acc, acc2, m_i, l_i, v_unit, q, q2, q_lo, q2_lo, q_row_scale, n0, L, row_lo, row_hi, bt_row,
                stride_btn,
                kc_ptr, vc_ptr, ks_ptr, vs_ptr, kvh, qk_scale, soft_cap,
                stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
                HEAD_DIM, PAGE, BLOCK_N, QUANT, HAS_SOFTCAP, DOT_FP32, MAGIC, True, K_ALIGN, V_ALIGN, WORDS,
                ASM, D_SPLIT, PAGE_ADDR, BF16, QK_INT8, FENCE_V, q_start - ctx, FROM_COPY)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o_ptrs = out_ptr + q_rows[:, None] * stride_ot + qh[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, (acc * (v_unit / l_safe)[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        if D_SPLIT == 2:
            tl.store(o_ptrs + PART, (acc2 * (v_unit / l_safe)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None])


@triton.jit
def _fresh_kv_copy_kernel(
    kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, qsl_ptr, nk_ptr, nv_ptr,
    capacity, num_seqs, num_kv_heads,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    stride_btb, stride_btn, stride_nt, stride_nh,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS: tl.constexpr,
):
    """Query token t of a fresh prompt (no cached prefix, at least FRESH_MIN_TOKENS queries): its cached K and V
    rows, every KV head, dequantized (int8 · scale in fp32, rounded once to the output dtype) into row t of nk / nv.
    Rows of other sequences are not written (the fresh launch does not read them); a position outside [0, L) (a
    length shorter than its query: bad input) gives zeros."""
    t = tl.program_id(0)
    b = _find_sequence(qsl_ptr, t, num_seqs, 1, TILES=False).to(tl.int64)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    L = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), capacity)
    if _fresh_prompt(L, q_len):  # the fresh launch's sequences (_paged_varlen_kernel, SEQS 1)
        pos = L - q_len + (t - q_start)
        heads = tl.arange(0, HEADS)
        dims = tl.arange(0, HEAD_DIM)
        keep = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM)  # [HEADS, HEAD_DIM]
        pos_2d = pos + tl.zeros((HEADS, HEAD_DIM), dtype=tl.int32)  # as a tile: the interpreter's masks are tiles
        m = keep & (pos_2d >= 0) & (pos_2d < L)
        pos = tl.where((pos >= 0) & (pos < L), pos, 0)
        blk = tl.load(bt_ptr + b * stride_btb + (pos // PAGE) * stride_btn).to(tl.int64)  # column 0 where not ok
        slot = pos % PAGE
        k = tl.load(kc_ptr + blk * stride_kcb + slot * stride_kcs + heads[:, None] * stride_kch + dims[None, :],
                    mask=m, other=0)
        v = tl.load(vc_ptr + blk * stride_vcb + slot * stride_vcs + heads[:, None] * stride_vch + dims[None, :],
                    mask=m, other=0)
        head_ok = heads < num_kv_heads
        k_sc = tl.load(ks_ptr + blk * stride_ksb + slot * stride_kss + heads * stride_ksh, mask=head_ok, other=0.0)
        v_sc = tl.load(vs_ptr + blk * stride_vsb + slot * stride_vss + heads * stride_vsh, mask=head_ok, other=0.0)
        row = t.to(tl.int64) * stride_nt + heads[:, None] * stride_nh + dims[None, :]
        tl.store(nk_ptr + row, (k.to(tl.float32) * k_sc[:, None]).to(nk_ptr.dtype.element_ty), mask=keep)
        tl.store(nv_ptr + row, (v.to(tl.float32) * v_sc[:, None]).to(nv_ptr.dtype.element_ty), mask=keep)


def dequantized_fresh_kv(q, key_cache, value_cache, k_scale, v_scale, block_table, seq_lens, query_start_loc):
    """The K and V rows of every query token of a fresh prompt, dequantized to q's dtype: (nk, nv), each
    [T, H_kv, D] (rows of other sequences left unwritten). Read once here instead of converted once per query
    tile that sees them (a 1024-token prompt's KV tile is seen by ~32 of its query tiles)."""
    T, Hkv, D = q.shape[0], key_cache.shape[2], key_cache.shape[3]
    nk = torch.empty((T, Hkv, D), dtype=q.dtype, device=q.device)
    nv = torch.empty_like(nk)
    page = key_cache.shape[1]
    _fresh_kv_copy_kernel[(T,)](
        key_cache, value_cache, k_scale, v_scale, block_table, seq_lens, query_start_loc, nk, nv,
        block_table.shape[1] * page, seq_lens.shape[0], Hkv,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        *k_scale.stride(), *v_scale.stride(),
        block_table.stride(0), block_table.stride(1), nk.stride(0), nk.stride(1),
        PAGE=page, HEAD_DIM=D, HEADS=triton.next_power_of_2(Hkv), num_warps=4,
    )
    return nk, nv


# ------------------------------------------------------------------------------------------------- launching
def heuristic_config(p: PagedPrefillProblem) -> KernelConfig:
    """Untuned default: 128-row query tiles (two warpgroups of wgmma on Hopper) and 64-token KV tiles for
    D ≤ 128 (a 128×128 fp16 Q tile + K and V tiles of 64×128 fit with two stages in ~100 KB of shared memory);
    64 rows / 32 tokens at D = 256. int8 caches at D = 128: the H100 winner (64-row query tiles × 128-token KV
    tiles, 4 warps, 2 stages, page addressing, V by the word path, q·kᵀ on int8 MMAs, fresh prompts on their
    dequantized rows)."""
    if p.head_dim == 128 and p.kv_dtype == torch.int8:
        return KernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=2,
                            extra=(("PAGE_ADDR", 1), ("QK_INT8", 1), ("WORDS", 1), ("FRESH_COPY", 1)))
    if p.head_dim <= 128:
        return KernelConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=p.head_dim, num_warps=8, num_stages=2)
    return KernelConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=p.head_dim, num_warps=4, num_stages=2)


def config_for(p: PagedPrefillProblem) -> KernelConfig:
    if interpreter_active() and p.device.type == "cpu":
        return INTERPRETER_CONFIG
    return default_store().lookup(KERNEL_NAME, p.key(), p.device) or heuristic_config(p)


def fresh_prompt_config(p: PagedPrefillProblem) -> KernelConfig:
    """The config of an int8 problem's fresh-prompt launch (``FRESH_COPY``): the plain-cache one of its heads."""
    return config_for(dataclasses.replace(p, kv_dtype=p.dtype, packed_rows=False))


def block_q_for(group: int, block_m: int) -> int:
    """Query tokens per tile: as many whole GQA groups as fit the MMA rows (at least one token)."""
    return max(1, block_m // group)


def launch_paged_varlen(
    q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale: float, k_scale=None, v_scale=None,
    sliding_window: Optional[int] = None, soft_cap: Optional[float] = None, *, cfg: Optional[KernelConfig] = None,
    max_query_len: Optional[int] = None,
) -> torch.Tensor:
    """The varlen kernel with an explicit (or the default) config; returns [T, H_q, D]. An int8 config with
    ``FRESH_COPY`` serves fresh prompts (no cached prefix, ≥ ``FRESH_MIN_TOKENS`` tokens) by a second launch over
    their dequantized rows, with the plain-cache config of the same heads (``fresh_prompt_config``), unless
    ``max_query_len`` (the longest query, if known) says no sequence qualifies."""
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    Hkv, page = key_cache.shape[2], key_cache.shape[1]
    p = PagedPrefillProblem(Hq, Hkv, D, page, q.dtype, key_cache.dtype, q.device)
    cfg = cfg or config_for(p)
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out
    quant = key_cache.dtype == torch.int8
    # lengths are clamped to the block table's capacity, the same in both launches
    common = (block_table, seq_lens, query_start_loc, out, scale, sliding_window, soft_cap, page,
              block_table.shape[1] * page)
    may_be_fresh = max_query_len is None or max_query_len >= FRESH_MIN_TOKENS
    if quant and dict(cfg.extra).get("FRESH_COPY", 0) and may_be_fresh:
        nk, nv = dequantized_fresh_kv(q, key_cache, value_cache, k_scale, v_scale, block_table, seq_lens,
                                      query_start_loc)
        # the copy as a cache of one block of T slots (row alignment and strides as for a cache)
        _launch_varlen(q, nk.unsqueeze(0), nv.unsqueeze(0), None, None, *common, fresh_prompt_config(p),
                       from_copy=True, seqs=1)
        _launch_varlen(q, key_cache, value_cache, k_scale, v_scale, *common, cfg, seqs=2)
    else:
        _launch_varlen(q, key_cache, value_cache, k_scale, v_scale, *common, cfg)
    return out


def _launch_varlen(q, key_cache, value_cache, k_scale, v_scale, block_table, seq_lens, query_start_loc, out, scale,
                   sliding_window, soft_cap, page, capacity, cfg, *, from_copy=False, seqs=0):
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    Hkv = key_cache.shape[2]
    group = Hq // Hkv
    block_m = max(cfg.BLOCK_M, triton.next_power_of_2(group))
    block_q = block_q_for(group, block_m)
    quant = key_cache.dtype == torch.int8
    has_softcap = soft_cap is not None
    grid = ((T // block_q + B) * Hkv,)
    k_align, v_align = row_alignment(key_cache), row_alignment(value_cache)
    _paged_varlen_kernel[grid](
        q, key_cache, value_cache, k_scale if quant else key_cache, v_scale if quant else value_cache,
        block_table, seq_lens, query_start_loc, out,
        float(scale) * (1.0 if has_softcap else LOG2E), float(soft_cap) if has_softcap else 1.0,
        int(sliding_window) if sliding_window is not None else 0, capacity, B, Hkv,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        *(k_scale.stride() if quant else (0, 0, 0)), *(v_scale.stride() if quant else (0, 0, 0)),
        block_table.stride(0), block_table.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=D, PAGE=page, BLOCK_N=cfg.BLOCK_N,
        QUANT=quant, HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=has_softcap,
        DOT_FP32=q.device.type == "cpu", MAGIC=quant and q.dtype == torch.float16,
        K_ALIGN=k_align, V_ALIGN=v_align,
        WORDS=words_path(cfg, quant, k_align, v_align),
        ASM=q.device.type == "cuda", D_SPLIT=int(dict(cfg.extra).get("D_SPLIT", 1)),
        PAGE_ADDR=not from_copy and page_addressing(cfg, key_cache, value_cache, k_scale, v_scale),
        QK_INT8=quant and bool(dict(cfg.extra).get("QK_INT8", 0)),
        FENCE_V=quant and bool(dict(cfg.extra).get("FENCE_V", 0)),
        FROM_COPY=from_copy, SEQS=seqs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


# ------------------------------------------------------------------------------------------------- dispatch
def _run_varlen(p, q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale, k_scale, v_scale,
                sliding_window, soft_cap, max_query_len=None):
    return launch_paged_varlen(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
                               k_scale, v_scale, sliding_window, soft_cap, max_query_len=max_query_len)


def _run_reference(p, q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale, k_scale, v_scale,
                   sliding_window, soft_cap, max_query_len=None):
    return paged_varlen_attention_ref(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, k_scale,
                                      v_scale, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)


PAGED_PREFILL: KernelFamily[PagedPrefillProblem] = KernelFamily(
    "paged_prefill",
    [
        Candidate("varlen", can_implement=lambda p: triton_runnable_on(p.device), run=_run_varlen),
        Candidate("reference", can_implement=lambda p: (True, ""), run=_run_reference),
    ],
    problem_key=lambda p: (p.key(), p.dtype, p.device.type),
)


# ----------------------------------------------------------------------------------------------- validation
def _validate(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, k_scale, v_scale, scale,
              max_query_len, sliding_window, soft_cap):
    num_seqs, _ = check_attention_inputs(q, key_cache, value_cache, k_scale, v_scale, block_table, seq_lens,
                                         q_layout="num_tokens")
    check_tensor("query_start_loc", query_start_loc, dtypes=(torch.int32,), dim=1)
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc must have num_seqs + 1 = {num_seqs + 1} entries (cumulative query lengths), got"
            f" {query_start_loc.shape[0]}"
        )
    check_same_device(q=q, query_start_loc=query_start_loc)
    if not (isinstance(max_query_len, int) and max_query_len >= 1):
        raise ValueError(f"max_query_len must be an int >= 1 (the longest query in the batch), got {max_query_len!r}")
    check_attention_options(scale, sliding_window, soft_cap)


def _check_on_host(q, block_table, seq_lens, query_start_loc, max_query_len, num_blocks, block_size) -> None:
    """Only for CPU tensors (no device sync): cumulative query lengths consistent with q and the lengths; the
    block table as for decode."""
    if seq_lens.device.type != "cpu" or seq_lens.numel() == 0:
        return
    starts = query_start_loc.to(torch.int64)
    q_lens = starts[1:] - starts[:-1]
    if int(starts[0]) != 0 or int(starts[-1]) != q.shape[0] or (q_lens.numel() and int(q_lens.min()) < 0):
        raise ValueError(
            f"query_start_loc must rise from 0 to num_tokens {q.shape[0]}, got {query_start_loc.tolist()[:8]}..."
        )
    if int(q_lens.max()) > max_query_len:
        raise ValueError(f"max_query_len {max_query_len} is below the longest query ({int(q_lens.max())} tokens)")
    short = (seq_lens.to(torch.int64) < q_lens).nonzero()
    if short.numel():
        b = int(short[0])
        raise ValueError(
            f"sequence {b} has {int(q_lens[b])} query tokens but only {int(seq_lens[b])} cached tokens: seq_lens"
            " counts the cached context including the new tokens"
        )
    check_block_table_on_host(block_table, seq_lens, num_blocks, block_size)


def _fake(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, k_scale=None, v_scale=None, *,
          scale, max_query_len, sliding_window=None, soft_cap=None):
    _validate(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, k_scale, v_scale, scale,
              max_query_len, sliding_window, soft_cap)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _samples(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    Hq, Hkv, D, nb, bs = 4, 2, 64, 10, 16
    lens = torch.tensor([20, 40, 7], dtype=torch.int32)
    qsl = torch.tensor([0, 5, 6, 13], dtype=torch.int32)  # 5 new tokens, 1 (decode), 7 (whole prompt)
    table = torch.randperm(nb, generator=g)[:9].reshape(3, 3).to(torch.int32)
    q = torch.randn(13, Hq, D, generator=g).half().to(device)
    kc = torch.randint(-127, 128, (nb, bs, Hkv, D), generator=g, dtype=torch.int8)
    vc = torch.randint(-127, 128, (nb, bs, Hkv, D), generator=g, dtype=torch.int8)
    ks = torch.rand(nb, bs, Hkv, generator=g) * 0.02 + 1e-3
    vs = torch.rand(nb, bs, Hkv, generator=g) * 0.02 + 1e-3
    common = (table.to(device), lens.to(device), qsl.to(device))
    yield (q, kc.to(device), vc.to(device), *common, ks.to(device), vs.to(device)), {
        "scale": D ** -0.5, "max_query_len": 7}
    kf, vf = torch.randn(nb, bs, Hkv, D, generator=g).half(), torch.randn(nb, bs, Hkv, D, generator=g).half()
    yield (q, kf.to(device), vf.to(device), *common, None, None), {
        "scale": D ** -0.5, "max_query_len": 7, "sliding_window": 9, "soft_cap": 30.0}


@register_op("paged_attention", fake=_fake, samples=_samples)
def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    *,
    scale: float,
    max_query_len: int,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
) -> torch.Tensor:
    """Paged attention for a batch of variable-length queries: out [T, H_q, D].

    q [T, H_q, D] fp16/bf16, packed by sequence: ``query_start_loc`` int32 [B + 1] (0, cumulative query lengths);
    sequence ``b``'s queries are the last ``Q_b`` of its ``seq_lens[b]`` cached tokens (int32 [B], new tokens
    included: write their K/V first). Caches, scales, ``block_table``, ``scale``, ``sliding_window`` and
    ``soft_cap`` as in ``paged_decode_attention``. ``max_query_len``: the longest ``Q_b`` (vLLM's metadata has
    it on the host); 1 means every sequence has exactly one query, which selects the split-KV decode kernel.
    Registered as ``torch.ops.angel_kernels.paged_attention``.
    """
    _validate(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, k_scale, v_scale, scale,
              max_query_len, sliding_window, soft_cap)
    _check_on_host(q, block_table, seq_lens, query_start_loc, max_query_len, key_cache.shape[0], key_cache.shape[1])
    if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
        # one query per sequence, in sequence order: the decode kernel's layout exactly
        return paged_decode_attention(q, key_cache, value_cache, block_table, seq_lens, k_scale, v_scale,
                                      scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    p = PagedPrefillProblem(q.shape[1], key_cache.shape[2], q.shape[2], key_cache.shape[1], q.dtype,
                            key_cache.dtype, q.device)
    cand = PAGED_PREFILL.select(p, force="reference" if reference_forced() else None)
    return cand.run(p, q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale, k_scale, v_scale,
                    sliding_window, soft_cap, max_query_len=max_query_len)


# --------------------------------------------------------------------------------------------------- tuning
def tuning_space(p: PagedPrefillProblem) -> list[KernelConfig]:
    """Query-tile rows × KV-tile width × warps × stages × head-dim halves × page addressing (× the int8 word
    path × int8 q·kᵀ). The store keys configs by model shape only, and a sequence's programs never read another
    sequence, so any winner keeps outputs batch-invariant."""
    from itertools import product

    configs = []
    # WORDS (int8 caches): the decode kernel's word-at-a-time conversion. D_SPLIT 2 (head dim ≥ 128): q, K, V and
    # the accumulator in halves (sm_90a: int8 64×128 tiles spill ~400 B with the whole head dim, ~250 B in halves;
    # fp16 128×64 / 8 warps: 904 → 727 instructions per tile, 228 → 172 registers)
    # PAGE_ADDR: page offsets by a 32-bit wide multiply (sm_90a, int8 64×128 / 4 warps with WORDS 1888 → 1684
    # instructions per tile, spills 388 → 252 B; fp16 128×64 / 8 warps in halves 684 → 591)
    # QK_INT8 (int8 caches): K from the cache straight into int8 MMAs, q in two int8 parts (paged_decode); the
    # score tile then takes an int → float conversion (sm_90a, 64×128 / 4 warps with WORDS: 1672 → 1760
    # instructions per masked tile, spills 228 → 116 B; timed 4-8 % faster on three of four H100 cases, NOTES.md)
    # FRESH_COPY (int8 caches): fresh prompts by a second launch over their dequantized rows
    int8_options = (0, 1) if p.kv_dtype == torch.int8 else (0,)
    for bm, bn, warps, stages, words, d_split, page, qk_int8, fresh in product(
            (64, 128), (32, 64, 128), (4, 8), (2, 3, 4), int8_options,
            (1, 2) if p.head_dim >= 128 else (1,), (0, 1), int8_options, int8_options):
        # shared memory, ≤ ~200 KB of an H100's 227: the Q tile + `stages` K and V tiles as cached, and for int8
        # caches one converted (fp16) K and V tile (sm_90a: the shipped int8 64×128 / 3 stages takes 84 KB)
        kv_bytes = 1 if p.kv_dtype == torch.int8 else 2
        smem = bm * p.head_dim * 2 + stages * 2 * bn * p.head_dim * kv_bytes
        smem += 2 * bn * p.head_dim * 2 if p.kv_dtype == torch.int8 else 0
        if smem > 200 * 1024 or (bm == 128 and warps == 4 and p.head_dim > 128):
            continue
        extra = (("D_SPLIT", 2),) if d_split == 2 else ()
        extra += (("PAGE_ADDR", 1),) if page else ()
        extra += (("QK_INT8", 1),) if qk_int8 else ()
        extra += (("WORDS", 1),) if words else ()
        extra += (("FRESH_COPY", 1),) if fresh else ()
        configs.append(KernelConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=p.head_dim, num_warps=warps, num_stages=stages,
                                    extra=extra))
    return configs


TUNE_CASES = ((1, 4096, 0), (4, 1024, 0), (1, 512, 3584))  # (batch, new tokens, cached prefix)


def tune(num_q_heads: int, num_kv_heads: int, head_dim: int, *, block_size: int = 16, kv_dtype=torch.int8,
         dtype=torch.float16, cases=TUNE_CASES, device="cuda", store=None, bench=None, configs=None):
    """Warm-up step: time ``tuning_space`` (or ``configs``) on the sum of ``cases`` (shuffled block tables),
    check each config against the heuristic config's output (relative error ≤ 1e-3), record the fastest.
    Returns (best config, {config: µs})."""
    from ..testing import relative_error
    from ..tuning import tune_kernel

    device = torch.device(device)
    p = PagedPrefillProblem(num_q_heads, num_kv_heads, head_dim, block_size, dtype, kv_dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = []  # prefill is compute-bound: one input set (its K/V re-reads come from L2 in real use too)
    for batch, new, prefix in cases:
        L = new + prefix
        blocks = -(-L // block_size)
        nb = batch * blocks
        table = torch.randperm(nb, device=device, generator=gen).reshape(batch, blocks).to(torch.int32)
        lens = torch.full((batch,), L, dtype=torch.int32, device=device)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=device) * new
        q = torch.randn(batch * new, num_q_heads, head_dim, device=device, generator=gen).to(dtype)
        shape = (nb, block_size, num_kv_heads, head_dim)
        kc, vc, ks, vs = random_kv_caches(shape, kv_dtype, device, gen)
        inputs.append((q, kc, vc, table, lens, qsl, head_dim ** -0.5, ks, vs))

    def make_call(cfg):
        return lambda: [launch_paged_varlen(*args, cfg=cfg) for args in inputs]

    baseline = make_call(heuristic_config(p))()

    def check(outs):
        for out, ref in zip(outs, baseline):
            err = relative_error(out, ref)
            if not err <= 1e-3:
                raise ValueError(f"relative error {err} vs the default config")

    return tune_kernel(store or default_store(), KERNEL_NAME, p.key(), configs or tuning_space(p), make_call,
                       device, check=check, bench=bench)
