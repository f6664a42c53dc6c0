"""``Dense8bitLt``: LLM.int8 dense layer (bitsandbytes' Linear8bitLt, docs/int8.md#linear8bitlt) for Flax Linen."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qflax import ops
from qflax.layers import dtypes, quantize
from qflax.layers.names import QUANTIZED
from qflax.linen.dense_params import DenseParams
from qflax.quant import int8 as int8_quant
from qflax.quant import validation


class Dense8bitLt(DenseParams):
    """A dense layer ``y = x @ W.T + bias`` computed with LLM.int8.

    Two modes, as bitsandbytes' ``has_fp16_weights`` (default False here, True in bitsandbytes and
    torch_compat: a qflax layer is a frozen inference/QLoRA layer unless asked, like Dense4bit, and
    ``quantize_params``/``quantize_model`` produce frozen ones):

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

    Attributes (besides :class:`~qflax.linen.dense_params.DenseParams`'; the frozen weight is the int8
    quantization of the transposed kernel ``kernel_init`` draws, and the bias stays in ``"params"`` in
    both modes):
      threshold: LLM.int8 outlier threshold (>= 0; 0 disables the mixed-precision path; 6.0
        is bitsandbytes' usual value).
      has_fp16_weights: True for a trainable float weight quantized every call.
      dtype: the dtype to cast inputs to before the matmul (and of the output); None keeps
        the input's dtype (the Flax rule of :mod:`qflax.layers.dtypes`).
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
    """

    threshold: float = 0.0
    has_fp16_weights: bool = False
    dtype: Optional[Any] = None
    backend: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in)``; returns ``(..., features)`` in ``x``'s dtype (or ``dtype``)."""
        x = dtypes.flax_dtype_input(x, self.dtype)
        in_features = x.shape[-1]
        bias = self.declare_bias()
        if self.has_fp16_weights:
            kernel = self.declare_kernel(in_features)
            return ops.matmul_8bit_trainable(x, kernel.T, bias, threshold=self.threshold, backend=self.backend)
        weight = self.variable(QUANTIZED, "weight", self._init_weight, in_features).value
        return ops.matmul_8bit(x, weight, bias, threshold=self.threshold, backend=self.backend)

    def _init_weight(self, in_features: int) -> int8_quant.Int8Rows:
        return int8_quant.quantize_rows(self.draw_kernel(in_features).T)


def int8_weight_from_kernel(kernel: Any) -> int8_quant.Int8Rows:
    """The frozen Dense8bitLt weight of a float Flax kernel ``(in, out)``: ``quantize_rows(kernel.T)``.

    Raises:
      TypeError: ``kernel`` is not a float array.
      ValueError: ``kernel`` is not 2-D.
    """
    kernel = validation.check_float_array(kernel, "kernel")
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be 2-D (in_features, out_features), got shape {tuple(kernel.shape)}")
    return quantize.quantize_rows(kernel.T, "kernel")


def dense_kernel_from_int8(weight: int8_quant.Int8Rows, dtype: Any = jnp.float32) -> jax.Array:
    """The float Flax kernel ``(in, out)`` of a frozen weight: ``dequant(weight).T`` in ``dtype``."""
    return int8_quant.int8_vectorwise_dequant(weight.codes, weight.scale).T.astype(dtype)
