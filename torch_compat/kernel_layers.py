"""The direct-path forwards of Linear4bit and Linear8bitLt: the ``qflax::`` kernel ops on the layer's tensors.

Each function returns the layer's output when :func:`torch_compat.direct_path.use_kernel` picks the
kernels, else None (the layer then computes through JAX by DLPack). They reproduce the dtype rules
of the JAX forwards in :mod:`torch_compat.forwards`: Linear4bit computes in its compute dtype and
returns the input dtype with its bias added in float32 inside the kernel; Linear8bitLt computes in
the input dtype with the bias cast to it first.
"""

from typing import Optional

import torch

from torch_compat import cuda_weights, direct_path, fourbit_ops, int8_ops
from torch_compat.autograd import outlier_columns
from torch_compat.kernel_launch import body_suffices, call, dtype_name


def _dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).replace("torch.", ""))


def linear_4bit(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``Linear4bit.forward`` through ``qflax::matmul_4bit``, or None where the DLPack path applies.

    Args:
      layer: a Linear4bit whose input width and compute dtype were already checked and set.
      x: the input ``(..., in_features)``.

    Returns:
      ``(..., out_features)`` of x's dtype, or None.
    """
    state = getattr(layer.weight, "quant_state", None)
    # The state's device is the weight's (they move together); a plain tensor's is cheaper to read.
    if state is None or state.shape is None or len(state.shape) != 2 or state.absmax.device != x.device:
        return None
    compute = x.dtype if layer.compute_dtype is None else _dtype(layer.compute_dtype)
    name = dtype_name(compute)
    n, k = int(state.shape[0]), int(state.shape[1])
    blocksize = int(state.blocksize)
    rows = x.numel() // k
    supported = rows > 0 and not direct_path.fourbit_unsupported(
        n, k, blocksize, name, state.code.numel(), int(state.state2.blocksize) if state.nested else 0)
    faster = rows <= direct_path.fourbit_max_rows(n, name)
    if not direct_path.use_kernel(direct_path.LINEAR_4BIT, x.device, name, supported, faster):
        return None
    x2 = x.reshape(-1, k)
    if x2.dtype != compute:
        x2 = x2.to(compute)
    out = call(torch.ops.qflax.matmul_4bit, fourbit_ops.matmul_4bit_body, x2.contiguous(),
               *cuda_weights.fourbit_weight(layer), layer.bias, n, blocksize)
    out = out.reshape(*x.shape[:-1], n)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def linear_8bit(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``Linear8bitLt.forward`` (LLM.int8) through the ``qflax::`` int8 ops, or None where DLPack applies.

    Sets ``state.is_training`` and, with a threshold, ``state.idx`` (the outlier columns, found on
    the device and read on the host only when ``idx`` is read; not set under torch.compile and
    CUDA-graph capture), as the JAX path does.

    Args:
      layer: a Linear8bitLt whose input width was already checked.
      x: the input ``(..., in_features)``.

    Returns:
      ``(..., out_features)`` of x's dtype, or None.
    """
    layer.state.is_training = layer.training
    n, k = layer.out_features, layer.in_features
    name = dtype_name(x.dtype)
    trainable = layer.state.has_fp16_weights
    weight = layer.weight
    if weight.device != x.device or (trainable and not weight.is_floating_point()):
        return None
    supported = x.numel() > 0 and not direct_path.int8_unsupported(name, k, n)
    if not direct_path.use_kernel(direct_path.LINEAR_8BIT, x.device, name, supported, True):
        return None
    threshold = float(layer.state.threshold)
    x2 = x.reshape(-1, k).contiguous()
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    if trainable:
        out = call(torch.ops.qflax.llm_int8_matmul_trainable, int8_ops.llm_int8_matmul_trainable_body, x2,
                   weight.contiguous(), bias, threshold)
        if threshold > 0 and not torch.compiler.is_compiling() and not _capturing(x):
            layer.state.defer_idx(outlier_columns(x, threshold))
    else:
        codes, scale = cuda_weights.int8_weight(layer, *layer._int8_weight())
        if threshold > 0 and body_suffices(x2, codes, scale, bias) and not _capturing(x):
            # Plain eager code: the op's body, whose quantizer also lists the outlier columns for idx.
            out, columns, count = int8_ops.llm_int8_with_outliers(x2, codes, scale, bias, threshold)
            layer.state.defer_idx(columns, count)
        else:
            out = call(torch.ops.qflax.llm_int8_matmul, int8_ops.llm_int8_matmul_body, x2, codes, scale, bias,
                       threshold)
            if threshold > 0 and not torch.compiler.is_compiling() and not _capturing(x):
                layer.state.defer_idx(outlier_columns(x, threshold))
    return out.reshape(*x.shape[:-1], n)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()
