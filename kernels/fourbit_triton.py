"""Triton kernels for NF4/FP4 weights in bitsandbytes' layout (imports triton: load lazily).

The weight W has shape (N, K) (out, in) and is flattened row-major; block ``b`` holds
elements ``[b * BS, (b + 1) * BS)`` and one absmax. With ``K % BS == 0`` (required by the
launchers) block ``n * (K // BS) + g`` is row n, columns ``[g * BS, (g + 1) * BS)``, so its
``BS // 2`` packed bytes are contiguous and byte j holds column ``g * BS + 2j`` in the high
nibble and ``g * BS + 2j + 1`` in the low one.

Two families:

- float16/bfloat16 activations, register decode (``fourbit_decode``): the code table is
  held in registers and packed int32 words are decoded with ``prmt`` byte permutes.
  :func:`fourbit_word_gemv_kernel` (one row of x, CUDA-core FMAs) and
  :func:`fourbit_matmul_kernel` (tensor cores, any number of rows).
- float32 activations (exact decode) and the input gradient: every weight's value is loaded
  from the (16,) float32 quant_map (two loads per packed byte, L1-resident).
  :func:`fourbit_gemv_kernel`, :func:`fourbit_gemm_kernel`, :func:`fourbit_grad_input_kernel`.

Double-quantized statistics (NESTED) are decoded where they are used:
``absmax = nested_map[code] * nested_absmax[block // NESTED_BS] + offset``.

Argument order (``qflax_kernels.launch``): array inputs, runtime scalars (``M``), outputs
(``out``, then for split-K the float32 ``partial`` sums and the zeroed per-tile ``counter``),
constexprs. The same functions run on the GPU (JAX: ``triton_call``; torch: ``torch_launch``) and on torch CPU tensors under
``TRITON_INTERPRET=1`` (the CI tests; there the register-decode kernels take their portable
path, ``USE_ASM=False``, as the interpreter cannot run inline assembly).
"""

import triton
import triton.language as tl

from qflax_kernels import fourbit_decode


@triton.jit
def _block_absmax(absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, blk, mask,
                  NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
    """float32 absmax of blocks ``blk`` (decoding double quantization in place); ``mask`` may be None."""
    if NESTED:
        if mask is None:
            code = tl.load(absmax_ptr + blk).to(tl.int32)
            scale = tl.load(nested_absmax_ptr + blk // NESTED_BS)
        else:
            code = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale = tl.load(nested_absmax_ptr + blk // NESTED_BS, mask=mask, other=0.0)
        return tl.load(nested_map_ptr + code) * scale + tl.load(offset_ptr)
    elif mask is None:
        return tl.load(absmax_ptr + blk)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _decode_table(quant_map_ptr, raw, ROWS: tl.constexpr, BS: tl.constexpr):
    """[ROWS, BS] float32 code values of [ROWS, BS // 2] packed bytes, in column order.

    Two loads from the (16,) float32 quant_map per byte (high nibble, then low nibble): the
    table is 64 bytes and stays in L1, and no per-call table has to be built for the kernel.
    """
    raw = raw.to(tl.int32)
    high = tl.load(quant_map_ptr + (raw >> 4))
    low = tl.load(quant_map_ptr + (raw & 15))
    return tl.reshape(tl.join(high, low), [ROWS, BS])


@triton.jit
def _store_result(total, out_ptr, offsets, mask, bias):
    tl.store(out_ptr + offsets, (total + bias).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(acc, out_ptr, partial_ptr, counter_ptr, offsets, mask, bias, tile, pid_k, size,
            SPLIT_K: tl.constexpr):
    """Stores ``acc + bias`` at ``out_ptr + offsets``; with SPLIT_K > 1 reduces the splits first.

    Split-K stays inside the kernel (no reduction op after it): each program of a tile writes its
    float32 partial sums to ``partial_ptr[pid_k]`` (``size`` elements per split), then counts
    itself in on the tile's zero-initialised counter; the last one to arrive adds the SPLIT_K
    partials in split order (deterministic), adds the bias and writes the output.
    """
    if SPLIT_K == 1:
        _store_result(acc, out_ptr, offsets, mask, bias)
    else:
        tl.store(partial_ptr + pid_k * size + offsets, acc, mask=mask)
        # Every thread's partials are written before one thread publishes them (release) and
        # the last program reads them back from L2 (acquire, .cg loads bypass L1).
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.load(partial_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            for split in tl.static_range(1, SPLIT_K):
                total += tl.load(partial_ptr + split * size + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            _store_result(total, out_ptr, offsets, mask, bias)


@triton.jit
def fourbit_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, quant_map_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, out_ptr, partial_ptr, counter_ptr,
    N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
    BN: tl.constexpr, SPLIT_K: tl.constexpr, GROUP: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """out = x @ W.T for one row x (M == 1) with CUDA-core FMAs; bytes are read once.

    Grid: (cdiv(N, BN), SPLIT_K). Program (i, s) owns rows ``[i*BN, (i+1)*BN)`` of W and
    the s-th slice of its quantization blocks, GROUP blocks per step; the splits of a tile are
    added up in the kernel (:func:`_finish`).
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
        w = _decode_table(quant_map_ptr, raw, BN, GROUP * BS)
        x = tl.load(x_ptr + g * BS + offs_k).to(tl.float32)
        # absmax is constant over a block: scale each block's dot product once.
        part = tl.sum(tl.reshape(x[None, :] * w, [BN, GROUP, BS]), axis=2)
        acc += tl.sum(part * scale, axis=1)
        raw = raw_next
        scale = scale_next
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    _finish(acc, out_ptr, partial_ptr, counter_ptr, offs_n, n_mask, bias, pid_n, pid_k, N, SPLIT_K)


@triton.jit
def fourbit_gemm_kernel(
    x_ptr, packed_ptr, absmax_ptr, quant_map_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, M, out_ptr, partial_ptr, counter_ptr,
    N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
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
        w = (_decode_table(quant_map_ptr, raw, BN, BS) * scale[:, None]).to(x_ptr.dtype.element_ty)
        x = tl.load(x_ptr + offs_m[:, None] * K + (g * BS + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _finish(acc, out_ptr, partial_ptr, counter_ptr, offs_m[:, None] * N + offs_n[None, :],
            m_mask[:, None] & n_mask[None, :], bias, pid_m + pid_n * tl.num_programs(0), pid_k, M * N, SPLIT_K)


@triton.jit
def fourbit_grad_input_kernel(
    g_ptr, packed_ptr, absmax_ptr, quant_map_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
    M, out_ptr,
    N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
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
        w = (_decode_table(quant_map_ptr, raw, BN, BS) * scale[:, None]).to(g_ptr.dtype.element_ty)
        grad = tl.load(g_ptr + offs_m[:, None] * N + offs_n[None, :],
                       mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(grad, w, acc, input_precision=PRECISION)
    out_rows = out_ptr + offs_m[:, None] * K + (g * BS + offs_k)[None, :]
    tl.store(out_rows, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def fourbit_matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, quant_map_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, M, out_ptr, partial_ptr, counter_ptr,
    N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
):
    """out = x @ W.T for float16/bfloat16 x, W decoded in registers (``fourbit_decode``).

    The W tile is the dot's first operand and x's rows the second, so the tensor cores'
    M dimension is filled by weight rows even when x has one row (its tile is padded with
    masked rows to BM >= 16). Each step reads BK columns (BK // BS whole quantization
    blocks) of BN weight rows as int32 words; Triton's pipeliner keeps ``num_stages`` steps
    of loads in flight.

    Grid: (cdiv(M, BM), cdiv(N, BN), SPLIT_K); the M tiles vary fastest, so programs that
    share a W tile run together and W comes from DRAM about once. The splits of a tile are
    added up in the kernel (:func:`_finish`).
    """
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    planes = fourbit_decode.table_planes(quant_map_ptr, DTYPE)
    WPB: tl.constexpr = BS // 8  # int32 words per quantization block
    GROUPS: tl.constexpr = BK // BS
    KB: tl.constexpr = K // BS
    # The launcher picks SPLIT_K and BK so every split has STEPS whole steps.
    STEPS: tl.constexpr = KB // GROUPS // SPLIT_K
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_w = tl.arange(0, WPB)
    offs_k = tl.arange(0, BS)
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for step in range(STEPS):
        # One dot per quantization block: 2-D tiles whose absmax is one value per row,
        # so the decode runs in the layout the words were loaded in.
        for group in tl.static_range(GROUPS):
            block = (pid_k * STEPS + step) * GROUPS + group
            blk = offs_n * KB + block
            words = tl.load(words_ptr + blk[:, None] * WPB + offs_w[None, :], mask=n_mask[:, None], other=0)
            scale = _block_absmax(absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, blk, n_mask,
                                  NESTED, NESTED_BS)
            w = fourbit_decode.decode_scaled(words, scale, planes, BN, WPB, DTYPE, USE_ASM)
            x = tl.load(x_ptr + offs_m[:, None] * K + (block * BS + offs_k)[None, :], mask=m_mask[:, None],
                        other=0.0)
            acc = tl.dot(w, tl.trans(x), acc)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    _finish(acc, out_ptr, partial_ptr, counter_ptr, offs_m[None, :] * N + offs_n[:, None],
            n_mask[:, None] & m_mask[None, :], bias, pid_m + pid_n * tl.num_programs(0), pid_k, M * N, SPLIT_K)


@triton.jit
def _word_gemv_inputs(x_cols, words_at, scale_at, blocks_at, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                      step: tl.constexpr, SW: tl.constexpr, WPB: tl.constexpr, NESTED: tl.constexpr,
                      NESTED_BS: tl.constexpr):
    """Step ``step``'s words and absmax (flat [BN * SW]) and its 8 x columns ([1, SW]).

    The pointer tensors are the step-0 addresses; with ``step`` a constant (unrolled loop)
    the step offset becomes an immediate of each load instead of address arithmetic.
    """
    words = tl.load(words_at + step * SW)
    if NESTED:
        code = tl.load(scale_at + step * (SW // WPB)).to(tl.int32)
        group = tl.load(nested_absmax_ptr + (blocks_at + step * (SW // WPB)) // NESTED_BS)
        scale = tl.load(nested_map_ptr + code) * group + tl.load(offset_ptr)
    else:
        scale = tl.load(scale_at + step * (SW // WPB))
    cols = x_cols + step * SW * 8
    return (words, scale, tl.load(cols).to(tl.float32), tl.load(cols + 1).to(tl.float32),
            tl.load(cols + 2).to(tl.float32), tl.load(cols + 3).to(tl.float32), tl.load(cols + 4).to(tl.float32),
            tl.load(cols + 5).to(tl.float32), tl.load(cols + 6).to(tl.float32), tl.load(cols + 7).to(tl.float32))


@triton.jit
def fourbit_word_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, quant_map_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
    bias_ptr, out_ptr, partial_ptr, counter_ptr,
    N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, SW: tl.constexpr,
    SPLIT_K: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """out = x @ W.T for one row x (float16/bfloat16) with CUDA-core FMAs; W read once.

    Each thread owns one packed word (8 columns) in each of BN rows per step, so the 8 x
    values of its columns are loaded and widened once and reused for the BN rows, and
    ``fourbit_decode.word_dot`` turns a word into its 8-term dot product in registers (code
    values in bfloat16, widened by a shift; absmax applied in float32 to the word's sum).
    A step covers SW words (8 * SW columns) of BN rows; the next step's words are requested
    before the current ones are decoded.

    Grid: (cdiv(N, BN), SPLIT_K); program (i, s) sums the s-th slice of K, and the splits are
    added up in the kernel (:func:`_finish`).
    """
    planes = fourbit_decode.table_planes(quant_map_ptr, tl.bfloat16)
    WPR: tl.constexpr = K // 8  # packed int32 words per row
    WPB: tl.constexpr = BS // 8
    KB: tl.constexpr = K // BS
    # The launcher picks SW and SPLIT_K so every split has STEPS whole steps.
    STEPS: tl.constexpr = WPR // SW // SPLIT_K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    # The [BN, SW] tiles are built from flat ranges of BN * SW elements, one per thread per
    # row (contiguity 1 on purpose): with SW threads, element r * SW + w of every row r lands
    # on thread w, so a thread holds word w of all BN rows, and the x columns it needs (one
    # [SW] load each) broadcast over its rows without shuffles. A warp still reads 128
    # contiguous bytes per row.
    flat = tl.arange(0, BN * SW)
    # Rows past N read row N - 1 again (their sums are not stored): no masks in the loop.
    flat_row = tl.minimum(pid_n * BN + flat // SW, N - 1)
    flat_word = tl.max_contiguous(flat % SW, 1)
    offs_w = tl.max_contiguous(tl.arange(0, SW), 1)
    first = pid_k * STEPS * SW
    # Step-0 addresses; every load of the loop is one of these plus a constant.
    words_at = packed_ptr.to(tl.pointer_type(tl.int32)) + flat_row * WPR + first + flat_word
    blocks_at = flat_row * KB + (first + flat_word) // WPB
    scale_at = absmax_ptr + blocks_at
    x_cols = x_ptr + ((first + offs_w) * 8)[None, :]
    acc = tl.zeros([BN, SW], dtype=tl.float32)
    # Each step's loads are issued one step ahead (the last step re-reads step 0: valid
    # memory, unused, so no load needs a mask). The loop is unrolled, so addresses are
    # immediates (the integer pipe is what limits this kernel).
    words, scale, x0, x1, x2, x3, x4, x5, x6, x7 = _word_gemv_inputs(
        x_cols, words_at, scale_at, blocks_at, nested_map_ptr, nested_absmax_ptr, offset_ptr, 0, SW, WPB, NESTED,
        NESTED_BS)
    for step in tl.static_range(STEPS):
        words_n, scale_n, x0_n, x1_n, x2_n, x3_n, x4_n, x5_n, x6_n, x7_n = _word_gemv_inputs(
            x_cols, words_at, scale_at, blocks_at, nested_map_ptr, nested_absmax_ptr, offset_ptr,
            (step + 1) % STEPS, SW, WPB, NESTED, NESTED_BS)
        part = fourbit_decode.word_dot(tl.reshape(words, [BN, SW]), x0, x1, x2, x3, x4, x5, x6, x7, planes, USE_ASM)
        acc += part * tl.reshape(scale, [BN, SW])
        words, scale, x0, x1, x2, x3, x4, x5, x6, x7 = (words_n, scale_n, x0_n, x1_n, x2_n, x3_n, x4_n, x5_n, x6_n,
                                                        x7_n)
    total = tl.sum(acc, axis=1)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    _finish(total, out_ptr, partial_ptr, counter_ptr, offs_n, n_mask, bias, pid_n, pid_k, N, SPLIT_K)
