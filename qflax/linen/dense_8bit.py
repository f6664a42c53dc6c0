"""``Dense8bitLt``: LLM.int8 dense layer (bitsandbytes' Linear8bitLt, SPEC §6.3) for Flax Linen."""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qflax import ops
from qflax.quant import int8 as int8_quant
from qflax.quant import validation

Initializer = Callable[..., jax.Array]

QUANTIZED = "quantized"


class Dense8bitLt(nn.Module):
    """A dense layer ``y = x @ W.T + bias`` computed with LLM.int8.

    Two modes, as bitsandbytes' ``has_fp16_weights``:

    * ``has_fp16_weights=False`` (inference): the weight is frozen as an
      :class:`qflax.quant.Int8Rows` (int8 ``(features, in)`` + float32 row absmax, bitsandbytes'
      ``CB``/``SCB``) in the variable collection ``"quantized"`` under the name ``"weight"``.
      Only the bias is in ``"params"``, so ``jax.grad`` over ``variables["params"]`` works.
    * ``has_fp16_weights=True`` (training): a float ``"kernel"`` ``(in, features)`` in
      ``"params"`` (Flax's layout) is quantized on every call; its gradient is the exact
      ``G^T X`` (not bitsandbytes 0.49.2's mis-scaled one).

    Example:
      >>> layer = Dense8bitLt(3072, threshold=6.0)
      >>> variables = layer.init(jax.random.key(0), x)       # {"params": {"bias"}, "quantized": {"weight"}}
      >>> y = layer.apply(variables, x)

    Attributes:
      features: output features.
      threshold: LLM.int8 outlier threshold (>= 0; 0 disables the mixed-precision path; 6.0
        is bitsandbytes' usual value).
      has_fp16_weights: True for a trainable float weight quantized every call.
      use_bias: whether to add a bias (kept in ``"params"`` in both modes).
      dtype: the dtype to cast inputs to before the matmul (and of the output); None keeps
        the input's dtype.
      param_dtype: dtype of the float kernel and bias.
      kernel_init: initializer of the ``(in, features)`` kernel (the frozen weight is the
        int8 quantization of its transpose).
      bias_init: initializer of the bias.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
    """

    features: int
    threshold: float = 0.0
    has_fp16_weights: bool = False
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.linear.default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    backend: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in)``; returns ``(..., features)`` in ``x``'s dtype (or ``dtype``)."""
        x = validation.check_float_array(x, "x", allow_empty=True)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        in_features = x.shape[-1]
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        if self.has_fp16_weights:
            kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
            return ops.matmul_8bit_trainable(x, kernel.T, bias, threshold=self.threshold, backend=self.backend)
        weight = self.variable(QUANTIZED, "weight", self._init_weight, in_features).value
        return ops.matmul_8bit(x, weight, bias, threshold=self.threshold, backend=self.backend)

    def _init_weight(self, in_features: int) -> int8_quant.Int8Rows:
        kernel = self.kernel_init(self.make_rng("params"), (in_features, self.features), self.param_dtype)
        return int8_quant.quantize_rows(kernel.T)
