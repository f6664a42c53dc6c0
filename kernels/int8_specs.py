"""The one place where each int8 kernel launch is put together (grid, constexprs, ``M``, outputs).

Built from the meta functions beside each kernel (``int8_gemm.gemm_meta``,
``int8_quant.rows_meta`` / ``absmax_meta`` / ``scaled_meta``) as
:class:`~qflax_kernels.launch.Launch` objects that the JAX primitive (``int8_launch``), Triton's
launcher on torch tensors (``torch_launch``: torch_compat, the interpreter tests) and the
benchmarks all run. Every kernel takes its array inputs, then ``M``, then its outputs.
"""

from qflax_kernels import int8_gemm, int8_quant
from qflax_kernels.launch import Launch, Output, make_launch


def _from_meta(kernel, grid, meta: dict, *, outputs, name: str, m: int, enable_fp_fusion: bool = True,
               xla_pipeline: bool = False) -> Launch:
    meta = dict(meta)
    num_warps = meta.pop("num_warps", 4)
    num_stages = meta.pop("num_stages", 3)
    maxnreg = meta.pop("maxnreg", None)
    return make_launch(kernel, grid, num_warps=num_warps, num_stages=num_stages, constexprs=meta,
                       scalars=dict(M=m), outputs=outputs, name=name, enable_fp_fusion=enable_fp_fusion,
                       xla_pipeline=xla_pipeline, maxnreg=maxnreg)


def gemm_launch(m: int, n: int, k: int, out_dtype: str, *, has_bias: bool, b_scale_global: bool,
                has_outliers: bool, outlier_w_float: bool = False, dot_ieee: bool = False,
                config: dict | None = None) -> Launch:
    """``int8_matmul_dequant_kernel`` for ``(m, k) x (n, k)`` int8 operands, output ``(m, n)`` of ``out_dtype``.

    Inputs: a, b, a_scale, b_scale, bias, x, outlier_idx, outlier_count, outlier_mask, w_float (the unused
    ones may be any array already at hand: the kernel does not read them).
    """
    grid, meta = int8_gemm.gemm_meta(m, n, k, has_bias=has_bias, b_scale_global=b_scale_global,
                                     has_outliers=has_outliers, outlier_w_float=outlier_w_float,
                                     dot_ieee=dot_ieee, config=config)
    # Through XLA's own Triton pipeline, launched like an XLA op (H200 decoder stack at M = 1:
    # 3.5 ms per step against 4.2-4.6 ms through the FFI call). The outlier variants ran the GPU
    # tests there too (tests/kernels/test_int8_gpu.py with every launch forced through it).
    return _from_meta(int8_gemm.int8_matmul_dequant_kernel, grid, meta, outputs=(Output((m, n), out_dtype),),
                      name="qflax_int8_matmul_dequant", m=m, xla_pipeline=True)


def rows_launch(m: int, k: int, *, threshold: float, llm_int8_scale: bool) -> Launch:
    """``quantize_rows_kernel``: inputs x ``(m, k)``, col_mask; outputs codes ``(m, k)`` int8, absmax ``(m,)``."""
    grid, meta = int8_quant.rows_meta(m, k, threshold=threshold, llm_int8_scale=llm_int8_scale)
    # XLA's Triton pipeline: as the GEMM (the masked variant, used by no op, stays on the FFI call).
    return _from_meta(int8_quant.quantize_rows_kernel, grid, meta,
                      outputs=(Output((m, k), "int8"), Output((m,), "float32")), name="qflax_int8_quantize_rows",
                      m=m, enable_fp_fusion=False, xla_pipeline=threshold == 0)


def rows_outliers_launch(m: int, k: int, *, threshold: float, find_mask: bool) -> Launch:
    """``quantize_rows_outliers_kernel``: inputs x ``(m, k)``, col_mask (not read with ``find_mask``);
    outputs codes ``(m, k)`` int8, absmax ``(m,)``, columns ``(k,)`` int32 (the outlier columns, then unwritten), count ``(1,)`` int32,
    mask ``(k,)`` int8 (1 at the outlier columns)."""
    grid, meta = int8_quant.rows_outliers_meta(m, k, threshold=threshold, find_mask=find_mask)
    return _from_meta(int8_quant.quantize_rows_outliers_kernel, grid, meta,
                      outputs=(Output((m, k), "int8"), Output((m,), "float32"), Output((k,), "int32"),
                               Output((1,), "int32"), Output((k,), "int8")),
                      name="qflax_int8_quantize_rows_outliers", m=m, enable_fp_fusion=False,
                      xla_pipeline=True)


def absmax_launch(m: int, n: int, *, per_column: bool) -> Launch:
    """``absmax_kernel``: input x ``(m, n)``; output the zero-initialised column ``(n,)`` or global ``(1,)`` absmax."""
    grid, meta = int8_quant.absmax_meta(m, n, per_column=per_column)
    return _from_meta(int8_quant.absmax_kernel, grid, meta,
                      outputs=(Output((n if per_column else 1,), "float32", zeroed=True),), name="qflax_int8_absmax",
                      m=m, enable_fp_fusion=False)


def scaled_launch(m: int, n: int, *, per_column: bool, transpose: bool) -> Launch:
    """``quantize_scaled_kernel``: inputs x ``(m, n)``, absmax; output codes ``(m, n)`` or ``(n, m)`` int8."""
    grid, meta = int8_quant.scaled_meta(m, n, per_column=per_column, transpose=transpose)
    return _from_meta(int8_quant.quantize_scaled_kernel, grid, meta,
                      outputs=(Output((n, m) if transpose else (m, n), "int8"),), name="qflax_int8_quantize_scaled",
                      m=m, enable_fp_fusion=False)
