"""``Linear4bit`` (QLoRA), ``LinearFP4``, ``LinearNF4`` (docs/fourbit.md#linear4bit), run by qflax's matmul_4bit."""

import warnings

import torch
from torch import nn

from torch_compat import bridge, forwards, kernel_layers
from torch_compat.nn.checkpoint import FourBitCheckpoint
from torch_compat.nn.params import Params4bit, check_quant_type


def check_input_width(x: torch.Tensor, in_features: int) -> None:
    """Raises RuntimeError (torch's type for a shape mismatch) unless ``x.shape[-1] == in_features``."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise RuntimeError(
            f"input must have in_features={in_features} as its last dimension, got shape {tuple(x.shape)}"
        )


class Linear4bit(FourBitCheckpoint, nn.Linear):
    """A linear layer with a 4-bit (NF4/FP4) frozen weight; quantized on the first ``.to(device)``.

    Args:
      input_features: in_features.
      output_features: out_features.
      bias: whether to learn a bias.
      compute_dtype: dtype of the matmul; None takes the first input's dtype (fp32/bf16), or
        keeps fp16 inputs in fp16 with a warning (as bitsandbytes).
      compress_statistics: double-quantize the absmax statistics.
      quant_type: "fp4" or "nf4".
      quant_storage: dtype the packed bytes are stored as.
      device: where the float weight is created (quantization waits for ``.to``).

    The output has the input's dtype; gradients flow to the input and the bias only.
    """

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_type="fp4", quant_storage=torch.uint8, device=None):
        check_quant_type(quant_type)
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data, requires_grad=False, compress_statistics=compress_statistics, quant_type=quant_type,
            quant_storage=quant_storage, module=self,
        )
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state = None
        self.quant_storage = quant_storage
        # bitsandbytes' AVX512-BF16 CPU-packed layout is never used here.
        self.support_avx512bf16_for_cpu = False
        self._jax_weight = bridge.WeightCache()
        self._jax_bias = bridge.WeightCache()
        self._op = self._op_for = None  # the JaxOp of the current compute_dtype

    def _weight_shape(self):
        return (self.out_features, self.in_features)

    def set_compute_type(self, x: torch.Tensor) -> None:
        """Fixes ``compute_dtype`` from the first input, with bitsandbytes' fp16 warnings (no global filter)."""
        if x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype
        elif x.dtype == torch.float16 and self.compute_dtype in (None, torch.float32):
            if x.numel() == x.shape[-1]:
                warnings.warn(
                    "Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 "
                    "(default). This will lead to slow inference.", UserWarning, stacklevel=3,
                )
            else:
                warnings.warn(
                    "Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 "
                    "(default). This will lead to slow inference or training speed.", UserWarning, stacklevel=3,
                )

    def _packed_weight(self):
        weight = self.weight
        state = weight.quant_state
        # Keyed on the parameter itself: its _version sees in-place writes such as load_state_dict's copy_.
        return self._jax_weight.get([weight, *state.tensors()], lambda: state.to_packed4bit(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fix_4bit_weight_quant_state_from_module()
        check_input_width(x, self.in_features)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        direct = kernel_layers.linear_4bit(self, x)  # the Triton kernel on the torch tensors, where it applies
        if direct is not None:
            return direct
        if self._op_for is not self.compute_dtype or self._op is None:
            name = None if self.compute_dtype is None else str(self.compute_dtype).replace("torch.", "")
            self._op, self._op_for = bridge.jax_op(forwards.linear_4bit_layer, compute_dtype=name), self.compute_dtype
        bias = self.bias
        if bias is not None and bias.requires_grad and torch.is_grad_enabled():
            return bridge.call(self._op, (self._packed_weight(), None), x, bias)
        # No gradient for the bias: it travels with the frozen weight, converted once (saves a DLPack import).
        frozen_bias = self._jax_bias.get([bias], lambda: bridge.to_jax(bias))
        return bridge.call(self._op, (self._packed_weight(), frozen_bias), x, None)


class LinearFP4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="fp4"``."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4",
                         quant_storage, device)


class LinearNF4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="nf4"``."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4",
                         quant_storage, device)
