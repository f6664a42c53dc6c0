"""Fused int8 quantizers: row-wise, column-wise (optionally transposed), global (optionally transposed).

All compute ``codes = rne(x * (127 / absmax))`` in float32 with the division correctly rounded
(``div_rn``) -- or, for LLM.int8, ``127 * (1 / absmax)`` as bitsandbytes does -- and give an
all-zero row/column/tensor scale 0 and codes 0, exactly as the XLA references in
``qflax.quant.int8`` and ``qflax.quant.switchback``, including their rule for non-finite and
extreme values (``qflax.quant.scaling``: a unit holding NaN/Inf gets scale NaN and codes 0; a
statistic outside [2**-64, 2**64] is rescaled by an exact power of two first). Round half to even uses the
float32 ``(y + 1.5 * 2**23) - 1.5 * 2**23`` identity (exact for ``|y| < 2**22``; ours are <= 127),
which behaves the same on the GPU and in Triton's interpreter. The launchers compile these
kernels with floating-point contraction off: an FMA of ``x * scale + 1.5 * 2**23`` would skip
the product's rounding and flip codes next to halves.

Row-wise reads the float tensor once: one program holds whole rows in registers (``K`` up to
:data:`MAX_ROW_K`). Column-wise and global scales need a reduction over the whole tensor before
any code can be written, so they take two passes: :func:`absmax_kernel` (tile maxima combined
with an integer ``atomic_max`` on the bits of a zero-initialised float32 buffer; absolute values
are >= 0, so float max order is the integer order, and a NaN ranks above them all) and :func:`quantize_scaled_kernel` (reads again, writes codes,
transposed if asked). These run on weights, which are small next to activations.
"""

import triton
import triton.language as tl

from qflax_kernels.launch import is_interpreted

# Longest row the single-pass row quantizer holds in registers.
MAX_ROW_K = 32768
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
# qflax.quant.scaling's rule: a statistic outside [2**-64, 2**64] is rescaled by an exact power
# of two first, so 1/absmax and 127/absmax stay normal float32 numbers.
_LIMIT = tl.constexpr(2.0**64)
_INV_LIMIT = tl.constexpr(2.0**-64)


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _absmax(x, axis: tl.constexpr):
    """float32 max |x| over ``axis``, NaN where the reduced values hold a NaN or +-Inf.

    Explicit, not left to the max reduction: the GPU's max drops NaN, the interpreter's keeps it.
    """
    finite = _finite(x)
    largest = tl.max(tl.abs(tl.where(finite, x, 0.0)), axis=axis)
    bad = tl.max(tl.where(finite, 0, 1), axis=axis)
    return tl.where(bad > 0, float("nan"), largest)


@triton.jit
def _product_rn(a, b, USE_ASM: tl.constexpr):
    """``a * b`` rounded to float32 by itself: never contracted with the add that follows into an FMA.

    Triton's launchers compile these kernels without contraction (``enable_fp_fusion=False``), but
    XLA's own Triton pipeline (``xla_pipeline`` launches) takes no such flag; PTX ``mul.rn`` is
    never fused by ptxas. The interpreter (``USE_ASM=False``) rounds numpy's product.
    """
    if USE_ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _scaled_codes(x, absmax, RECIPROCAL_SCALE: tl.constexpr, USE_ASM: tl.constexpr):
    """int8 codes of ``x`` against its unit's ``absmax`` (broadcast), 0 where absmax is 0 or NaN."""
    factor = tl.where(absmax > _LIMIT, _INV_LIMIT, 1.0)
    factor = tl.where((absmax < _INV_LIMIT) & (absmax > 0.0), _LIMIT, factor)
    usable = absmax > 0.0
    safe = tl.where(usable, absmax * factor, 1.0)
    if RECIPROCAL_SCALE:
        # bitsandbytes' LLM.int8 scale: 127 * (1 / absmax), the reciprocal rounded first.
        # Explicit float32 operands: Triton's interpreter would otherwise widen the literal.
        scale = tl.full(safe.shape, 127.0, tl.float32) * tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    else:
        scale = tl.math.div_rn(tl.full(safe.shape, 127.0, tl.float32), safe)
    codes = _round_to_int8(tl.where(usable, _product_rn(x * factor, scale, USE_ASM), 0.0))
    return tl.where(usable, codes, 0).to(tl.int8)


@triton.jit
def _round_to_int8(y):
    rounded = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8)


@triton.jit
def quantize_rows_kernel(
    x_ptr,  # float (M, K)
    col_mask_ptr,  # int8 (K,): nonzero = outlier column, codes zeroed (LLM.int8)
    M,  # runtime scalar: after the array inputs, before the outputs (qflax_kernels.launch)
    codes_ptr,  # int8 (M, K)
    absmax_ptr,  # float32 (M,)
    K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    THRESHOLD: tl.constexpr,
    RECIPROCAL_SCALE: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    ok = (rm < M)[:, None] & (rk < K)[None, :]
    offs = rm.to(tl.int64)[:, None] * K + rk[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        # LLM.int8 with outliers: outlier elements leave the row absmax and round to 0, then the
        # codes of every outlier column are zeroed (their products run in float instead).
        x = tl.where(tl.abs(x) >= THRESHOLD, 0.0, x)
    absmax = _absmax(x, 1)
    codes = _scaled_codes(x, absmax[:, None], RECIPROCAL_SCALE, USE_ASM)
    if HAS_MASK:
        zeroed = tl.load(col_mask_ptr + rk, mask=rk < K, other=0)
        codes = tl.where(zeroed[None, :] != 0, 0, codes).to(tl.int8)
    tl.store(codes_ptr + offs, codes, mask=ok)
    tl.store(absmax_ptr + rm, absmax, mask=rm < M)


@triton.jit
def quantize_rows_outliers_kernel(
    x_ptr,  # float (M, K)
    col_mask_ptr,  # int8 (K,): nonzero = outlier column; not read with FIND_MASK
    M,  # runtime scalar: after the array inputs, before the outputs (qflax_kernels.launch)
    codes_ptr,  # int8 (M, K)
    absmax_ptr,  # float32 (M,)
    columns_ptr,  # int32 (K,): the outlier columns in increasing order, then unspecified
    count_ptr,  # int32 (1,): how many outlier columns
    mask_ptr,  # int8 (K,): 1 at the outlier columns, else 0
    K: tl.constexpr,
    FIND_MASK: tl.constexpr,
    THRESHOLD: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """LLM.int8's row quantizer with outliers, and the outlier columns listed for the GEMM.

    Codes and absmax are those of ``quantize_rows_kernel`` with the mask (bitsandbytes' scale
    ``127 * (1 / absmax)``). With ``FIND_MASK`` (the grid is one program holding every row) the
    column mask is found here, ``any(|x| >= THRESHOLD)`` over the rows, instead of read. Program 0
    also lists the outlier columns: the first ``count`` entries of ``columns`` are what
    ``nonzero(mask)`` gives, without the scatter and prefix sums XLA and torch spend on it (and
    without a host read); the entries after them are not written.
    """
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    k_ok = rk < K
    ok = (rm < M)[:, None] & k_ok[None, :]
    offs = rm.to(tl.int64)[:, None] * K + rk[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    outlier = tl.abs(x) >= THRESHOLD  # padding holds 0.0 and THRESHOLD > 0: never an outlier
    if FIND_MASK:
        col = tl.max(tl.where(outlier, 1, 0), axis=0)
    else:
        col = tl.where(tl.load(col_mask_ptr + rk, mask=k_ok, other=0) != 0, 1, 0)
    # Outlier elements leave the row absmax and round to 0; then every outlier column's codes are 0
    # (their products run in float in the GEMM).
    x = tl.where(outlier, 0.0, x)
    absmax = _absmax(x, 1)
    codes = _scaled_codes(x, absmax[:, None], True, USE_ASM)
    codes = tl.where(col[None, :] != 0, 0, codes).to(tl.int8)
    tl.store(codes_ptr + offs, codes, mask=ok)
    tl.store(absmax_ptr + rm, absmax, mask=rm < M)
    if pid == 0:
        # Only the outlier columns are listed (one prefix sum, ``count`` stores): the GEMM and
        # ``state.idx`` read no further, and outliers are few.
        count = tl.sum(col, axis=0)
        tl.store(columns_ptr + tl.cumsum(col, 0) - 1, rk, mask=col != 0)
        tl.store(count_ptr + tl.arange(0, 1), tl.full((1,), 0, tl.int32) + count)
        # The same set as a mask, for the GEMM's pass over many outlier columns.
        tl.store(mask_ptr + rk, col.to(tl.int8), mask=k_ok)


@triton.jit
def absmax_kernel(
    x_ptr,  # float (M, N)
    M,
    out_ptr,  # float32 (N,) if PER_COLUMN else (1,); zero-initialised
    N: tl.constexpr,
    PER_COLUMN: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row0 = tl.program_id(0) * ROWS_PER_PROGRAM
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    running = tl.zeros((BLOCK_N,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for i in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rm = row0 + i + tl.arange(0, BLOCK_M)
        ok = (rm < M)[:, None] & (rn < N)[None, :]
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=ok, other=0.0).to(tl.float32)
        finite = _finite(x)
        running = tl.maximum(running, tl.max(tl.abs(tl.where(finite, x, 0.0)), axis=0))
        bad = tl.maximum(bad, tl.max(tl.where(finite, 0, 1), axis=0))
    # A non-finite value makes its column (or the tensor) NaN. The maxima are combined as int32
    # bits: for non-negative floats the integer order is the float order, and a positive NaN
    # is above them all. (Triton's float atomic_max skips NaN: it is neither >= 0 nor < 0.)
    if PER_COLUMN:
        value = tl.where(bad > 0, float("nan"), running)
        tl.atomic_max(out_ptr.to(tl.pointer_type(tl.int32)) + rn, value.to(tl.int32, bitcast=True), mask=rn < N)
    else:
        value = tl.where(tl.max(bad, axis=0) > 0, float("nan"), tl.max(running, axis=0))
        tl.atomic_max(out_ptr.to(tl.pointer_type(tl.int32)), value.to(tl.int32, bitcast=True))


@triton.jit
def quantize_scaled_kernel(
    x_ptr,  # float (M, N)
    absmax_ptr,  # float32 (N,) if PER_COLUMN else (1,)
    M,
    codes_ptr,  # int8 (M, N), or (N, M) if TRANSPOSE
    N: tl.constexpr,
    PER_COLUMN: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    if PER_COLUMN:
        absmax = tl.load(absmax_ptr + rn, mask=rn < N, other=0.0)
    else:
        absmax = tl.load(absmax_ptr + tl.zeros((BLOCK_N,), dtype=tl.int32))
    codes = _scaled_codes(x, absmax[None, :], False, USE_ASM)
    if TRANSPOSE:
        tl.store(codes_ptr + rn.to(tl.int64)[None, :] * M + rm[:, None], codes, mask=ok)
    else:
        tl.store(codes_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], codes, mask=ok)


def _use_asm() -> bool:
    """Inline PTX (the rounded product) where the kernels are compiled; the interpreter cannot run it."""
    return not is_interpreted(quantize_rows_kernel)


def rows_meta(
    M: int, K: int, *, threshold: float = 0.0, llm_int8_scale: bool = False
) -> tuple[tuple[int], dict]:
    """(grid, keyword arguments) for :func:`quantize_rows_kernel`; ``K <= MAX_ROW_K``.

    ``threshold > 0`` turns on the LLM.int8 outlier handling (the column mask input is read).
    ``llm_int8_scale``: scale ``127 * (1 / absmax)`` (bitsandbytes' LLM.int8, ``qflax.quant.int8``)
    instead of the correctly rounded ``127 / absmax`` (SwitchBack, ``qflax.quant.switchback``).
    """
    if K > MAX_ROW_K:
        raise ValueError(f"K must be <= {MAX_ROW_K} for the single-pass row quantizer, got {K}")
    block_k = triton.next_power_of_2(K)
    # About 4096 elements per program: several short rows, or one long row.
    block_m = max(1, min(16, 4096 // block_k))
    num_warps = 4 if block_k * block_m <= 4096 else (8 if block_k <= 16384 else 16)
    meta = dict(K=K, HAS_MASK=threshold > 0, THRESHOLD=float(threshold), RECIPROCAL_SCALE=llm_int8_scale,
                USE_ASM=_use_asm(), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps)
    return (triton.cdiv(M, block_m),), meta


# One program finds the outlier mask itself when it holds every row: at most this many elements.
ONE_PROGRAM_ELEMENTS = 32768


def outliers_fit_one_program(M: int, K: int) -> bool:
    """Whether :func:`quantize_rows_outliers_kernel` can find the column mask itself (one program, all rows)."""
    return triton.next_power_of_2(M) * triton.next_power_of_2(K) <= ONE_PROGRAM_ELEMENTS


def rows_outliers_meta(M: int, K: int, *, threshold: float, find_mask: bool) -> tuple[tuple[int], dict]:
    """(grid, keyword arguments) for :func:`quantize_rows_outliers_kernel`; ``K <= MAX_ROW_K``, ``threshold > 0``.

    ``find_mask`` (only where :func:`outliers_fit_one_program`): one program holds all rows and
    finds the column mask; otherwise the tiles of :func:`rows_meta` and the mask is an input.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 for the outlier quantizer, got {threshold}")
    (grid, meta) = rows_meta(M, K, threshold=threshold, llm_int8_scale=True)
    meta = dict(K=K, FIND_MASK=find_mask, THRESHOLD=float(threshold), USE_ASM=meta["USE_ASM"],
                BLOCK_M=meta["BLOCK_M"], BLOCK_K=meta["BLOCK_K"], num_warps=meta["num_warps"])
    if find_mask:
        if not outliers_fit_one_program(M, K):
            raise ValueError(f"find_mask needs next_power_of_2(M) * next_power_of_2(K) <= {ONE_PROGRAM_ELEMENTS}, got M={M}, K={K}")
        elements = triton.next_power_of_2(M) * meta["BLOCK_K"]
        meta.update(BLOCK_M=triton.next_power_of_2(M),
                    num_warps=4 if elements <= 4096 else (8 if elements <= 16384 else 16))
        grid = (1,)
    return grid, meta


def absmax_meta(M: int, N: int, *, per_column: bool) -> tuple[tuple[int, int], dict]:
    """(grid, keyword arguments) for :func:`absmax_kernel`."""
    block_m, block_n = 32, 128
    rows_per_program = block_m * max(1, min(32, triton.cdiv(M, block_m)))
    meta = dict(N=N, PER_COLUMN=per_column, ROWS_PER_PROGRAM=rows_per_program, BLOCK_M=block_m,
                BLOCK_N=block_n, num_warps=4)
    return (triton.cdiv(M, rows_per_program), triton.cdiv(N, block_n)), meta


def scaled_meta(M: int, N: int, *, per_column: bool, transpose: bool) -> tuple[tuple[int, int], dict]:
    """(grid, keyword arguments) for :func:`quantize_scaled_kernel`."""
    block_m, block_n = 64, 64
    meta = dict(N=N, PER_COLUMN=per_column, TRANSPOSE=transpose, USE_ASM=_use_asm(), BLOCK_M=block_m,
                BLOCK_N=block_n, num_warps=4)
    return (triton.cdiv(M, block_m), triton.cdiv(N, block_n)), meta
