"""``Linear8bitLt`` (LLM.int8, docs/int8.md#linear8bitlt), computed by qflax's matmul_8bit ops in JAX."""

import torch
from torch import nn

from qflax.quant import Int8Rows
from torch_compat import bridge, forwards, kernel_layers
from torch_compat.autograd import MatmulLtState, outlier_columns
from torch_compat.nn.checkpoint import Int8Checkpoint
from torch_compat.nn.linear_4bit import check_input_width
from torch_compat.nn.params import Int8Params


class Int8Layer(Int8Checkpoint):
    """What Linear8bitLt and SwitchBackLinearBnb share: the int8 state, its init and the frozen forward."""

    def _init_int8_layer(self, has_fp16_weights: bool, threshold: float) -> None:
        self.state = MatmulLtState()
        self.state.threshold = threshold
        self.state.has_fp16_weights = has_fp16_weights
        if threshold > 0.0 and not has_fp16_weights:
            self.state.use_pool = True
        self.weight = Int8Params(self.weight.data, has_fp16_weights=has_fp16_weights,
                                 requires_grad=has_fp16_weights)
        self._register_load_state_dict_pre_hook(self._check_weight_format)
        self._jax_weight = bridge.WeightCache()

    def init_8bit_state(self) -> None:
        """Moves the quantized weight's CB/SCB into ``state`` (as bitsandbytes' first forward does)."""
        self.state.CB = self.weight.CB
        self.state.SCB = self.weight.SCB
        self.weight.CB = None
        self.weight.SCB = None

    def _int8_weight(self) -> tuple:
        """The frozen int8 weight and its row scales (SCB), quantizing a weight never moved to a device."""
        if self.weight.dtype != torch.int8:
            # Never moved to a device (e.g. built with device=...): quantize now, as bitsandbytes does.
            self.weight._quantize(self.weight.device)
        if self.weight.CB is not None:
            self.init_8bit_state()
        return self.weight, self.state.SCB

    def _int8_rows(self) -> Int8Rows:
        # Keyed on the parameter itself: its _version sees in-place writes such as load_state_dict's copy_.
        weight, scale = self._int8_weight()
        return self._jax_weight.get(
            [weight, scale], lambda: Int8Rows(codes=bridge.to_jax(weight), scale=bridge.to_jax(scale))
        )

    def _int8_forward(self, x: torch.Tensor, frozen_fn, trainable_fn) -> torch.Tensor:
        self.state.is_training = self.training
        check_input_width(x, self.in_features)
        threshold = float(self.state.threshold)
        if self.state.has_fp16_weights:
            op = bridge.jax_op(trainable_fn, threshold=threshold)
            out = bridge.call(op, None, x, self.weight, self.bias)
        else:
            op = bridge.jax_op(frozen_fn, threshold=threshold)
            out = bridge.call(op, self._int8_rows(), x, self.bias)
        if threshold > 0:
            self.state.defer_idx(outlier_columns(x, threshold))
        return out


class Linear8bitLt(Int8Layer, nn.Linear):
    """LLM.int8 linear layer: int8 weights (quantized on the first ``.to(device)``) and int8 activations.

    Args:
      input_features: in_features.
      output_features: out_features.
      bias: whether to learn a bias.
      has_fp16_weights: keep trainable float weights (quantized on every call; the weight
        gradient is the exact ``G^T X``).
      threshold: activation outlier threshold (columns with any ``|x| >= threshold`` go through
        the float path); 0 disables it.
      index: stored, unused (as bitsandbytes).
      device: where the float weight is created.

    Unlike bitsandbytes on CPU, the training and eval modes compute the same thing.
    """

    def __init__(self, input_features, output_features, bias=True, has_fp16_weights=True, threshold=0.0, index=None,
                 device=None):
        super().__init__(input_features, output_features, bias, device)
        self.index = index
        self._init_int8_layer(has_fp16_weights, threshold)

    def to(self, *args, **kwargs):
        result = super().to(*args, **kwargs)
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            if result.state.CB is not None:
                result.state.CB = result.state.CB.to(device)
            if result.state.SCB is not None:
                result.state.SCB = result.state.SCB.to(device)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_width(x, self.in_features)
        direct = kernel_layers.linear_8bit(self, x)  # the Triton kernels on the torch tensors, where they apply
        if direct is not None:
            return direct
        return self._int8_forward(x, forwards.linear_8bit, forwards.linear_8bit_trainable)
