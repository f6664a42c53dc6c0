"""int8 x int8 -> int32 GEMM with the dequant epilogue, bias and the LLM.int8 outlier matmul fused.

``out[m, n] = acc[m, n] * (a_scale[m] / 127²) * b_scale[n]  (+ outliers) (+ bias[n])`` where
``acc = A @ B.T`` is exact int32 (A ``(M, K)`` int8, B ``(N, K)`` int8: both K-contiguous, the
operand layout int8 tensor cores want). ``b_scale`` is either one float32 per row of B
(LLM.int8 / SwitchBack vector-wise) or a single float32 (SwitchBack global).

Outliers (LLM.int8, threshold > 0): the activation columns listed in ``outlier_idx`` (the first
``outlier_count`` entries; ``outlier_mask`` marks the same columns) are multiplied in the input
precision against B's int8 columns dequantized on the fly, ``x[:, idx] @ B[:, idx].T * b_scale / 127``,
accumulated in float32 and added before the cast. Up to ``GATHER_MAX_OUTLIERS`` columns are
gathered through the list (with decode tiles the first 32 before the K loop); more stream x and B
along K once more under the mask. No dequantized weight is ever materialized. With ``OUTLIER_W_FLOAT`` the
outlier columns are read from a float weight instead (SwitchBackBnb's semantics). The count lives on the
device, so one compiled kernel serves any number of outliers under ``jax.jit``.

The epilogue follows the order of ``qflax.quant.int8.int8_mm_dequant`` (the XLA reference):
float32 ``acc * (a_scale * 1/127²) * b_scale + bias``, then one cast to the output dtype.
"""

import functools

import numpy as np
import triton
import triton.language as tl

INV_127_SQUARED = tl.constexpr(float(np.float32(1.0 / (127 * 127))))
INV_127 = tl.constexpr(float(np.float32(1.0 / 127)))
# Software-pipeline depth of the masked outlier pass (its tiles: x in half precision and B).
MASKED_PASS_STAGES = tl.constexpr(2)


@triton.jit
def _outlier_dot(xo, wo, out, DOT_IEEE: tl.constexpr):
    """``out + xo @ wo.T`` in float32: outlier columns of x against the weight's same columns."""
    # float32 operands: bf16/fp16 values and int8 codes are exact in tf32, so the tensor-core
    # tf32 product is exact for half inputs; float32 inputs need the full-precision dot.
    xo = xo.to(tl.float32)
    wo = wo.to(tl.float32)
    if DOT_IEEE:
        return tl.dot(xo, tl.trans(wo), out, input_precision="ieee")
    else:
        return tl.dot(xo, tl.trans(wo), out, input_precision="tf32")


@triton.jit
def _gather_outlier_columns(x_ptr, b_ptr, w_float_ptr, idx_ptr, ok, ram, rbn, K: tl.constexpr,
                            OUTLIER_W_FLOAT: tl.constexpr):
    """``(x[ram][:, cols], W[rbn][:, cols])`` for the listed columns ``cols = idx_ptr[ok]`` (0 elsewhere).

    W is the float weight with ``OUTLIER_W_FLOAT``, else B's int8 codes.
    """
    cols = tl.load(idx_ptr, mask=ok, other=0).to(tl.int64)
    xo = tl.load(x_ptr + ram[:, None] * K + cols[None, :], mask=ok[None, :], other=0.0)
    if OUTLIER_W_FLOAT:
        wo = tl.load(w_float_ptr + rbn[:, None] * K + cols[None, :], mask=ok[None, :], other=0.0)
    else:
        wo = tl.load(b_ptr + rbn[:, None] * K + cols[None, :], mask=ok[None, :], other=0)
    return xo, wo


@triton.jit
def int8_matmul_dequant_kernel(
    a_ptr,  # int8 (M, K)
    b_ptr,  # int8 (N, K)
    a_scale_ptr,  # float32 (M,)
    b_scale_ptr,  # float32 (N,) or (1,)
    bias_ptr,  # (N,) any float dtype; unused unless HAS_BIAS
    x_ptr,  # float (M, K) activations for the outlier columns; unused unless HAS_OUTLIERS
    outlier_idx_ptr,  # int32 (>= count,) column indices
    outlier_count_ptr,  # int32 (1,)
    outlier_mask_ptr,  # int8 (K,): nonzero at the outlier columns (the same set as the list)
    w_float_ptr,  # float (N, K) weight for the outlier columns; unused unless OUTLIER_W_FLOAT
    M,  # runtime scalar: after the array inputs, before the outputs (qflax_kernels.launch)
    out_ptr,  # (M, N) output dtype
    N: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    B_SCALE_GLOBAL: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr,
    OUTLIER_W_FLOAT: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,
    PAD_ROWS: tl.constexpr,
    PREFETCH_OUTLIERS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
    GATHER_MAX: tl.constexpr,
    MASKED_BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row-tiles share each column-tile while it sits in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read a valid row instead (wrapped); their results are masked at the store.
    if PAD_ROWS:
        # Fewer rows than the tile (decode): wrapped rows would make every program ask the same
        # few L2 lines for x BLOCK_M times over; the padding rows are not loaded at all instead.
        ram = tl.minimum(rm, M - 1).to(tl.int64)
    else:
        ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M).to(tl.int64)
    rbn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N).to(tl.int64)
    a_ptrs = a_ptr + ram[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rbn[:, None] * K + rk[None, :]

    if HAS_OUTLIERS:
        count = tl.load(outlier_count_ptr)
        ro = tl.arange(0, BLOCK_O)
        if PREFETCH_OUTLIERS:
            # Decode: the first BLOCK_O outlier columns of x and of this program's weight rows are
            # gathered before the weight stream starts, so their two dependent round trips to
            # memory (indices, then the scattered bytes) overlap it instead of following it.
            o_ok0 = ro < tl.where(count <= GATHER_MAX, count, 0)  # nothing when the masked pass runs
            xo0, wo0 = _gather_outlier_columns(x_ptr, b_ptr, w_float_ptr, outlier_idx_ptr + ro, o_ok0, ram, rbn,
                                               K, OUTLIER_W_FLOAT)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            if PAD_ROWS:
                a = tl.load(a_ptrs, mask=(rm < M)[:, None], other=0)
            else:
                a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = rk < K - k * BLOCK_K
            if PAD_ROWS:
                a = tl.load(a_ptrs, mask=(rm < M)[:, None] & k_ok[None, :], other=0)
            else:
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    m_ok = rm < M
    n_ok = rn < N
    a_scale = tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)
    if B_SCALE_GLOBAL:
        b_scale = tl.load(b_scale_ptr + tl.zeros((BLOCK_N,), dtype=tl.int32))
    else:
        b_scale = tl.load(b_scale_ptr + rn, mask=n_ok, other=0.0)
    if HAS_OUTLIERS and not OUTLIER_W_FLOAT:
        # One float32 accumulator for both parts (a second one would spill registers):
        # t = acc * a_scale / 127 + x[:, idx] @ B[:, idx].T, then out = t * b_scale / 127.
        out = acc.to(tl.float32) * (a_scale * INV_127)[:, None]
    else:
        out = acc.to(tl.float32) * (a_scale * INV_127_SQUARED)[:, None]
        out = out * b_scale[None, :]
    if HAS_OUTLIERS:
        # Float matmul of the outlier columns x[:, idx] against the weight's columns idx: the int8
        # codes (scaled by b_scale / 127 below), or a float weight (OUTLIER_W_FLOAT).
        if count > GATHER_MAX:
            # Many outlier columns: gathering single bytes of B's rows would move a 32-byte sector
            # per byte, more than all of B. Stream x and B again along K instead, in whole tiles
            # (plain contiguous loads: pipelined like the main loop, none waits on the mask), and
            # zero x outside the outlier columns.
            rkd = tl.arange(0, MASKED_BLOCK_K)
            xd_ptrs = x_ptr + ram[:, None] * K + rkd[None, :]
            if OUTLIER_W_FLOAT:
                wd_ptrs = w_float_ptr + rbn[:, None] * K + rkd[None, :]
            else:
                wd_ptrs = b_ptr + rbn[:, None] * K + rkd[None, :]
            for kd in tl.range(0, tl.cdiv(K, MASKED_BLOCK_K), num_stages=MASKED_PASS_STAGES):
                kk = kd * MASKED_BLOCK_K + rkd
                sel = tl.load(outlier_mask_ptr + kk, mask=kk < K, other=0) != 0
                if K % MASKED_BLOCK_K == 0:
                    xd = tl.load(xd_ptrs)
                    wd = tl.load(wd_ptrs)
                else:
                    xd = tl.load(xd_ptrs, mask=(kk < K)[None, :], other=0.0)
                    wd = tl.load(wd_ptrs, mask=(kk < K)[None, :], other=0)
                xd = tl.where(sel[None, :], xd, tl.zeros_like(xd))
                # Half operands (DOT_IEEE is off) take a half dot: float32 tiles would spill registers.
                if not DOT_IEEE and not OUTLIER_W_FLOAT:
                    # Half x against int8 codes cast to x's dtype (exact): products exact, float32 sums.
                    # Through float32: Triton 3.6's interpreter casts int8 straight to bfloat16 as raw bits.
                    out = tl.dot(xd, tl.trans(wd.to(tl.float32).to(xd.dtype)), out)
                elif not DOT_IEEE and w_float_ptr.dtype.element_ty == x_ptr.dtype.element_ty:
                    # A half float weight of x's dtype: the same half dot.
                    out = tl.dot(xd, tl.trans(wd), out)
                else:
                    out = _outlier_dot(xd, wd, out, DOT_IEEE)
                xd_ptrs += MASKED_BLOCK_K
                wd_ptrs += MASKED_BLOCK_K
        else:
            j = 0
            if PREFETCH_OUTLIERS:
                out = _outlier_dot(xo0, wo0, out, DOT_IEEE)
                j = BLOCK_O
            while j < count:
                xo, wo = _gather_outlier_columns(x_ptr, b_ptr, w_float_ptr, outlier_idx_ptr + j + ro,
                                                 j + ro < count, ram, rbn, K, OUTLIER_W_FLOAT)
                out = _outlier_dot(xo, wo, out, DOT_IEEE)
                j += BLOCK_O
        if not OUTLIER_W_FLOAT:
            out = out * (b_scale * INV_127)[None, :]

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        out = out + bias[None, :]

    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Up to this many outlier columns the GEMM gathers them (x[:, idx], B[:, idx]); above it, it
# streams x and B a second time with the column mask. A gathered byte of B costs a 32-byte
# sector, so past a few dozen columns the second stream is the cheaper one -- except at decode
# (tiles of <= 16 rows), where the second stream doubles the weight bytes, the whole cost there,
# while the gather's chunks of 32 columns cost one round trip each.
GATHER_MAX_OUTLIERS = 64
GATHER_MAX_DECODE = 512
# Registers per thread for the 128x128 outlier tiles: two programs of 8 warps per SM (65536 / 512).
OUTLIER_TILE_MAXNREG = 128


@functools.lru_cache(maxsize=None)
def gemm_config(M: int, N: int, K: int) -> dict:
    """Tile sizes, warps and pipeline depth for one problem size (chosen on an H100, see benchmarks/).

    Large problems take 128x256x128 tiles (int8 wgmma wants a deep K tile); small ones
    smaller tiles so the grid still fills the 132 SMs. The M <= 16 tiles were measured on the H200.
    """
    if M >= 2048 and N >= 2048:
        cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    elif M >= 128:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    elif M > 16:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        # Decode: the weight stream is the whole cost. Tiles of 32 weight rows x 512 bytes keep
        # bytes in flight and spread narrow layers over the SMs; wide layers (N >= 8192) do
        # better with 64 x 256. Measured on the H200 (benchmarks/tune_int8_tiles.py, M = 1 and
        # 16, the decoder's four shapes: 6.2-18.4 us, 2.6-3.4 TB/s of weights), against
        # 6.7-32.1 us for the 16x32x256 tiles used before.
        block_n, block_k = (64, 256) if N >= 8192 else (32, 512)
        cfg = dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=1, num_warps=4, num_stages=4)
    return cfg


def gemm_meta(
    M: int, N: int, K: int, *, has_bias: bool, b_scale_global: bool, has_outliers: bool,
    outlier_w_float: bool = False, dot_ieee: bool = False, config: dict | None = None,
) -> tuple[tuple[int], dict]:
    """(grid, keyword arguments) for one launch of :func:`int8_matmul_dequant_kernel`.

    Shared by the JAX launcher and the interpreter tests, so both launch the kernel the same way.
    ``config`` overrides :func:`gemm_config` (tile sizes, num_warps, num_stages, optionally
    maxnreg). ``dot_ieee``: a float32 operand takes part in the outlier product (tf32 would round it).
    The keyword arguments hold the constexprs, ``num_warps``, ``num_stages`` and, for a
    register-capped launch, ``maxnreg`` (Triton's launch options).
    """
    cfg = dict(gemm_config(M, N, K) if config is None else config)
    meta = dict(
        N=N, K=K, HAS_BIAS=has_bias, B_SCALE_GLOBAL=b_scale_global, HAS_OUTLIERS=has_outliers,
        OUTLIER_W_FLOAT=outlier_w_float, DOT_IEEE=dot_ieee, EVEN_K=K % cfg["BLOCK_K"] == 0,
        PAD_ROWS=M < cfg["BLOCK_M"], BLOCK_O=32, **cfg,
        GATHER_MAX=GATHER_MAX_DECODE if cfg["BLOCK_M"] <= 16 else GATHER_MAX_OUTLIERS,
        # Small tiles only: the prefetched columns stay live in registers through the K loop.
        PREFETCH_OUTLIERS=has_outliers and cfg["BLOCK_M"] <= 16,
        # Decode tiles stream the masked pass in the main loop's K tiles; larger tiles in narrow
        # ones, which need fewer registers (sm_90, M = 512: 220 against 242 per thread).
        MASKED_BLOCK_K=cfg["BLOCK_K"] if cfg["BLOCK_M"] <= 16 else min(32, cfg["BLOCK_K"]),
    )
    if config is None and has_outliers and not dot_ieee and (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]) == (
            128, 128, 8):
        # The outlier product doubles the registers of the 128x128 tiles (113 -> 242 per thread
        # on sm_90), which halves the programs per SM (one of 256 threads instead of two). Capped
        # at 128 two fit again; ptxas spills 136 B, outside the K loop. (A float32 x, DOT_IEEE,
        # would spill 1.2 KB: left uncapped.)
        meta["maxnreg"] = OUTLIER_TILE_MAXNREG
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    return grid, meta
