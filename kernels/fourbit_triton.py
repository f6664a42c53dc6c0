"""Triton kernels for NF4/FP4 weights in bitsandbytes' layout (imports triton: load lazily).

The weight W has shape (N, K) (out, in) and is flattened row-major; block ``b`` holds
elements ``[b * BS, (b + 1) * BS)`` and one absmax. With ``K % BS == 0`` (required by the
launchers) block ``n * (K // BS) + g`` is row n, columns ``[g * BS, (g + 1) * BS)``, so its
``BS // 2`` packed bytes are contiguous and byte j holds column ``g * BS + 2j`` in the high
nibble and ``g * BS + 2j + 1`` in the low one. Every kernel walks K in whole quantization
blocks, one absmax per (row, block), and decodes a byte's two codes with one 8-byte load
from a 256-entry table of value pairs (built from the 16-entry quant_map by the launcher).

Double-quantized statistics (NESTED) are decoded where they are used:
``absmax = nested_map[code] * nested_absmax[block // NESTED_BS] + offset``.

The same functions run on the GPU through jax-triton and on torch CPU tensors under
``TRITON_INTERPRET=1`` (the CI tests).
"""

import triton
import triton.language as tl


@triton.jit
def _block_absmax(absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, blk, mask,
                  NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
    """float32 absmax of blocks ``blk`` (decoding double quantization in place)."""
    if NESTED:
        code = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + blk // NESTED_BS, mask=mask, other=0.0)
        return tl.load(nested_map_ptr + code) * scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _decode_pairs(code_pairs_ptr, raw, ROWS: tl.constexpr, BS: tl.constexpr):
    """[ROWS, BS] float32 code values of [ROWS, BS // 2] packed bytes, in column order.

    ``code_pairs`` is a (256, 2) float32 table: entry b holds the values of the high and
    the low nibble of byte b, so one 8-byte load decodes two weights.
    """
    pair = tl.arange(0, 2)
    values = tl.load(code_pairs_ptr + (raw.to(tl.int32) * 2)[:, :, None] + pair[None, None, :])
    return tl.reshape(values, [ROWS, BS])


@triton.jit
def fourbit_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_pairs_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, out_ptr,
    N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
    BN: tl.constexpr, SPLIT_K: tl.constexpr, GROUP: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """out = x @ W.T for one row x (M == 1) with CUDA-core FMAs; bytes are read once.

    Grid: (cdiv(N, BN), SPLIT_K). Program (i, s) owns rows ``[i*BN, (i+1)*BN)`` of W and
    the s-th slice of its quantization blocks, GROUP blocks per step; with SPLIT_K > 1 it
    writes float32 partial sums ``out[s, n]`` that the launcher adds up (with the bias).
    """
    HB: tl.constexpr = BS // 2
    KB: tl.constexpr = K // BS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    # The launcher picks SPLIT_K dividing KB (and GROUP dividing the slice), so every
    # split has PER_SPLIT blocks, walked GROUP blocks (contiguous bytes per row) a step.
    PER_SPLIT: tl.constexpr = KB // SPLIT_K
    offs_j = tl.arange(0, GROUP * HB)
    offs_k = tl.arange(0, GROUP * BS)
    offs_g = tl.arange(0, GROUP)
    STEPS: tl.constexpr = PER_SPLIT // GROUP
    acc = tl.zeros([BN], dtype=tl.float32)
    # Software pipelining by hand (Triton pipelines only loops that feed a dot): the bytes
    # and absmax of step s + 1 are requested before step s is decoded.
    first = offs_n * KB + pid_k * PER_SPLIT
    # Bytes are widened to int32 on arrival: a loop-carried uint8 tensor is repacked into
    # bytes and unpacked again every step.
    raw = tl.load(packed_ptr + first[:, None] * HB + offs_j[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
    scale = _block_absmax(absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                          first[:, None] + offs_g[None, :], n_mask[:, None], NESTED, NESTED_BS)
    for step in range(STEPS):
        g = pid_k * PER_SPLIT + step * GROUP
        more = n_mask & (step + 1 < STEPS)
        following = first + (step + 1) * GROUP
        raw_next = tl.load(packed_ptr + following[:, None] * HB + offs_j[None, :], mask=more[:, None], other=0)
        raw_next = raw_next.to(tl.int32)
        scale_next = _block_absmax(absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                                   following[:, None] + offs_g[None, :], more[:, None], NESTED, NESTED_BS)
        w = _decode_pairs(code_pairs_ptr, raw, BN, GROUP * BS)
        x = tl.load(x_ptr + g * BS + offs_k).to(tl.float32)
        # absmax is constant over a block: scale each block's dot product once.
        part = tl.sum(tl.reshape(x[None, :] * w, [BN, GROUP, BS]), axis=2)
        acc += tl.sum(part * scale, axis=1)
        raw = raw_next
        scale = scale_next
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(out_ptr + pid_k * N + offs_n, acc, mask=n_mask)


@triton.jit
def fourbit_gemm_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_pairs_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, out_ptr,
    M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out = x @ W.T with tensor cores, dequantizing each W tile in registers.

    Grid: (cdiv(M, BM), cdiv(N, BN), SPLIT_K); the M tiles vary fastest so the programs
    sharing a W tile run together and W comes from DRAM about once. Each step decodes one
    quantization block per row (codes scaled by absmax in float32 and rounded to the
    activation dtype, as the reference does) and issues one dot over it.
    """
    HB: tl.constexpr = BS // 2
    KB: tl.constexpr = K // BS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_j = tl.arange(0, HB)
    offs_k = tl.arange(0, BS)
    # The launcher picks SPLIT_K dividing KB, so every split has PER_SPLIT blocks.
    PER_SPLIT: tl.constexpr = KB // SPLIT_K
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for step in range(PER_SPLIT):
        g = pid_k * PER_SPLIT + step
        blk = offs_n * KB + g
        raw = tl.load(packed_ptr + blk[:, None] * HB + offs_j[None, :], mask=n_mask[:, None], other=0)
        scale = _block_absmax(absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, blk, n_mask,
                              NESTED, NESTED_BS)
        w = (_decode_pairs(code_pairs_ptr, raw, BN, BS) * scale[:, None]).to(x_ptr.dtype.element_ty)
        x = tl.load(x_ptr + offs_m[:, None] * K + (g * BS + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)


@triton.jit
def fourbit_grad_input_kernel(
    g_ptr, packed_ptr, absmax_ptr, code_pairs_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
    out_ptr,
    M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BS: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = G @ W (the input gradient of y = x @ W.T), G (M, N), out (M, K).

    Grid: (cdiv(M, BM), K // BS). Program (i, g) owns rows ``[i*BM, (i+1)*BM)`` and the
    K columns of quantization block g, and walks N in steps of BN. Absmax varies along
    the reduction (N), so W is scaled before the dot.
    """
    HB: tl.constexpr = BS // 2
    KB: tl.constexpr = K // BS
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    offs_j = tl.arange(0, HB)
    offs_k = tl.arange(0, BS)
    acc = tl.zeros([BM, BS], dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        n_mask = offs_n < N
        blk = offs_n * KB + g
        raw = tl.load(packed_ptr + blk[:, None] * HB + offs_j[None, :], mask=n_mask[:, None], other=0)
        scale = _block_absmax(absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, blk, n_mask,
                              NESTED, NESTED_BS)
        w = (_decode_pairs(code_pairs_ptr, raw, BN, BS) * scale[:, None]).to(g_ptr.dtype.element_ty)
        grad = tl.load(g_ptr + offs_m[:, None] * N + offs_n[None, :],
                       mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(grad, w, acc, input_precision=PRECISION)
    out_rows = out_ptr + offs_m[:, None] * K + (g * BS + offs_k)[None, :]
    tl.store(out_rows, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
