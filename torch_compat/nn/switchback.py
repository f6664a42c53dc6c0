"""SwitchBack int8 training layers (docs/switchback.md) and StandardLinear, computed by qflax's SwitchBack ops.

Unlike bitsandbytes 0.49.2 these work without Triton (the XLA path runs anywhere), return
the input dtype instead of always fp16, and vector-wise + mem_efficient raises ValueError
instead of exiting the process. ``SwitchBackLinearBnb`` implements its intended semantics
(bitsandbytes' forward raises AttributeError).
"""

from functools import partial

import torch
from torch import nn

from qflax import quant
from torch_compat import bridge, forwards
from torch_compat.nn.linear_4bit import check_input_width
from torch_compat.nn.linear_8bit import Int8Layer


class SwitchBackLinear(nn.Linear):
    """Linear layer whose forward and input gradient use int8 matmuls and whose weight gradient is full precision.

    Args:
      in_features, out_features, bias, device, dtype: as ``torch.nn.Linear``.
      vector_wise_quantization: per-output-row weight scales (else one global scale).
      mem_efficient: save only the int8 input for the backward (global scales only).

    Raises:
      ValueError: ``vector_wise_quantization`` together with ``mem_efficient``.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 vector_wise_quantization=False, mem_efficient=False):
        if vector_wise_quantization and mem_efficient:
            raise ValueError(
                "mem_efficient=True is not supported with vector_wise_quantization=True; "
                "allowed: vector-wise, global, or global with mem_efficient"
            )
        super().__init__(in_features, out_features, bias, device, dtype)
        self.vector_wise_quantization = vector_wise_quantization
        self.mem_efficient = mem_efficient
        if vector_wise_quantization:
            self.variant = "vectorwise"
        else:
            self.variant = "global_mem_efficient" if mem_efficient else "global"

    def prepare_for_eval(self) -> None:
        """Quantizes the weight once into buffers ``W_int8``/``state_W`` and deletes ``weight`` (inference only)."""
        print("=> preparing for eval.")
        weight = bridge.to_jax(self.weight)
        if self.vector_wise_quantization:
            codes, scale = quant.quantize_rowwise(weight)
        else:
            codes, scale = quant.quantize_global(weight)
        self.register_buffer("W_int8", bridge.to_torch(codes))
        self.register_buffer("state_W", bridge.to_torch(scale))
        del self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_width(x, self.in_features)
        if self.training or not hasattr(self, "W_int8"):
            op = bridge.jax_op(forwards.switchback, variant=self.variant)
            return bridge.call(op, None, x, self.weight, self.bias)
        variant = "vectorwise" if self.vector_wise_quantization else "global"
        op = bridge.jax_op(forwards.switchback_prepared, variant=variant)
        weight = (bridge.to_jax(self.W_int8), bridge.to_jax(self.state_W))
        return bridge.call(op, weight, x, self.bias)


SwitchBackLinearGlobal = partial(SwitchBackLinear, vector_wise_quantization=False)
SwitchBackLinearGlobalMemEfficient = partial(SwitchBackLinear, vector_wise_quantization=False, mem_efficient=True)
SwitchBackLinearVectorwise = partial(SwitchBackLinear, vector_wise_quantization=True)


class StandardLinear(nn.Linear):
    """``torch.nn.Linear`` computed through JAX (SwitchBack's full-precision baseline)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_width(x, self.in_features)
        return bridge.call(bridge.jax_op(forwards.standard), None, x, self.weight, self.bias)


class SwitchBackLinearBnb(Int8Layer, nn.Linear):
    """SwitchBack on LLM.int8 primitives: int8 forward with outliers, full-precision weight gradient.

    Args:
      input_features, output_features, bias, device: as ``torch.nn.Linear``.
      has_fp16_weights: trainable float weights (else frozen int8 weights, quantized on ``.to``).
      memory_efficient_backward: stored on the state (no effect).
      threshold: activation outlier threshold, 0 disables outliers.
      index: stored, unused.

    The output has the input's dtype.
    """

    def __init__(self, input_features, output_features, bias=True, has_fp16_weights=True,
                 memory_efficient_backward=False, threshold=0.0, index=None, device=None):
        super().__init__(input_features, output_features, bias, device)
        self.index = index
        self._init_int8_layer(has_fp16_weights, threshold)
        self.state.memory_efficient_backward = memory_efficient_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._int8_forward(x, forwards.linear_8bit, forwards.switchback_bnb)
