"""LLM.int8 layers as NNX modules: Dense8bitLt and Embed8bit (docs/int8.md, docs/embeddings.md).

NNX twins of the Linen modules in :mod:`qflax.linen`: same arguments (``in_features``/
``out_features`` in place of Linen's ``features``, plus ``rngs``), same variable names, same
ops. The frozen int8 weight is an :class:`~qflax.quant.Int8Rows` in a
:class:`~qflax.nnx.QuantizedWeight` named "weight"; the bias (and the float kernel with
``has_fp16_weights=True``) are ``nnx.Param``.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from qflax import ops
from qflax.layers import checks, dtypes, quantize
from qflax.nnx.construction import DenseParams
from qflax.nnx.variables import QuantizedWeight

Initializer = Callable[..., jax.Array]


class Dense8bitLt(DenseParams, nnx.Module):
    """A dense layer ``y = x @ W.T + bias`` computed with LLM.int8 (bitsandbytes' Linear8bitLt).

    * ``has_fp16_weights=False`` (inference, the default here; bitsandbytes' default is True, see the
      Linen twin): the weight is frozen, int8 ``(out, in)`` codes plus float32 row absmax
      (bitsandbytes' ``CB``/``SCB``), in :class:`QuantizedWeight` "weight"; ``nnx.grad`` and
      ``nnx.Optimizer(..., wrt=nnx.Param)`` see only the bias.
    * ``has_fp16_weights=True`` (training): a float ``nnx.Param`` "kernel" ``(in, out)``,
      quantized on every call; its gradient is the exact ``G^T X``.

    Args:
      in_features, out_features: the layer's sizes.
      threshold: LLM.int8 outlier threshold (>= 0; 0 disables the mixed-precision path).
      has_fp16_weights: True for a trainable float weight quantized every call.
      dtype: the dtype inputs are cast to before the matmul (and of the output); None keeps
        the input's dtype (the Flax rule of :mod:`qflax.layers.dtypes`).
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
      **dense: ``use_bias``, ``param_dtype``, ``kernel_init`` (the frozen weight is the int8
        quantization of the transposed kernel), ``bias_init`` and ``rngs``, as
        :class:`~qflax.nnx.construction.DenseParams`.

    Example:
      >>> layer = Dense8bitLt(1024, 3072, threshold=6.0, rngs=nnx.Rngs(0))
      >>> y = layer(x)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        threshold: float = 0.0,
        has_fp16_weights: bool = False,
        dtype: Optional[Any] = None,
        backend: Optional[str] = None,
        **dense,
    ):
        kernel = self.init_dense(in_features, out_features, **dense)
        self.threshold, self.has_fp16_weights, self.dtype, self.backend = threshold, has_fp16_weights, dtype, backend
        if has_fp16_weights:
            self.kernel = nnx.Param(kernel)
        else:
            self.weight = QuantizedWeight(quantize.quantize_rows(kernel.T))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in)``; returns ``(..., out)`` in ``x``'s dtype (or ``dtype``)."""
        x = dtypes.flax_dtype_input(x, self.dtype)
        bias = self.bias_value()
        if self.has_fp16_weights:
            kernel = self.kernel[...]
            return ops.matmul_8bit_trainable(x, kernel.T, bias, threshold=self.threshold, backend=self.backend)
        return ops.matmul_8bit(x, self.weight.get_value(), bias, threshold=self.threshold, backend=self.backend)


class Embed8bit(nnx.Module):
    """An embedding table stored as row-wise int8 (bitsandbytes' Embedding8bit).

    The table is an :class:`~qflax.quant.Int8Rows` (int8 ``(num_embeddings, features)`` and
    float32 row absmax) in :class:`QuantizedWeight` "weight". Each looked-up row is
    dequantized as ``codes * absmax / 127``.

    Args:
      num_embeddings: number of rows.
      features: embedding size.
      dtype: output dtype.
      embedding_init: initializer of the float table quantized at construction (torch's
        ``nn.Embedding`` default, N(0, 1)).
      backend: "auto", "xla", "triton" or None.
      rngs: the ``nnx.Rngs`` the table is drawn from.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any = jnp.float32,
        embedding_init: Initializer = nnx.initializers.normal(stddev=1.0),
        backend: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        self.num_embeddings, self.features, self.dtype, self.backend = num_embeddings, features, dtype, backend
        table = embedding_init(rngs.params(), (num_embeddings, features), jnp.float32)
        self.weight = QuantizedWeight(quantize.quantize_rows(table))

    @classmethod
    def from_embed(cls, embed: nnx.Embed, **options) -> "Embed8bit":
        """An Embed8bit holding the int8 quantization of a float ``nnx.Embed`` table.

        Args:
          embed: the float layer.
          **options: dtype (default: the table's dtype), backend.
        """
        table = embed.embedding[...]
        options.setdefault("dtype", table.dtype)
        return cls(
            embed.num_embeddings,
            embed.features,
            embedding_init=lambda *_: table,
            rngs=nnx.Rngs(0),
            **options,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Looks up integer ``ids`` (any shape); returns ``(*ids.shape, features)`` in ``dtype``."""
        weight = self.weight.get_value()
        checks.check_int8_table(weight, self.num_embeddings, self.features)
        return ops.embed_8bit(ids, weight, dtype=self.dtype, backend=self.backend)
