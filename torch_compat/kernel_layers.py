"""The direct-path forwards of Linear4bit and Linear8bitLt: the ``qflax::`` kernel ops on the layer's tensors.

Each function returns the layer's output when :func:`torch_compat.direct_path.use_kernel` picks the
kernels, else None (the layer then computes through JAX by DLPack). They reproduce the dtype rules
of the JAX forwards in :mod:`torch_compat.forwards`: Linear4bit computes in its compute dtype and
returns the input dtype with its bias added in float32 inside the kernel; Linear8bitLt computes in
the input dtype with the bias cast to it first.
"""

from typing import Optional

import torch

from qflax_kernels import fourbit_launch, torch_launch
from torch_compat import cuda_weights, direct_path, fourbit_ops, int8_ops
from torch_compat.autograd import outlier_columns
from torch_compat.kernel_launch import body_suffices, call, dtype_name


def _dtype(dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).replace("torch.", ""))


class _EagerPlan4bit:
    """What the last plain eager ``linear_4bit`` call of a layer decided, replayed while the next call looks the same.

    A host-bound decode step spends most of a layer call in Python: the support and policy
    checks, the launch lookup and the generic launcher plumbing. The plan keeps their outcome
    (the launch) and is valid while x has the same shape, dtype and device, the layer the same
    weight, QuantState, bias and compute dtype, and the same backend is asked for; a call that
    needs the custom op (autograd, torch.compile, a mode) never uses it. The weight views still
    come from ``cuda_weights`` each call, whose cache sees replaced tensors and in-place writes.
    """

    __slots__ = ("shape", "dtype", "device", "weight", "state", "absmax", "bias", "compute_attr", "compute",
                 "backend", "launch", "k", "n", "poison")

    def __init__(self, layer, x, compute, backend, launch, k, n):
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.weight, self.state, self.bias = layer.weight, layer.weight.quant_state, layer.bias
        self.absmax, self.compute_attr, self.compute = self.state.absmax, layer.compute_dtype, compute
        self.backend, self.launch, self.k, self.n = backend, launch, k, n
        self.poison = x.device.type == "cpu"  # the interpreter: unwritten outputs show, as in kernel_launch.run

    def __reduce__(self):
        # Derived data, like the weight caches: a copied or pickled layer starts without a plan.
        return _no_plan, ()

    def matches(self, layer, x) -> bool:
        weight = layer.weight
        return (x.shape == self.shape and x.dtype == self.dtype and x.device == self.device
                and weight is self.weight and weight.quant_state is self.state and self.state.absmax is self.absmax
                and layer.bias is self.bias and layer.compute_dtype is self.compute_attr
                and (x.device.type != "cuda" or x.device.index in (None, torch.cuda.current_device()))
                and body_suffices(x, self.bias) and direct_path._requested_backend() == self.backend)

    def run(self, layer, x) -> torch.Tensor:
        x2 = x.reshape(-1, self.k)
        if x2.dtype != self.compute:
            x2 = x2.to(self.compute)
        weight = fourbit_launch.weight_inputs(*cuda_weights.fourbit_weight(layer))
        outputs = torch_launch.allocate_outputs(self.launch, x.device, poison=self.poison)
        torch_launch.launch_into(self.launch, fourbit_launch.matmul_inputs(x2.contiguous(), weight, self.bias),
                                 outputs)
        direct_path._record(direct_path.LINEAR_4BIT, direct_path.KERNEL)
        out = outputs[0].reshape(*x.shape[:-1], self.n)
        return out if out.dtype == x.dtype else out.to(x.dtype)


def _no_plan() -> None:
    return None


def linear_4bit(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``Linear4bit.forward`` through ``qflax::matmul_4bit``, or None where the DLPack path applies.

    Args:
      layer: a Linear4bit whose input width and compute dtype were already checked and set.
      x: the input ``(..., in_features)``.

    Returns:
      ``(..., out_features)`` of x's dtype, or None.
    """
    plan = layer.__dict__.get("_eager_plan")
    if plan is not None and plan.matches(layer, x):
        return plan.run(layer, x)
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
    weight = cuda_weights.fourbit_weight(layer)
    out = call(torch.ops.qflax.matmul_4bit, fourbit_ops.matmul_4bit_body, x2.contiguous(), *weight, layer.bias, n,
               blocksize)
    if body_suffices(x, layer.bias) and not torch.compiler.is_compiling():
        launch = fourbit_ops.matmul_launch_for(x2, n, blocksize, weight.nested_absmax is not None,
                                               layer.bias is not None)
        layer.__dict__["_eager_plan"] = _EagerPlan4bit(layer, x, compute, direct_path._requested_backend(), launch,
                                                       k, n)
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
    sets_idx = threshold > 0 and not torch.compiler.is_compiling() and not _capturing(x)
    listed = None  # the quantizer kernel's (columns, count), where the op's body ran here
    if trainable:
        out = call(torch.ops.qflax.llm_int8_matmul_trainable, int8_ops.llm_int8_matmul_trainable_body, x2,
                   weight.contiguous(), bias, threshold)
    else:
        codes, scale = cuda_weights.int8_weight(layer, *layer._int8_weight())
        if sets_idx and body_suffices(x2, codes, scale, bias):
            # Plain eager code: the op's body, whose quantizer also lists the outlier columns for idx.
            out, *listed = int8_ops.llm_int8_with_outliers(x2, codes, scale, bias, threshold)
        else:
            out = call(torch.ops.qflax.llm_int8_matmul, int8_ops.llm_int8_matmul_body, x2, codes, scale, bias,
                       threshold)
    if sets_idx:
        layer.state.defer_idx(*(listed or (outlier_columns(x, threshold),)))
    return out.reshape(*x.shape[:-1], n)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()
