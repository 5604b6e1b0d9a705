"""w4a16: y = x · Wᵀ with W [N, K] stored as group-wise int4 (the ``ifq_int4`` mode's GEMM).

Weight layout (specified in ``reference/int4.py``): ``qweight [K // 8, N]`` int32 (8 consecutive K rows per word,
low nibble first, unsigned 0..15), ``scales [K // group, N]``, optional ``zeros [K // group, N]`` uint8
(asymmetric; symmetric means q − 8), optional act-order ``perm [K]`` (the op reads ``x[..., perm]``).

Candidates (``ANGEL_KERNELS_FORCE_W4A16`` / ``ANGEL_KERNELS_DISABLE=w4a16.<name>``):
- ``dequant_matmul``: dequantize the weight to x.dtype once per call, then cuBLAS. Meant for large M, where the
  GEMM is compute-bound and the ~6 extra bytes of traffic per weight (write and re-read an fp16 copy, nibble
  planes) are a small fraction.
- ``tiled``: Triton tiled GEMM that loads packed int4 tiles and dequantizes in registers: one scale (and zero)
  row per K-block (``BLOCK_K <= group_size``), ``(q − z) · s`` in x.dtype, fp32 accumulation in the MMA chain.
  Swap-AB tiles as w8a16 (weight rows on the MMA's M side: 64 rows feed wgmma even for one token, and the
  dequantized tile is K-minor, the A operand's order, which wgmma takes from registers) and a deterministic
  split-K chosen from N, K and the group size (never from M) when N alone cannot fill the GPU.
- ``reference``: the fp32 pure-torch reference (CPU path).

Dequantization in the tiled kernel (two constexpr switches, both in the tuned config's ``extra``):
- ``MAGIC=1``: build fp16 values without an int→float conversion: OR the nibble into the mantissa of 0x6400
  (fp16 1024.0, ulp 1), bitcast, subtract 1024 + z. For bf16 the constant is 0x4300 (bf16 128.0, 7-bit mantissa,
  ulp 1: 128 + 0..31 is exact). Asymmetric weights add 16 − z to the integer lane first, so the float subtract
  is one constant for every column (the compiler then pairs it, and the scale multiply, into f16x2 / bf16x2
  ops). ``MAGIC=0`` converts each nibble with a plain cast (the same values, bit for bit).
  A plain Triton GEMV that converts per element reaches only ~50 % of the int4 bandwidth floor on an H100
  (ANCHORS.md): the int→float conversions cost more than the halved bytes save.
- ``INTERLEAVE=1``: load each packed word once ([BLOCK_N, BLOCK_K // 8] tile) and work on two nibbles per 32-bit
  op (mask 0x000F000F takes nibbles j and j + 4 into the two 16-bit lanes, OR 0x64006400 makes both fp16), then
  rebuild the [BLOCK_N, BLOCK_K] tile with three levels of ``tl.join`` and a reshape (join puts the new axis
  last, so the tile is built K-minor: the swap-AB A operand as is). ``INTERLEAVE=0`` loads a [BLOCK_N, BLOCK_K]
  tile of words (each word read 8 times and staged as int32: 4 bytes of shared memory per weight) and shifts
  each element by 4 · (k mod 8): simple, but heavy on shared memory and load instructions.
  Compiled for sm_90 with Triton 3.9 (PTX read, not run): MAGIC=1 INTERLEAVE=1 has no int→float conversion and
  only f16x2 / bf16x2 math in its dequantization (per 2 weights: shift, and, add, or, one packed sub and mul)
  and feeds wgmma's A operand from registers after one shared-memory pass; MAGIC=0 has one cvt per weight.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .._checks import ACT_DTYPES, check_same_device, check_shape, check_tensor
from .._registry import register_op
from ._splitk import (
    collect_tile, plan_split, split_k_on, tile_rows_and_tokens, with_decode_dot_t_choices, with_dot_t_choices,
    with_serial_choices,
)
from ._weight_only import weight_only_family
from ..dispatch import KernelFamily
from ..reference.int4 import INT4_PACK, w4a16_gemm_ref
from ..runtime import interpreter_active, reference_forced
from ..tuning import KernelConfig, default_store, m_bucket

KERNEL_NAME = "w4a16.tiled"
GROUP_SIZES = (32, 64, 128)  # plus channel-wise: group_size == K (or −1)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest K-block: a K-block never straddles a scale group, so BLOCK_K = min(group, 128); channel-wise uses 128
# with a masked K tail. It depends on the group size only, never on M (batch invariance).
MAX_BLOCK_K = 128


@dataclass(frozen=True)
class W4A16Problem:
    M: int
    N: int
    K: int
    group_size: int  # K for channel-wise
    dtype: torch.dtype
    device: torch.device

    def key(self) -> str:
        return f"N={self.N},K={self.K},G={self.group_size},M={m_bucket(self.M)}"


def block_k_for(group_size: int) -> int:
    """The one BLOCK_K every M uses for this group size (a K-block stays inside one scale group)."""
    return min(group_size, MAX_BLOCK_K) if group_size in GROUP_SIZES else MAX_BLOCK_K


@triton.jit
def _dequant_gather(w, shifts, zc, off, s, MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr, DT: tl.constexpr,
                    CT: tl.constexpr):
    """Words w [BLOCK_N, BLOCK_K] (column k holds word k // 8) → dequantized [BLOCK_N, BLOCK_K] in CT."""
    nib = (w >> shifts) & 0xF
    if MAGIC:
        v = ((nib + (zc & 0xFFFF)) | (MAGIC_BITS & 0xFFFF)).to(tl.int16).to(DT, bitcast=True).to(CT)
    else:
        v = nib.to(CT)
    return (v - off) * s


@triton.jit
def _dequant_pair(w, j: tl.constexpr, zc, off, s, MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr, DT: tl.constexpr,
                  CT: tl.constexpr):
    """Nibbles j and j + 4 of each word of w [BN, R] → two dequantized [BN, R] tensors, two nibbles per 32-bit op."""
    if MAGIC:
        t = (((w >> (4 * j)) & 0x000F000F) + zc) | MAGIC_BITS  # nibble j → low 16-bit lane, j + 4 → high lane
        lo = t.to(tl.int16).to(DT, bitcast=True).to(CT)
        hi = (t >> 16).to(tl.int16).to(DT, bitcast=True).to(CT)
    else:
        lo = ((w >> (4 * j)) & 0xF).to(CT)
        hi = ((w >> (4 * j + 16)) & 0xF).to(CT)
    # subtract and scale while both halves still sit in one 32-bit word: the compiler pairs them (f16x2 ops)
    return (lo - off) * s, (hi - off) * s


def _word_dequant_ptx(bf16: bool, zeros: bool, row_pair_scales: bool = False) -> str:
    """PTX for one word: 8 nibbles → 8 values (q − z) · s in fp16/bf16, two per 32-bit op: 3 shifts, 4 LOP3
    (AND the lane masks, OR the magic bits; asymmetric adds zc first), 4 packed subtracts, 4 packed multiplies.
    Operands: $0…$7 the values of nibbles 0…7, $8 the word, $9 zc, $10 the scale, $11 the offset to subtract.
    The same operations as the Triton path below, rounded the same way (the products are exact in fp32, so one
    rounding either way), which the compiler does not schedule as tightly (~3 instructions per weight, SASS).

    ``row_pair_scales`` (fragment-major words, symmetric): the nibble pairs (0, 4), (2, 6) take the scale of row
    r0, (1, 5), (3, 7) that of r0 + 8; operands $9 / $10 those scales, the offset (base + 8) an immediate. In fp16
    the odd pairs are masked in place (0x00F0: 1024 + 16 q) and brought to q − 8 by one fma (· 1/16 − 72, exact),
    so one shift per word instead of three: 13 instructions, the same values (bf16's 0x4300 magic has no room for
    16 q below its exponent, so it keeps the shifts)."""
    ty = "bf16x2" if bf16 else "f16x2"
    magic = "0x43004300" if bf16 else "0x64006400"
    if row_pair_scales and zeros:
        raise ValueError("row-pair scales serve symmetric weights only")
    if row_pair_scales and not bf16:
        lines = [".reg .b32 t0, t1, t2, t3, q8, c, c16, sixteenth, sa, sb;", "mov.b32 c, 0x64086408;",
                 "mov.b32 c16, 0xD480D480;", "mov.b32 sixteenth, 0x2C002C00;",  # -72, 1/16
                 "mov.b32 sa, {$9, $9};", "mov.b32 sb, {$10, $10};", "shr.u32 q8, $8, 8;",
                 f"lop3.b32 t0, $8, 0x000F000F, {magic}, 0xEA;", f"lop3.b32 t1, $8, 0x00F000F0, {magic}, 0xEA;",
                 f"lop3.b32 t2, q8, 0x000F000F, {magic}, 0xEA;", f"lop3.b32 t3, q8, 0x00F000F0, {magic}, 0xEA;",
                 "sub.f16x2 t0, t0, c;", "fma.rn.f16x2 t1, t1, sixteenth, c16;", "sub.f16x2 t2, t2, c;",
                 "fma.rn.f16x2 t3, t3, sixteenth, c16;"]
        for j in range(4):
            lines += [f"mul.f16x2 t{j}, t{j}, {'sa' if j % 2 == 0 else 'sb'};", f"mov.b32 {{${j}, ${j + 4}}}, t{j};"]
        return "{\n" + "\n".join(lines) + "\n}"
    if row_pair_scales:
        off = "0x43084308" if bf16 else "0x64086408"  # bf16 136 / fp16 1032: the magic base + 8
        lines = [".reg .b32 t0, t1, t2, t3, c, sa, sb;", f"mov.b32 c, {off};", "mov.b32 sa, {$9, $9};",
                 "mov.b32 sb, {$10, $10};"]
    else:
        lines = [".reg .b32 t<4>, c, s2;", "mov.b32 c, {$11, $11};", "mov.b32 s2, {$10, $10};"]
    for j in range(4):
        src = "$8" if j == 0 else f"t{j}"
        if j:
            lines.append(f"shr.u32 t{j}, $8, {4 * j};")
        if zeros:
            lines += [f"and.b32 t{j}, {src}, 0x000F000F;", f"add.u32 t{j}, t{j}, $9;", f"or.b32 t{j}, t{j}, {magic};"]
        else:
            lines.append(f"lop3.b32 t{j}, {src}, 0x000F000F, {magic}, 0xEA;")  # (a & b) | c
        scale = ("sa" if j % 2 == 0 else "sb") if row_pair_scales else "s2"
        lines += [f"sub.{ty} t{j}, t{j}, c;", f"mul.{ty} t{j}, t{j}, {scale};", f"mov.b32 {{${j}, ${j + 4}}}, t{j};"]
    return "{\n" + "\n".join(lines) + "\n}"


_PTX_F16 = tl.constexpr(_word_dequant_ptx(False, False))
_PTX_F16_ZEROS = tl.constexpr(_word_dequant_ptx(False, True))
_PTX_BF16 = tl.constexpr(_word_dequant_ptx(True, False))
_PTX_BF16_ZEROS = tl.constexpr(_word_dequant_ptx(True, True))


@triton.jit
def _dequant_word_asm(w, zc, s, off, BF16: tl.constexpr, HAS_ZEROS: tl.constexpr):
    if BF16:
        return tl.inline_asm_elementwise(
            asm=_PTX_BF16_ZEROS if HAS_ZEROS else _PTX_BF16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,h,h",
            args=[w, zc, s, off], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1,
        )
    else:
        return tl.inline_asm_elementwise(
            asm=_PTX_F16_ZEROS if HAS_ZEROS else _PTX_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,h,h",
            args=[w, zc, s, off], dtype=(tl.float16,) * 8, is_pure=True, pack=1,
        )


@triton.jit
def _dequant_interleaved(w, zc, off, s, MAGIC: tl.constexpr, MAGIC_BITS: tl.constexpr, DT: tl.constexpr,
                         CT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr = False,
                         HAS_ZEROS: tl.constexpr = False):
    """Words w [BLOCK_N, BLOCK_K // 8] (each loaded once) → dequantized [BLOCK_N, BLOCK_K] in CT, K-minor."""
    if ASM:  # MAGIC with x.dtype arithmetic on a GPU: the PTX above
        lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = _dequant_word_asm(w, zc, s, off, DT == tl.bfloat16, HAS_ZEROS)
    else:
        lo0, hi0 = _dequant_pair(w, 0, zc, off, s, MAGIC, MAGIC_BITS, DT, CT)
        lo1, hi1 = _dequant_pair(w, 1, zc, off, s, MAGIC, MAGIC_BITS, DT, CT)
        lo2, hi2 = _dequant_pair(w, 2, zc, off, s, MAGIC, MAGIC_BITS, DT, CT)
        lo3, hi3 = _dequant_pair(w, 3, zc, off, s, MAGIC, MAGIC_BITS, DT, CT)
    # join appends an axis of 2; after three joins [BN, R, a, b, c] holds nibble 4a + 2b + c, so the row-major
    # reshape puts nibble j of word r at column 8r + j.
    t = tl.join(tl.join(tl.join(lo0, hi0), tl.join(lo2, hi2)), tl.join(tl.join(lo1, hi1), tl.join(lo3, hi3)))
    return tl.reshape(t, (BLOCK_N, BLOCK_K))


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, scale_ptr, zero_ptr, perm_ptr, bias_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, K_PER_SPLIT, group_size,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_ym, stride_yn,
    HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BF16: tl.constexpr,  # activations are bf16 (selects the magic constant)
    DOT_FP32: tl.constexpr,  # the interpreter's bf16 dot is wrong: compute the dot in fp32 there
    MAGIC: tl.constexpr, INTERLEAVE: tl.constexpr, SPLIT_K: tl.constexpr,
    SERIAL: tl.constexpr,  # SPLIT_K > 1: one program per tile sums the split ranges itself
    DOT_T: tl.constexpr,  # tokens on the MMA's M side, the dequantized weight from shared memory (batches)
    ASM: tl.constexpr,  # MAGIC + INTERLEAVE on a GPU: dequantize each word with the PTX of _word_dequant_ptx
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks on the weight and x tiles
    GROUP: tl.constexpr,  # the group size as a constant (0: channel-wise, one scale row): no division per K-block
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Swap-AB tile: acc[BLOCK_N, BLOCK_M] = W[n-tile, :] · X[m-tile, :]ᵀ, as w8a16.

    The dequantized weight rows are the MMA's M side (≥ 64 rows feed Hopper's wgmma even for one token, and the
    tile comes out of the unpacking K-minor, as the A operand wants it) and the tokens its N side. With
    SPLIT_K > 1 each program writes an fp32 partial; the last of a tile's SPLIT_K programs to finish (an acq_rel
    counter) sums the partials in split order 0, 1, … (deterministic), applies the epilogue, resets the counter.
    """
    pid_k = tl.program_id(1)
    offs_n, offs_m, mask_n, mask_m, tile = tile_rows_and_tokens(M, N, BLOCK_M, BLOCK_N, GROUP_N)
    # SERIAL: one program sums the split ranges in order, as reduce_split_k does (w8a16's SERIAL)
    acc = _w4a16_k_range(
        x_ptr, qw_ptr, scale_ptr, zero_ptr, perm_ptr, offs_n, offs_m, mask_n, mask_m,
        0 if SERIAL else pid_k * K_PER_SPLIT, K, K_PER_SPLIT, group_size, stride_xm, stride_xk, stride_qk, stride_qn,
        stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZEROS, HAS_PERM, BF16, DOT_FP32, MAGIC, INTERLEAVE, ASM, EVEN,
        GROUP, DOT_T, BLOCK_M, BLOCK_N, BLOCK_K)
    if SERIAL:
        for s in range(1, SPLIT_K):
            acc += _w4a16_k_range(
                x_ptr, qw_ptr, scale_ptr, zero_ptr, perm_ptr, offs_n, offs_m, mask_n, mask_m, s * K_PER_SPLIT, K,
                K_PER_SPLIT, group_size, stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg,
                stride_zn, HAS_ZEROS, HAS_PERM, BF16, DOT_FP32, MAGIC, INTERLEAVE, ASM, EVEN, GROUP, DOT_T, BLOCK_M,
                BLOCK_N, BLOCK_K)
    acc, writes = collect_tile(acc, part_ptr, count_ptr, tile, pid_k, offs_n, offs_m, mask_n, mask_m, M, N,
                               SPLIT_K, SERIAL, DOT_T)
    if writes:
        _w4a16_epilogue(acc, bias_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _w4a16_k_range(
    x_ptr, qw_ptr, scale_ptr, zero_ptr, perm_ptr, offs_n, offs_m, mask_n, mask_m, k_start, K, K_PER_SPLIT,
    group_size, stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, BF16: tl.constexpr, DOT_FP32: tl.constexpr,
    MAGIC: tl.constexpr, INTERLEAVE: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr, GROUP: tl.constexpr,
    DOT_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc [BLOCK_N, BLOCK_M] ([BLOCK_M, BLOCK_N] with DOT_T) over the K-blocks of [k_start, min(K, k_start +
    K_PER_SPLIT)), from zero. k_start is a multiple of BLOCK_K, so every K-block stays inside one scale group.
    DOT_T: the MMA computes accᵀ = x · wᵀ with the dequantized weight from shared memory (see w8a16)."""
    DT: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    # (q − z) · s is computed in x.dtype (CT = DT); the interpreter's bf16 casts and arithmetic are wrong, so
    # there it is computed in fp32 (the values are the same; only the bf16 rounding of the weight is skipped).
    CT: tl.constexpr = tl.float32 if (DOT_FP32 and BF16) else DT
    # Magic numbers: 0x6400 is fp16 1024.0 and 0x4300 bf16 128.0, both with an ulp of 1, so OR-ing a value
    # 0..31 into the mantissa gives base + value exactly; twice per int32 word (two 16-bit lanes).
    MAGIC_BITS: tl.constexpr = 0x43004300 if BF16 else 0x64006400
    BASE: tl.constexpr = (128.0 if BF16 else 1024.0) if MAGIC else 0.0
    ZERO_BIAS: tl.constexpr = 16  # keeps 16 + q − z >= 0 for zeros up to 16
    BLOCK_R: tl.constexpr = BLOCK_K // 8  # packed word rows per K-block

    offs_k = tl.arange(0, BLOCK_K)
    # int64 row offsets: M·K and M·N can exceed 2^31 elements for long prefills of wide layers.
    x_cols = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # [1, BLOCK_M]
    if INTERLEAVE:
        offs_r = tl.arange(0, BLOCK_R)
        qw_ptrs = qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn + (k_start // 8 + offs_r)[None, :] * stride_qk
    else:
        qw_ptrs = qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn + ((k_start + offs_k) // 8)[None, :] * stride_qk
        shifts = ((offs_k % 8) * 4)[None, :]
    s_ptrs = scale_ptr + offs_n * stride_sn
    z_ptrs = zero_ptr + offs_n * stride_zn

    if DOT_T:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, min(K, k_start + K_PER_SPLIT), BLOCK_K):
        mask_k = offs_k < K - k0  # only channel-wise K has a tail; K is a multiple of 8
        if EVEN:
            mask_k = tl.full((BLOCK_K,), 1, tl.int1)
        if HAS_PERM:  # act-order: packed row k pairs with x column perm[k]
            cols = tl.load(perm_ptr + k0 + offs_k, mask=mask_k, other=0).to(tl.int64)
        else:
            cols = k0 + offs_k
        x = tl.load(x_cols + cols[:, None] * stride_xk, mask=mask_k[:, None] & mask_m[None, :], other=0.0)  # [BK, BM]
        # BLOCK_K <= group_size and divides it: the whole K-block shares one scale (and zero) row.
        if GROUP:  # (a Python int under the interpreter: widen through an int64 zero)
            g = (tl.full((), 0, tl.int64) + k0) // GROUP
        else:
            g = (k0 // group_size).to(tl.int64)
        s = tl.load(s_ptrs + g * stride_sg, mask=mask_n, other=0.0).to(CT)
        # MAGIC: zc = 16 − z is added to each 16-bit lane before the magic bits are OR-ed in, so the lane reads
        # base + 16 + q − z (0..31 above the base: exact) and one constant `off` = base + 16 remains to subtract.
        # (q − z) is an exact small integer in fp16/bf16: the weight suffers one rounding, by the scale.
        if HAS_ZEROS:
            z = tl.load(z_ptrs + g * stride_zg, mask=mask_n, other=0).to(tl.int32)
            if MAGIC:
                zc = (ZERO_BIAS - z) * 0x00010001
                off = tl.full((BLOCK_N,), BASE + ZERO_BIAS, CT)
            else:
                zc = z
                off = z.to(CT)
        else:
            zc = tl.full((BLOCK_N,), 0, tl.int32)
            off = tl.full((BLOCK_N,), BASE + 8.0, CT)
        if INTERLEAVE:
            if EVEN:
                w = tl.load(qw_ptrs)
            else:
                w = tl.load(qw_ptrs, mask=mask_n[:, None] & (offs_r < (K - k0) // 8)[None, :], other=0)
            a = _dequant_interleaved(w, zc[:, None], off[:, None], s[:, None], MAGIC, MAGIC_BITS, DT, CT,
                                     BLOCK_N, BLOCK_K, ASM and MAGIC and CT == DT, HAS_ZEROS)
        else:
            w = tl.load(qw_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
            a = _dequant_gather(w, shifts, zc[:, None], off[:, None], s[:, None], MAGIC, MAGIC_BITS, DT, CT)
        # Accumulate inside the MMA chain: K-blocks are summed in the same order whatever BLOCK_M is.
        if DOT_FP32:
            a = a.to(tl.float32)
            x = x.to(tl.float32)
        if DOT_T:
            acc = tl.dot(tl.trans(x), tl.trans(a), acc)
        else:
            acc = tl.dot(a, x, acc)
        qw_ptrs += BLOCK_R * stride_qk

    return acc


@triton.jit
def _w4a16_epilogue(acc, bias_ptr, y_ptr, offs_n, offs_m, mask_n, mask_m, stride_ym, stride_yn,
                    HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def _modes(magic: int = 1, interleave: int = 1, group_n: int = 8, ptx: int = 1) -> tuple[tuple[str, int], ...]:
    modes = (("GROUP_N", group_n), ("INTERLEAVE", interleave), ("MAGIC", magic))
    return modes if ptx else modes + (("PTX", 0),)  # PTX=1 is the default (stored configs do not name it)


def interpreter_config(group_size: int) -> KernelConfig:
    """Under the interpreter cost grows with programs × K-steps: few, large blocks keep CPU tests fast."""
    return KernelConfig(32, 64, block_k_for(group_size), num_warps=4, num_stages=1, extra=_modes())


def heuristic_config(p: W4A16Problem) -> KernelConfig:
    """Untuned default by M regime (used when the store has no entry for this GPU and shape)."""
    bk = block_k_for(p.group_size)
    if p.M <= 16:  # 64 weight rows: the smallest wgmma M side; split-K fills the GPU when N is small
        return KernelConfig(16, 64, bk, num_warps=4, num_stages=4, extra=_modes(group_n=1))
    if p.M <= 32:
        return KernelConfig(32, 64, bk, num_warps=4, num_stages=4, extra=_modes())
    if p.M <= 64:
        return KernelConfig(64, 128, bk, num_warps=4, num_stages=4, extra=_modes())
    return KernelConfig(128, 128, bk, num_warps=8, num_stages=3, extra=_modes())


def config_for(p: W4A16Problem) -> KernelConfig:
    if interpreter_active() and p.device.type == "cpu":
        return interpreter_config(p.group_size)
    return default_store().lookup(KERNEL_NAME, p.key(), p.device) or heuristic_config(p)


def launch_tiled(
    x2: torch.Tensor,
    qweight,
    scales,
    zeros,
    group_size: int,
    bias,
    perm,
    cfg: KernelConfig,
    split_k: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x2 [M, K] → y [M, N] with the Triton kernel and an explicit config (group_size: K for channel-wise).

    Split-K from N, K and BLOCK_K unless given; ``out`` (tests): an [M, N] buffer of x.dtype to write into.
    """
    M, K = x2.shape
    N = qweight.shape[1]
    if group_size != K and group_size % cfg.BLOCK_K:  # channel-wise (one scale row) takes any BLOCK_K
        raise ValueError(f"BLOCK_K={cfg.BLOCK_K} must divide group_size={group_size}: a K-block needs one scale row")
    # Splits are counted in the group's K-blocks (block_k_for) whatever the config's K-block, when it divides
    # them (as w8a16: the same chain of k16 MMA steps, the same split ranges).
    split_block = block_k_for(group_size) if block_k_for(group_size) % cfg.BLOCK_K == 0 else cfg.BLOCK_K
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device) if out is None else out
    num_tiles = triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N)
    meta = {"GROUP_N": 8, "MAGIC": 1, "INTERLEAVE": 1, **cfg.meta()}
    ptx = meta.pop("PTX", 1)
    plan = plan_split(x2.device, "w4a16", M, N, K, split_block, num_tiles, y, split_k, meta.pop("SERIAL", None))
    # DOT_T needs 16-element-aligned rows and 16-byte-aligned data: Triton 3.6 aborts compiling the transposed
    # tile otherwise ("Illegal shared layout", sm_90a, N = 1000 or 1016). The swap-AB tile of the same config runs
    # in its place (its rows are DOT_T's at 4 warps, a GPU test; the tuner's batch-invariance check times and
    # checks whichever tile runs).
    aligned = all(t is None or (t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0)
                  for t in (x2, qweight, scales, zeros, y))
    dot_t = bool(meta.pop("DOT_T", 0)) and aligned
    _w4a16_gemm_kernel[(num_tiles, plan.grid_k)](
        x2, qweight, scales,
        zeros if zeros is not None else qweight, perm if perm is not None else qweight,
        bias if bias is not None else scales, y, plan.partials, plan.counters,
        M, N, K, plan.k_per_split, group_size,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0) if zeros is not None else 0, zeros.stride(1) if zeros is not None else 0,
        y.stride(0), y.stride(1),
        HAS_ZEROS=zeros is not None, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
        BF16=x2.dtype == torch.bfloat16,
        DOT_FP32=x2.device.type == "cpu",
        SPLIT_K=plan.split_k, SERIAL=plan.serial, DOT_T=dot_t,
        ASM=bool(ptx) and x2.device.type == "cuda",
        EVEN=M > 0 and N % cfg.BLOCK_N == 0 and K % cfg.BLOCK_K == 0,
        GROUP=group_size if group_size in GROUP_SIZES else 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **meta,
    )
    return y


def _run_tiled(p, x2, qweight, scales, zeros, bias, perm):
    return launch_tiled(x2, qweight, scales, zeros, p.group_size, bias, perm, config_for(p))


@triton.jit
def _dequant_int4_kernel(q_ptr, s_ptr, z_ptr, w_ptr, KW, N, GROUP_SIZE, HAS_ZEROS: tl.constexpr,
                         BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Wᵀ [K, N] (contiguous, w_ptr's dtype) from qweight [K // 8, N] in one pass: 0.5 byte read, 2 written."""
    offs_kw = tl.program_id(0) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_kw[:, None] < KW) & (offs_n[None, :] < N)
    words = tl.load(q_ptr + offs_kw[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask, other=0)
    for j in tl.static_range(8):
        k = offs_kw * 8 + j
        g_offs = (k // GROUP_SIZE)[:, None].to(tl.int64) * N + offs_n[None, :]
        v = ((words >> (4 * j)) & 0xF).to(tl.float32)
        if HAS_ZEROS:
            v -= tl.load(z_ptr + g_offs, mask=mask, other=0).to(tl.float32)
        else:
            v -= 8.0
        # (q − z) is exact; the product of two 11-bit (fp16) or 8-bit (bf16) significands is exact in fp32,
        # so the one rounding is the store's: bit-identical to torch's x.dtype multiply
        scale = tl.load(s_ptr + g_offs, mask=mask, other=0.0).to(w_ptr.dtype.element_ty).to(tl.float32)
        tl.store(w_ptr + k[:, None].to(tl.int64) * N + offs_n[None, :], (v * scale).to(w_ptr.dtype.element_ty),
                 mask=mask)


def dequantize_packed(qweight, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Wᵀ [K, N] in ``dtype`` in packed row order: (q − z) exact, then one rounding by the scale (as the kernel)."""
    kw, n = qweight.shape
    if qweight.device.type == "cuda" or interpreter_active():
        w = torch.empty((kw * INT4_PACK, n), dtype=dtype, device=qweight.device)
        grid = (triton.cdiv(kw, 16), triton.cdiv(n, 128))
        qweight, scales = qweight.contiguous(), scales.contiguous()
        zeros = zeros.contiguous() if zeros is not None else None
        _dequant_int4_kernel[grid](qweight, scales, zeros if zeros is not None else scales, w, kw, n, group_size,
                                   HAS_ZEROS=zeros is not None, BLOCK_KW=16, BLOCK_N=128)
        return w
    w = torch.empty((kw, INT4_PACK, n), dtype=dtype, device=qweight.device)
    for j in range(INT4_PACK):  # one nibble plane at a time: scratch stays at K/8 × N int32
        w[:, j, :] = (qweight >> (4 * j)) & 0xF
    w = w.view(-1, group_size, n)  # [K // group, group, N]
    w -= zeros.to(dtype)[:, None, :] if zeros is not None else 8
    w *= scales.to(dtype)[:, None, :]
    return w.view(kw * INT4_PACK, n)


def _run_dequant_matmul(p, x2, qweight, scales, zeros, bias, perm):
    w = dequantize_packed(qweight, scales, zeros, p.group_size, x2.dtype)
    if perm is not None:
        x2 = x2.index_select(1, perm)
    # addmm adds the bias in the GEMM epilogue: one rounding to x.dtype instead of two
    return torch.addmm(bias, x2, w) if bias is not None else x2 @ w


def _run_reference(p, x2, qweight, scales, zeros, bias, perm):
    return w4a16_gemm_ref(x2, qweight, scales, zeros, p.group_size, bias, perm)


W4A16: KernelFamily[W4A16Problem] = weight_only_family(
    "w4a16",
    dequant_matmul=_run_dequant_matmul,
    tiled=_run_tiled,
    reference=_run_reference,
    problem_key=lambda p: (p.N, p.K, p.group_size, m_bucket(p.M), p.dtype, p.device.type),
)


def _validate(x, qweight, scales, zeros, group_size, bias, perm) -> int:
    """Checks every input; returns the effective group size (K for channel-wise)."""
    check_tensor("x", x, dtypes=ACT_DTYPES)
    check_tensor("qweight", qweight, dtypes=(torch.int32,), dim=2)
    check_tensor("scales", scales, dtypes=SCALE_DTYPES, dim=2)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    k, n = x.shape[-1], qweight.shape[1]
    if k % INT4_PACK:
        raise ValueError(f"K={k} must be a multiple of 8 (8 int4 values per int32 word of qweight [K // 8, N])")
    if qweight.shape[0] * INT4_PACK != k:
        raise ValueError(f"x has K={k} but qweight [K // 8, N] has {qweight.shape[0]} rows (K={qweight.shape[0] * INT4_PACK})")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    g = k if group_size in (-1, k) else group_size
    if g not in GROUP_SIZES and g != k:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, or -1 / K for channel-wise; got {group_size}")
    if k % g:
        raise ValueError(f"K={k} is not a multiple of group_size={g}")
    check_shape("scales", scales, (k // g, n))
    if zeros is not None:
        check_tensor("zeros", zeros, dtypes=(torch.uint8,), dim=2)
        check_shape("zeros", zeros, (k // g, n))
    if bias is not None:
        check_tensor("bias", bias, dtypes=(x.dtype,), dim=1)
        check_shape("bias", bias, (n,))
    if perm is not None:
        check_tensor("perm", perm, dtypes=(torch.int32,), dim=1)
        check_shape("perm", perm, (k,))
    check_same_device(x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias, perm=perm)
    return g


def _w4a16_fake(x, qweight, scales, zeros=None, group_size=128, bias=None, perm=None):
    _validate(x, qweight, scales, zeros, group_size, bias, perm)
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def _samples(device):
    from ..quantization.int4 import quantize_weight_int4

    g = torch.Generator(device="cpu").manual_seed(0)
    cases = (  # (m, n, k), dtype, group, sym, bias, act-order
        ((3, 48, 64), torch.float16, 32, True, False, False),
        ((1, 32, 128), torch.bfloat16, 64, False, True, False),
        ((2, 16, 64), torch.float16, -1, False, False, True),
    )
    for (m, n, k), dtype, group, sym, with_bias, act_order in cases:
        x = torch.randn(m, k, generator=g).to(dtype).to(device)
        w = quantize_weight_int4((torch.randn(n, k, generator=g) * 0.05).to(dtype), group, sym=sym)
        b = torch.randn(n, generator=g).to(dtype).to(device) if with_bias else None
        perm = torch.randperm(k, generator=g).to(torch.int32).to(device) if act_order else None
        zeros = w.zeros.to(device) if w.zeros is not None else None
        yield (x, w.qweight.to(device), w.scales.to(device), zeros, group, b, perm), {}


@register_op("w4a16_gemm", fake=_w4a16_fake, samples=_samples)
def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor] = None,
    group_size: int = 128,
    bias: Optional[torch.Tensor] = None,
    perm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] · Wᵀ (+ bias [N]) with W in our int4 layout; x fp16/bf16, y in x.dtype.

    qweight [K // 8, N] int32; scales [K // group_size, N] fp16/bf16/fp32; zeros [K // group_size, N] uint8 or
    None (symmetric, q − 8); group_size 32/64/128, or −1 (or K) for channel-wise; perm [K] int32 or None
    (act-order: packed row k multiplies x[..., perm[k]]). ``Int4Weight`` fields map one to one.
    Kernel chosen by ``W4A16`` (see module doc). Registered as ``torch.ops.angel_kernels.w4a16_gemm``.
    """
    g = _validate(x, qweight, scales, zeros, group_size, bias, perm)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    p = W4A16Problem(x2.shape[0], qweight.shape[1], x.shape[-1], g, x.dtype, x.device)
    if p.M == 0:
        return x.new_empty((*lead, p.N))
    cand = W4A16.select(p, force="reference" if reference_forced() else None)
    y = cand.run(p, x2, qweight, scales, zeros, bias, perm)
    return y.reshape(*lead, p.N)


def tuning_space(p: W4A16Problem) -> list[KernelConfig]:
    """Configs worth timing for a problem's M regime (pruned for shared memory and scale groups before timing).

    BLOCK_K is the group's K-block (DOT_T tiles also half of it) and split-K comes from the weight shape (batch
    invariance); token tiles follow the M bucket, weight tiles start at 64 rows (wgmma's M side).
    """
    from itertools import product

    from ..tuning import prune_configs

    bk = block_k_for(p.group_size)
    # (MAGIC, INTERLEAVE): the gather mode (each word loaded 8 times) never won a tuning run; the benchmarks time
    # the plain MAGIC=0 control
    modes = ((1, 1),)
    token_tiles = {32: (16, 32), 64: (32, 64), 128: (64, 128)}.get(m_bucket(p.M), (128, 256))
    if p.M <= 16:
        token_tiles = (16,)  # the smallest MMA N tile (buckets 1-8 would otherwise fall through to 128/256)
    if p.M <= 16:  # weight streaming: deep pipelines keep bytes in flight
        space = product(token_tiles, (64, 128), (4,), (3, 4, 5, 6), (1,), modes)
    else:
        space = product(token_tiles, (64, 128, 256), (4, 8), (2, 3, 4), (8,), modes)
    configs = [
        KernelConfig(bm, bn, bk, num_warps=w, num_stages=s, extra=_modes(magic, inter, gn))
        for bm, bn, w, s, gn, (magic, inter) in space
    ]
    if p.M <= 16:
        configs = with_decode_dot_t_choices(configs)
    if p.M > 16:  # batches: the split ranges in one program (SERIAL) or the split launch, where K is split
        configs = with_serial_choices(configs, split_k_on(p.device, "w4a16", p.N, p.K, bk))
        configs = with_dot_t_choices(configs)
    group = p.group_size if p.group_size in GROUP_SIZES else None  # channel-wise: one scale row, any BLOCK_K
    kept = []
    for cfg in configs:
        # INTERLEAVE=0 stages its [BLOCK_N, BLOCK_K] tile of words as int32: 4 bytes of shared memory per weight
        b_bytes = 0.5 if dict(cfg.extra)["INTERLEAVE"] else 4
        kept += prune_configs([cfg], K=p.K, a_bytes=p.dtype.itemsize, b_bytes=b_bytes, group_size=group)
    return kept


def tune(
    n: int,
    k: int,
    m: int,
    *,
    group_size: int = 128,
    sym: bool = True,
    device="cuda",
    dtype=torch.float16,
    store=None,
    invariant_with: Optional[KernelConfig] = None,
    bench=None,
    space=None,
) -> tuple[KernelConfig, dict]:
    """Warm-up step: time ``tuning_space`` (or ``space(configs)``, a filter of it) for one (N, K, group, M bucket),
    check each result, record the fastest.

    ``invariant_with``: a config for M=1; a candidate config is then admitted only if rows 0 and M-1 of its
    output equal, bitwise, the M=1 config's output for those rows alone (batch invariance).
    Each config is timed over rotating input sets (together over twice the L2 size: a 4096×4096 int4 weight is
    8.4 MB, so 13 sets on H100's 50 MB; one 28672×4096 weight, 59 MB, needs 2); set 0 is the checked one.
    ``bench(calls) -> µs`` defaults to CUDA-graph replay over the sets (see ``tune_kernel``).
    Returns the winner and every admitted config's time.
    """
    from functools import partial

    from ..quantization.int4 import quantize_weight_int4
    from ..testing import relative_error
    from ..tuning import l2_bytes, rotation_count, tune_kernel

    device = torch.device(device)
    g = k if group_size == -1 else group_size
    p = W4A16Problem(m_bucket(m), n, k, g, dtype, device)
    gen = torch.Generator(device=device).manual_seed(0)

    def make_set():
        x = torch.randn(p.M, k, device=device, generator=gen).to(dtype)
        w = quantize_weight_int4(torch.randn(n, k, device=device, generator=gen).to(dtype) * 0.05, group_size,
                                 sym=sym)
        return x, w

    sets = [make_set()]
    x, w = sets[0]
    set_bytes = sum(t.numel() * t.element_size() for t in (x, w.qweight, w.scales, w.zeros) if t is not None)
    sets += [make_set() for _ in range(1, rotation_count(set_bytes, l2_bytes(device)))]
    ref = w4a16_gemm_ref(x, w.qweight, w.scales, w.zeros, g)
    rows = sorted({0, p.M - 1})
    singles = None
    if invariant_with is not None:
        singles = [launch_tiled(x[i : i + 1], w.qweight, w.scales, w.zeros, g, None, None, invariant_with) for i in rows]

    def check(y):
        err = relative_error(y, ref)
        if not err < 1e-2:
            raise ValueError(f"relative error {err}")
        if singles is not None:
            for i, single in zip(rows, singles):
                if not torch.equal(y[i : i + 1], single):
                    raise ValueError(f"row {i} differs from its M=1 result")

    return tune_kernel(
        store or default_store(), KERNEL_NAME, p.key(), space(tuning_space(p)) if space else tuning_space(p),
        lambda cfg: [partial(launch_tiled, xs, ws.qweight, ws.scales, ws.zeros, g, None, None, cfg)
                     for xs, ws in sets],
        device, check=check, bench=bench,
    )
