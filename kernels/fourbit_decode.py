"""Register decode of packed 4-bit codes into scaled float16/bfloat16 weights (Triton helpers).

Why not a table load per weight: a gather from a code table costs a load-unit instruction and
its address arithmetic for every weight, which made the earlier kernels instruction-bound at
about a third of the card's bandwidth. Here the 16-entry table lives in eight 32-bit
registers, split into byte planes: ``hi_j`` holds the high bytes of entries 4j..4j+3 of the
table (in the compute dtype), ``lo_j`` their low bytes. PTX ``prmt`` picks bytes out of a
register pair by 3-bit selectors, so one ``prmt`` looks up four codes among eight entries;
three of them (entries 0-7, entries 8-15, then a pick by bit 3 of each code) look up one
plane, and a fourth interleaves the planes into two 16-bit values per register. Each decoded
pair of weights is then scaled by its block's absmax with one packed half-precision multiply
(``fma.rn.{bf16x2,f16x2}`` with -0.0 added, which is exact: sm_80+ has it for both types), as
bitsandbytes' own kernels scale in the compute dtype.

A packed 32-bit word holds the 8 codes of 4 bytes; byte ``b`` has the code of column ``2b``
in its high nibble and of column ``2b + 1`` in its low one. :func:`decode_words` returns four
int32 tensors; tensor ``b`` holds columns ``2b`` (low half) and ``2b + 1`` (high half) as
16-bit values.

Triton's interpreter cannot run inline assembly, so with ``USE_ASM=False`` the same lookup is
done with integer arithmetic on the same byte planes, and the scaling in float32 followed by
one rounding (exact products of two 16-bit floats, so the result is bit-identical to the
packed fma). The CPU tests run that path; the GPU tests run the assembly.
"""

import triton
import triton.language as tl


def _plane_lookup(first: int) -> str:
    """PTX looking up 4 codes in both byte planes (operands $first.. high, $first+4.. low).

    Selectors in registers s (low 3 bits of each code) and t (lane + 4 * bit 3); results in
    hr (high bytes) and mr (low bytes) of the 4 lanes.
    """
    h, l = first, first + 4
    return (f"prmt.b32 a, ${h}, ${h + 1}, s;\nprmt.b32 b, ${h + 2}, ${h + 3}, s;\nprmt.b32 hr, a, b, t;\n"
            f"prmt.b32 a, ${l}, ${l + 1}, s;\nprmt.b32 b, ${l + 2}, ${l + 3}, s;\nprmt.b32 mr, a, b, t;\n")


# Operands: $0-$3 the four scaled pairs (outputs), $4 the packed word, $5 the block's scale
# as two copies of a 16-bit float, $6-$9 the high-byte planes, $10-$13 the low-byte planes.
# Outputs are written last: LLVM may give an output the register of an input.
# s: per code, its low 3 bits (the byte among 8 entries); t: per code, lane i + 4 * bit 3 (pick
# lane i of the entries-0-7 result or of the entries-8-15 result). prmt reads the low 16 bits
# of its selector (4 codes), so the second half of the word shifts both down by 16.
# 0x4051 / 0x6273 interleave the planes: (low byte, high byte) of column 2b, then of 2b + 1.
_LOOKUP_ASM = """
{
.reg .b32 w, s, t, a, b, hr, mr, q0, q1, q2, q3, nz;
mov.b32 w, $4;
mov.b32 nz, 0x80008000;
and.b32 s, w, 0x77777777;
shr.u32 t, w, 1;
and.b32 t, t, 0x44444444;
or.b32 t, t, 0x32103210;
""" + _plane_lookup(6) + """prmt.b32 q0, mr, hr, 0x4051;
prmt.b32 q1, mr, hr, 0x6273;
shr.u32 s, s, 16;
shr.u32 t, t, 16;
""" + _plane_lookup(6) + """prmt.b32 q2, mr, hr, 0x4051;
prmt.b32 q3, mr, hr, 0x6273;
fma.rn.TYPE q0, q0, $5, nz;
fma.rn.TYPE q1, q1, $5, nz;
fma.rn.TYPE q2, q2, $5, nz;
fma.rn.TYPE q3, q3, $5, nz;
mov.b32 $0, q0;
mov.b32 $1, q1;
mov.b32 $2, q2;
mov.b32 $3, q3;
}
"""
LOOKUP_ASM_BF16 = tl.constexpr(_LOOKUP_ASM.replace("TYPE", "bf16x2"))
LOOKUP_ASM_F16 = tl.constexpr(_LOOKUP_ASM.replace("TYPE", "f16x2"))


@triton.jit
def _plane_word(byte, idx, word: tl.constexpr):
    """The 4 bytes ``byte[4*word : 4*word + 4]`` packed little-endian into one int32."""
    return tl.sum(tl.where(idx // 4 == word, byte << ((idx % 4) * 8), 0))


@triton.jit
def table_planes(quant_map_ptr, DTYPE: tl.constexpr):
    """The 16-entry code table rounded to DTYPE, as 8 int32 byte planes.

    Returns:
      (hi_0, hi_1, hi_2, hi_3, lo_0, lo_1, lo_2, lo_3): ``hi_j`` packs the high bytes of
      entries 4j..4j+3, ``lo_j`` their low bytes.
    """
    idx = tl.arange(0, 16)
    values = tl.load(quant_map_ptr + idx)
    if DTYPE == tl.bfloat16:
        # Round to nearest even on the bits: Triton's interpreter truncates float32 -> bfloat16,
        # and the CPU tests should see the table the GPU sees.
        f32 = values.to(tl.int32, bitcast=True)
        bits = ((f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16) & 0xFFFF
    else:
        bits = values.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = bits >> 8
    lo = bits & 0xFF
    return (_plane_word(hi, idx, 0), _plane_word(hi, idx, 1), _plane_word(hi, idx, 2), _plane_word(hi, idx, 3),
            _plane_word(lo, idx, 0), _plane_word(lo, idx, 1), _plane_word(lo, idx, 2), _plane_word(lo, idx, 3))


@triton.jit
def _lookup(code, h0, h1, h2, h3, l0, l1, l2, l3):
    """16-bit table value of each code (0..15), from the byte planes (portable path)."""
    word = code >> 2
    shift = (code & 3) * 8
    hi = tl.where(word == 0, h0, tl.where(word == 1, h1, tl.where(word == 2, h2, h3)))
    lo = tl.where(word == 0, l0, tl.where(word == 1, l1, tl.where(word == 2, l2, l3)))
    return (((hi >> shift) & 0xFF) << 8) | ((lo >> shift) & 0xFF)


@triton.jit
def _pair(words, byte: tl.constexpr, h0, h1, h2, h3, l0, l1, l2, l3):
    """int32 holding columns 2*byte (low half) and 2*byte + 1 (high half) of each word."""
    high_nibble = (words >> (8 * byte + 4)) & 15
    low_nibble = (words >> (8 * byte)) & 15
    return (_lookup(high_nibble, h0, h1, h2, h3, l0, l1, l2, l3)
            | (_lookup(low_nibble, h0, h1, h2, h3, l0, l1, l2, l3) << 16))


@triton.jit
def _portable_pairs(words, planes):
    """The four int32 pairs of each word (as the assembly's $0-$3, unscaled) without inline asm."""
    h0, h1, h2, h3, l0, l1, l2, l3 = planes
    return (_pair(words, 0, h0, h1, h2, h3, l0, l1, l2, l3), _pair(words, 1, h0, h1, h2, h3, l0, l1, l2, l3),
            _pair(words, 2, h0, h1, h2, h3, l0, l1, l2, l3), _pair(words, 3, h0, h1, h2, h3, l0, l1, l2, l3))


@triton.jit
def _in_column_order(p0, p1, p2, p3, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """[ROWS, WORDS] pairs of bytes 0..3 of each word -> [ROWS, WORDS * 4] in byte order.

    ``tl.join`` adds a new last axis, so join(join(p0, p2), join(p1, p3)) has p0, p1, p2, p3
    at [..., 0, 0], [..., 0, 1], [..., 1, 0], [..., 1, 1].
    """
    return tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), [ROWS, WORDS * 4])


@triton.jit
def _halves(pairs, DTYPE: tl.constexpr):
    """[..., P] int32 pairs -> [..., P, 2] DTYPE (low half first)."""
    low = pairs.to(tl.int16).to(DTYPE, bitcast=True)
    high = (pairs >> 16).to(tl.int16).to(DTYPE, bitcast=True)
    return tl.join(low, high)


@triton.jit
def decode_scaled(words, scale, planes, ROWS: tl.constexpr, WORDS: tl.constexpr, DTYPE: tl.constexpr,
                  USE_ASM: tl.constexpr):
    """Dequantized weights ``code value * absmax`` of one quantization block per row, in DTYPE.

    Args:
      words: [ROWS, WORDS] int32 packed codes (WORDS * 8 columns of one block per row).
      scale: [ROWS] float32 absmax of each row's block.
      planes: the 8 byte planes of :func:`table_planes` (same DTYPE).
      DTYPE: tl.float16 or tl.bfloat16.
      USE_ASM: prmt lookup in inline PTX (GPU) or the portable integer path (interpreter).

    Returns:
      [ROWS, WORDS * 8] DTYPE tensor in column order.
    """
    h0, h1, h2, h3, l0, l1, l2, l3 = planes
    scale_dt = scale.to(DTYPE)
    if USE_ASM:
        bits = scale_dt.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        scale2 = (bits | (bits << 16))[:, None]
        if DTYPE == tl.bfloat16:
            asm: tl.constexpr = LOOKUP_ASM_BF16
        else:
            asm: tl.constexpr = LOOKUP_ASM_F16
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            asm, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [words, scale2, h0, h1, h2, h3, l0, l1, l2, l3],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        pairs = _in_column_order(p0, p1, p2, p3, ROWS, WORDS)
        return tl.reshape(_halves(pairs, DTYPE), [ROWS, WORDS * 8])
    else:
        p0, p1, p2, p3 = _portable_pairs(words, planes)
        pairs = _in_column_order(p0, p1, p2, p3, ROWS, WORDS)
        values = tl.reshape(_halves(pairs, DTYPE), [ROWS, WORDS * 8]).to(tl.float32)
        # Products of two 16-bit floats are exact in float32: one rounding, as the packed fma does.
        return (values * scale_dt.to(tl.float32)[:, None]).to(DTYPE)




# One word's dot product with 8 float32 activations: $0 = sum over its 8 columns of
# (code value in bfloat16, as float32) * x. $1 the word, $2-$9 x of columns 0..7 of the word,
# $10-$13 / $14-$17 the high / low byte planes. Shifts that can run on the FMA pipe are
# written as multiplies (the integer pipe is the bottleneck).
_DOT_ASM = """
{
.reg .b32 w, s, t, a, b, hr, mr, q, lo, hi;
.reg .f32 acc;
mov.b32 w, $1;
and.b32 s, w, 0x77777777;
mul.hi.u32 t, w, 0x80000000;
and.b32 t, t, 0x44444444;
or.b32 t, t, 0x32103210;
""" + _plane_lookup(10) + """prmt.b32 q, mr, hr, 0x4051;
mul.lo.u32 lo, q, 65536;
and.b32 hi, q, 0xFFFF0000;
mul.rn.f32 acc, lo, $2;
fma.rn.f32 acc, hi, $3, acc;
prmt.b32 q, mr, hr, 0x6273;
mul.lo.u32 lo, q, 65536;
and.b32 hi, q, 0xFFFF0000;
fma.rn.f32 acc, lo, $4, acc;
fma.rn.f32 acc, hi, $5, acc;
mul.hi.u32 s, s, 65536;
mul.hi.u32 t, t, 65536;
""" + _plane_lookup(10) + """prmt.b32 q, mr, hr, 0x4051;
mul.lo.u32 lo, q, 65536;
and.b32 hi, q, 0xFFFF0000;
fma.rn.f32 acc, lo, $6, acc;
fma.rn.f32 acc, hi, $7, acc;
prmt.b32 q, mr, hr, 0x6273;
mul.lo.u32 lo, q, 65536;
and.b32 hi, q, 0xFFFF0000;
fma.rn.f32 acc, lo, $8, acc;
fma.rn.f32 acc, hi, $9, acc;
mov.b32 $0, acc;
}
"""
DOT_ASM = tl.constexpr(_DOT_ASM)


@triton.jit
def word_dot(words, x0, x1, x2, x3, x4, x5, x6, x7, planes, USE_ASM: tl.constexpr):
    """Per word: sum over its 8 columns of (bfloat16 code value) * x, in float32.

    ``planes`` must be bfloat16 planes (the values are widened to float32 by a shift).
    """
    h0, h1, h2, h3, l0, l1, l2, l3 = planes
    if USE_ASM:
        return tl.inline_asm_elementwise(
            DOT_ASM, "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [words, x0, x1, x2, x3, x4, x5, x6, x7, h0, h1, h2, h3, l0, l1, l2, l3],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        p0, p1, p2, p3 = _portable_pairs(words, planes)
        acc = (p0 << 16).to(tl.float32, bitcast=True) * x0 + (p0 & -65536).to(tl.float32, bitcast=True) * x1
        acc += (p1 << 16).to(tl.float32, bitcast=True) * x2 + (p1 & -65536).to(tl.float32, bitcast=True) * x3
        acc += (p2 << 16).to(tl.float32, bitcast=True) * x4 + (p2 & -65536).to(tl.float32, bitcast=True) * x5
        acc += (p3 << 16).to(tl.float32, bitcast=True) * x6 + (p3 & -65536).to(tl.float32, bitcast=True) * x7
        return acc
