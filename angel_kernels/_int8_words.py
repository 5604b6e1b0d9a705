"""int8 → fp16 / bf16 a 32-bit word (4 values) at a time, for the kernels that read int8 tiles (w8a16 weights, the
int8 KV cache): load the tile as int32 words [R, C // 4], convert, get [R, C] back with byte j of word c at column
4c + j. Exact for every int8 value.

Why: loaded as int8, a tile's conversion is hoisted by the compiler into the MMA operand layout, where each
thread holds 2-byte pairs (w8a16, 64×128 K-block, sm_90a SASS: 32 two-byte shared-memory loads and ~160 byte
permutes, 409 instructions per K-block). As words, the tile is converted in the load layout (16-byte loads) and
moved to the MMA layout as fp16 (16-byte stores, ldmatrix): 259. With u = b + 128 (XOR 0x80 per byte), 0..255:
- fp16: PRMT puts two bytes under the high byte 0x64 (fp16 0x64XX = 1024 + XX, exact), one f16x2 subtract of
  1152 per pair: 5 instructions per 4 values.
- bf16 (7-bit mantissa: no exponent holds 256 consecutive integers): PRMT builds fp32 0x4B0000XX = 2^23 + XX,
  subtract 2^23 + 128, pack pairs to bf16x2 (exact: an int8 has at most 8 significant bits, and the one value
  that needs 8, −128, is a power of two): 11 per 4 values.
"""
import triton
import triton.language as tl

_WORD_TO_F16 = tl.constexpr("""{
    .reg .b32 u, c, lo, hi;
    xor.b32 u, $4, 0x80808080;
    mov.b32 c, 0x64806480;
    prmt.b32 lo, u, 0x64646464, 0x4140;
    prmt.b32 hi, u, 0x64646464, 0x4342;
    sub.f16x2 lo, lo, c;
    sub.f16x2 hi, hi, c;
    mov.b32 {$0, $1}, lo;
    mov.b32 {$2, $3}, hi;
}""")
_WORD_TO_BF16 = tl.constexpr("""{
    .reg .b32 u, f0, f1, f2, f3, lo, hi;
    xor.b32 u, $4, 0x80808080;
    prmt.b32 f0, u, 0x4B000000, 0x7540;
    prmt.b32 f1, u, 0x4B000000, 0x7541;
    prmt.b32 f2, u, 0x4B000000, 0x7542;
    prmt.b32 f3, u, 0x4B000000, 0x7543;
    sub.f32 f0, f0, 0f4B000080;
    sub.f32 f1, f1, 0f4B000080;
    sub.f32 f2, f2, 0f4B000080;
    sub.f32 f3, f3, 0f4B000080;
    cvt.rn.bf16x2.f32 lo, f1, f0;
    cvt.rn.bf16x2.f32 hi, f3, f2;
    mov.b32 {$0, $1}, lo;
    mov.b32 {$2, $3}, hi;
}""")


@triton.jit
def int8_words_to_float(w, BF16: tl.constexpr, ASM: tl.constexpr, FP32: tl.constexpr, ROWS: tl.constexpr,
                        COLS: tl.constexpr):
    """w [ROWS, COLS // 4] int32 words → [ROWS, COLS] fp16 / bf16 (fp32 if FP32), byte j of word c at column
    4c + j. ASM: the PTX above; otherwise the same values with Triton integer ops (the interpreter)."""
    DT: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    if ASM and BF16:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(
            asm=_WORD_TO_BF16, constraints="=h,=h,=h,=h,r", args=[w],
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=1,
        )
    elif ASM:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(
            asm=_WORD_TO_F16, constraints="=h,=h,=h,=h,r", args=[w],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1,
        )
    else:
        b0 = _byte_to_float(w, 0, FP32, DT)
        b1 = _byte_to_float(w, 1, FP32, DT)
        b2 = _byte_to_float(w, 2, FP32, DT)
        b3 = _byte_to_float(w, 3, FP32, DT)
    # join appends an axis of 2: [.., r, i, j] holds byte 2i + j, so the row-major reshape puts it at 4r + 2i + j
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (ROWS, COLS))


@triton.jit
def _byte_to_float(w, j: tl.constexpr, FP32: tl.constexpr, DT: tl.constexpr):
    u = ((w >> (8 * j)) & 0xFF) ^ 0x80  # b + 128
    v = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + u − (2^23 + 128) = b, exact
    return v if FP32 else v.to(DT)


@triton.jit
def mma_operand_fence(x):
    """x unchanged, behind a side-effecting PTX move (ptxas removes the move). Triton picks an MMA operand's
    register layout (kWidth) from the narrowest load it finds walking back through pure element-wise ops, and
    halves it again for every join: a tile converted from int8 words comes out as if loaded 8 bits wide
    (kWidth 4), which for the fp16 P·V product of decode attention costs register moves around every HMMA.
    The walk stops here, so the product gets the 16-bit layout (kWidth 2)."""
    return tl.inline_asm_elementwise(asm="mov.b32 $0, $1;", constraints="=r,r", args=[x], dtype=x.dtype,
                                     is_pure=False, pack=2)
