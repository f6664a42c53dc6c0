"""``qflax::matmul_4bit`` and ``qflax::grad_input_4bit``: the 4-bit Triton kernels as torch custom ops.

Each op runs the very launch the JAX side builds (``qflax_kernels.fourbit_launch``: same plan,
same argument order, split-K reduced inside the kernel against a zero-filled counter) with
Triton's launcher on the torch tensors, on the current stream. Nothing reads device memory on
the host and every output is allocated by torch, so torch.compile (``fullgraph=True``) keeps
the ops in its graph and CUDA graphs capture them. Fake implementations give the output
shapes; the autograd formula of ``matmul_4bit`` (input gradient through ``grad_input_4bit``,
bias gradient summed in float32) is the one of ``qflax.ops.matmul_4bit``.

The weight arrives in bitsandbytes' layout as the kernels read it (see
:mod:`torch_compat.cuda_weights`): flat packed bytes, the absmax (float32, or uint8 codes when
double-quantized), the float32 code table, and with double quantization the float32 nested
map, nested absmax and the offset as a (1,) tensor.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from qflax_kernels import fourbit_launch
from torch_compat import kernel_launch


@functools.lru_cache(maxsize=4096)
def _matmul_launch(m: int, n: int, k: int, blocksize: int, dtype: str, nested: bool, has_bias: bool, sms: int):
    return fourbit_launch.matmul_launch(m, n, k, blocksize, x_dtype=dtype, nested=nested, has_bias=has_bias,
                                        sm_count=sms)


@functools.lru_cache(maxsize=4096)
def _grad_input_launch(m: int, n: int, k: int, blocksize: int, dtype: str, nested: bool):
    return fourbit_launch.grad_input_launch(m, n, k, blocksize, g_dtype=dtype, nested=nested)


def matmul_launch_for(x: Tensor, out_features: int, blocksize: int, nested: bool, has_bias: bool):
    """The forward launch :func:`matmul_4bit_body` runs for a 2-D ``x`` (the same cached object)."""
    m, k = x.shape
    return _matmul_launch(m, out_features, k, blocksize, kernel_launch.dtype_name(x.dtype), nested, has_bias,
                          kernel_launch.sm_count(x.device))


def matmul_4bit_body(x: Tensor, packed: Tensor, absmax: Tensor, quant_map: Tensor, nested_map: Optional[Tensor],
                nested_absmax: Optional[Tensor], nested_offset: Optional[Tensor], bias: Optional[Tensor],
                out_features: int, blocksize: int) -> Tensor:
    """``x @ W.T (+ bias)`` for a 2-D contiguous ``x (M, K)``, computed and returned in x's dtype.

    Args:
      x: (M, K) float16/bfloat16/float32, contiguous.
      packed: flat uint8 packed codes of W (out_features, K).
      absmax: float32 per-block absmax, or uint8 codes when ``nested_absmax`` is given.
      quant_map: float32 (16,) code table.
      nested_map, nested_absmax, nested_offset: double-quantization statistics (float32
        (256,), (blocks / 256,), (1,)), or None.
      bias: optional (out_features,), any float dtype (added in float32 before the rounding).
      out_features: N, the weight's rows.
      blocksize: 64 or 128.

    Returns:
      (M, out_features) of x's dtype.
    """
    x = x.contiguous()  # a no-op for the callers; a compiler may hand over other strides
    m, k = x.shape
    if m == 0:
        return x.new_empty((0, out_features))
    launch = matmul_launch_for(x, out_features, blocksize, nested_absmax is not None, bias is not None)
    weight = fourbit_launch.weight_inputs(packed, absmax, quant_map, nested_map, nested_absmax, nested_offset)
    out, _, _ = kernel_launch.run(launch, fourbit_launch.matmul_inputs(x, weight, bias))
    return out


matmul_4bit = torch.library.custom_op("qflax::matmul_4bit", matmul_4bit_body, mutates_args=())


@matmul_4bit.register_fake
def _matmul_4bit_fake(x, packed, absmax, quant_map, nested_map, nested_absmax, nested_offset, bias, out_features,
                      blocksize):
    return x.new_empty((x.shape[0], out_features))


def grad_input_4bit_body(g: Tensor, packed: Tensor, absmax: Tensor, quant_map: Tensor, nested_map: Optional[Tensor],
                    nested_absmax: Optional[Tensor], nested_offset: Optional[Tensor], in_features: int,
                    blocksize: int) -> Tensor:
    """``g @ W`` (the input gradient of ``x @ W.T``) for a 2-D contiguous ``g (M, N)``, in g's dtype.

    Args:
      g: (M, N) float16/bfloat16/float32, contiguous.
      packed, absmax, quant_map, nested_*: the weight, as in :func:`matmul_4bit`.
      in_features: K, the weight's columns.
      blocksize: 64 or 128.

    Returns:
      (M, in_features) of g's dtype.
    """
    g = g.contiguous()
    m, n = g.shape
    if m == 0:
        return g.new_empty((0, in_features))
    launch = _grad_input_launch(m, n, in_features, blocksize, kernel_launch.dtype_name(g.dtype),
                                nested_absmax is not None)
    weight = fourbit_launch.weight_inputs(packed, absmax, quant_map, nested_map, nested_absmax, nested_offset)
    (out,) = kernel_launch.run(launch, [g, *weight])
    return out


grad_input_4bit = torch.library.custom_op("qflax::grad_input_4bit", grad_input_4bit_body, mutates_args=())


@grad_input_4bit.register_fake
def _grad_input_4bit_fake(g, packed, absmax, quant_map, nested_map, nested_absmax, nested_offset, in_features,
                          blocksize):
    return g.new_empty((g.shape[0], in_features))


def _setup_context(ctx, inputs, output):
    x, packed, absmax, quant_map, nested_map, nested_absmax, nested_offset, bias, _, blocksize = inputs
    # Only the weight (already resident) is kept for the backward pass: no activation, no float W.
    ctx.save_for_backward(packed, absmax, quant_map, nested_map, nested_absmax, nested_offset)
    ctx.in_features, ctx.blocksize = x.shape[1], blocksize
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    weight = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.qflax.grad_input_4bit(grad.contiguous(), *weight, ctx.in_features, ctx.blocksize)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[7]:
        # As qflax.ops.matmul_4bit: G (in the compute dtype) summed in float32, then the bias dtype.
        grad_bias = grad.float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, None, grad_bias, None, None


matmul_4bit.register_autograd(_backward, setup_context=_setup_context)
