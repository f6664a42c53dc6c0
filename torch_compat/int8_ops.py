"""LLM.int8 on torch tensors through qflax's int8 Triton kernels, as ``qflax::`` custom ops.

The forward pass is ``qflax.ops.int8_kernels.run_llm_int8`` on torch tensors, with the launches
of ``qflax_kernels.int8_specs``: the fused row quantizer (bitsandbytes' ``127 * (1 / absmax)``
scale, outlier elements out of the row absmax, outlier columns' codes zeroed), then the int8 GEMM
whose epilogue dequantizes, adds the outlier columns' float product (the int8 weight columns
dequantized in the kernel) and the bias. The outlier columns are found on the device, by the
quantizer kernel: their indices are the first ``count`` entries of the column list it writes,
so nothing is read on the host and every shape is static (torch.compile and
CUDA graphs take the ops as they are).

Backward passes follow ``qflax.ops.int8_matmul``: the input gradient ``G @ dequant(W)`` in x's
dtype, the bias gradient summed in float32 and, for a trainable float weight, the exact
``G^T X`` (float32 accumulation). No kernel exists for those products; they are torch ops.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from qflax.quant.int8 import INV_127
from torch_compat import kernel_launch


@functools.lru_cache(maxsize=4096)
def _rows_launch(m: int, k: int, threshold: float):
    from qflax_kernels import int8_specs

    return int8_specs.rows_launch(m, k, threshold=threshold, llm_int8_scale=True)


@functools.lru_cache(maxsize=4096)
def _rows_outliers_launch(m: int, k: int, threshold: float):
    from qflax_kernels import int8_quant, int8_specs

    find_mask = int8_quant.outliers_fit_one_program(m, k)
    return int8_specs.rows_outliers_launch(m, k, threshold=threshold, find_mask=find_mask), find_mask


@functools.lru_cache(maxsize=4096)
def _gemm_launch(m: int, n: int, k: int, out_dtype: str, has_bias: bool, b_scale_global: bool, has_outliers: bool,
                 dot_ieee: bool):
    from qflax_kernels import int8_specs

    return int8_specs.gemm_launch(m, n, k, out_dtype, has_bias=has_bias, b_scale_global=b_scale_global,
                                  has_outliers=has_outliers, dot_ieee=dot_ieee)


def _quantize_rows(x2: Tensor) -> tuple:
    # Without outliers the mask pointer is never read: x2 stands in for it.
    x2 = x2.contiguous()
    codes, absmax = kernel_launch.run(_rows_launch(x2.shape[0], x2.shape[1], 0.0), [x2, x2])
    return codes, absmax


def _quantize_rows_outliers(x2: Tensor, threshold: float) -> tuple:
    """codes, absmax, the outlier columns (the first ``count`` of int32 ``(K,)``), their count (int32 ``(1,)``)
    and their int8 ``(K,)`` mask."""
    launch, find_mask = _rows_outliers_launch(x2.shape[0], x2.shape[1], float(threshold))
    if find_mask:  # one program holds every row and finds the column mask: x2 stands in for its pointer
        return kernel_launch.run(launch, [x2, x2])
    # The column mask as qflax.quant.int8.outlier_mask: any |x| >= threshold, compared in float32.
    mask = (x2.abs().amax(0).float() >= threshold).to(torch.int8)
    return kernel_launch.run(launch, [x2, mask])


def llm_int8_with_outliers(x2: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                           threshold: float) -> tuple:
    """The LLM.int8 product of a 2-D ``x2 (M, K)`` and, with a threshold, its outlier columns.

    Args:
      x2: (M, K) float16/bfloat16/float32 activations.
      w_codes: int8 (N, K) weight codes (CB); w_scale: (N,) row absmax (SCB).
      bias: optional (N,) in x2's dtype.
      threshold: outlier threshold (0: none).

    Returns:
      ``(out, columns, count)``: out ``(M, N)`` in x2's dtype (bias included); with
      ``threshold > 0`` int32 ``(K,)`` whose first ``count`` entries are the outlier columns
      (increasing) and that int32 ``(1,)`` count, found on the device (``MatmulLtState.defer_idx``
      takes them), else None, None.
    """
    x2, w_codes = x2.contiguous(), w_codes.contiguous()  # no-ops for the callers; a compiler may pass other strides
    m, k = x2.shape
    n = w_codes.shape[0]
    if m == 0:
        return x2.new_empty((0, n)), None, None
    w_scale = w_scale if w_scale.dtype == torch.float32 else w_scale.float()
    unread = w_scale  # pointers a launch does not read get an input already at hand
    columns = count = None
    if threshold == 0:
        codes, absmax = _quantize_rows(x2)
        outlier_inputs = [unread, unread, unread, unread]
    else:
        codes, absmax, columns, count, mask = _quantize_rows_outliers(x2, threshold)
        outlier_inputs = [x2, columns, count, mask]
    launch = _gemm_launch(m, n, k, kernel_launch.dtype_name(x2.dtype), bias is not None, False, threshold != 0,
                          threshold != 0 and x2.dtype == torch.float32)
    inputs = [codes, w_codes, absmax, w_scale, unread if bias is None else bias, *outlier_inputs, unread]
    (out,) = kernel_launch.run(launch, inputs)
    return out, columns, count


def _llm_int8(x2: Tensor, w_codes: Tensor, w_scale: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """The LLM.int8 product of a 2-D ``x2 (M, K)``, (M, N) in x2's dtype (bias included)."""
    return llm_int8_with_outliers(x2, w_codes, w_scale, bias, threshold)[0]


def _dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``codes * scale[:, None] / 127`` in float32, rounded once to ``dtype`` (qflax's int8_vectorwise_dequant)."""
    return (codes.float() * scale.float()[:, None] * float(INV_127)).to(dtype)


def _grad_bias(grad: Tensor, bias_dtype: Optional[torch.dtype], wanted: bool) -> Optional[Tensor]:
    if bias_dtype is None or not wanted:
        return None
    return grad.float().sum(0).to(bias_dtype)


def int8_quantize_rows_body(x: Tensor) -> tuple[Tensor, Tensor]:
    """bitsandbytes' row-wise LLM.int8 quantization of a contiguous 2-D ``x``: int8 codes and float32 absmax.

    The codes and scales of a weight (CB, SCB) are bit-identical to ``qflax.quant.quantize_rows``.
    """
    return _quantize_rows(x)


int8_quantize_rows = torch.library.custom_op("qflax::int8_quantize_rows", int8_quantize_rows_body, mutates_args=())


@int8_quantize_rows.register_fake
def _int8_quantize_rows_fake(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def llm_int8_matmul_body(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """LLM.int8 ``x @ W.T (+ bias)`` with a frozen int8 weight (Linear8bitLt, has_fp16_weights=False).

    Args:
      x: (M, K) float16/bfloat16/float32, contiguous.
      codes: int8 (N, K) weight codes (CB).
      scale: float32 (N,) row absmax (SCB).
      bias: optional (N,) in x's dtype.
      threshold: outlier threshold (0: none).

    Returns:
      (M, N) in x's dtype.
    """
    return _llm_int8(x, codes, scale, bias, threshold)


llm_int8_matmul = torch.library.custom_op("qflax::llm_int8_matmul", llm_int8_matmul_body, mutates_args=())


@llm_int8_matmul.register_fake
def _llm_int8_matmul_fake(x, codes, scale, bias, threshold):
    return x.new_empty((x.shape[0], codes.shape[0]))


def _frozen_setup(ctx, inputs, output):
    x, codes, scale, bias, _ = inputs
    ctx.save_for_backward(codes, scale)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _frozen_backward(ctx, grad):
    codes, scale = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.matmul(grad.to(ctx.x_dtype), _dequantize(codes, scale, ctx.x_dtype))
    return grad_x, None, None, _grad_bias(grad, ctx.bias_dtype, ctx.needs_input_grad[3]), None


llm_int8_matmul.register_autograd(_frozen_backward, setup_context=_frozen_setup)


def llm_int8_matmul_trainable_body(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """LLM.int8 ``x @ weight.T (+ bias)`` with a float weight quantized row-wise on every call.

    Args:
      x: (M, K) float16/bfloat16/float32, contiguous.
      weight: float (N, K), contiguous (has_fp16_weights=True).
      bias: optional (N,) in x's dtype.
      threshold: outlier threshold (0: none).

    Returns:
      (M, N) in x's dtype. Its weight gradient is the exact ``G^T X``.
    """
    codes, scale = _quantize_rows(weight)
    return _llm_int8(x, codes, scale, bias, threshold)


llm_int8_matmul_trainable = torch.library.custom_op("qflax::llm_int8_matmul_trainable", llm_int8_matmul_trainable_body,
                                                    mutates_args=())


@llm_int8_matmul_trainable.register_fake
def _llm_int8_matmul_trainable_fake(x, weight, bias, threshold):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _trainable_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _trainable_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = None
    g = grad.to(x.dtype)
    if ctx.needs_input_grad[0]:
        codes, scale = torch.ops.qflax.int8_quantize_rows(weight.detach())
        grad_x = torch.matmul(g, _dequantize(codes, scale, x.dtype))
    if ctx.needs_input_grad[1]:
        # The exact weight gradient, products of the input-precision operands accumulated in float32.
        grad_w = torch.matmul(g.t().float(), x.float()).to(weight.dtype)
    return grad_x, grad_w, _grad_bias(grad, ctx.bias_dtype, ctx.needs_input_grad[2]), None


llm_int8_matmul_trainable.register_autograd(_trainable_backward, setup_context=_trainable_setup)
