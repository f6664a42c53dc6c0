"""LLM.int8 layers as NNX modules: Dense8bitLt (SPEC §6.3) and Embed8bit (SPEC §6.9).

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
from qflax.nnx import construction
from qflax.nnx.variables import QuantizedWeight
from qflax.quant import validation

Initializer = Callable[..., jax.Array]


class Dense8bitLt(construction.FromLinear, nnx.Module):
    """A dense layer ``y = x @ W.T + bias`` computed with LLM.int8 (bitsandbytes' Linear8bitLt).

    * ``has_fp16_weights=False`` (inference): the weight is frozen, int8 ``(out, in)`` codes
      plus float32 row absmax (bitsandbytes' ``CB``/``SCB``), in :class:`QuantizedWeight`
      "weight"; ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` see only the bias.
    * ``has_fp16_weights=True`` (training): a float ``nnx.Param`` "kernel" ``(in, out)``,
      quantized on every call; its gradient is the exact ``G^T X``.

    Args:
      in_features: input features.
      out_features: output features.
      threshold: LLM.int8 outlier threshold (>= 0; 0 disables the mixed-precision path).
      has_fp16_weights: True for a trainable float weight quantized every call.
      use_bias: whether to add a bias.
      dtype: the dtype inputs are cast to before the matmul (and of the output); None keeps
        the input's dtype.
      param_dtype: dtype of the float kernel (before quantization) and bias.
      kernel_init: initializer of the ``(in, out)`` kernel; the frozen weight is the int8
        quantization of its transpose.
      bias_init: initializer of the bias.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
      rngs: the ``nnx.Rngs`` the parameters are drawn from.

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
        use_bias: bool = True,
        dtype: Optional[Any] = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
        bias_init: Initializer = nnx.initializers.zeros_init(),
        backend: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = threshold
        self.has_fp16_weights = has_fp16_weights
        self.use_bias = use_bias
        self.dtype = dtype
        self.backend = backend
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        if has_fp16_weights:
            self.kernel = nnx.Param(kernel)
        else:
            self.weight = QuantizedWeight(construction.quantize_rows(kernel.T))
        self.bias = nnx.data(nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in)``; returns ``(..., out)`` in ``x``'s dtype (or ``dtype``)."""
        x = validation.check_float_array(x, "x", allow_empty=True)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        bias = None if self.bias is None else self.bias[...]
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
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype
        self.backend = backend
        table = embedding_init(rngs.params(), (num_embeddings, features), jnp.float32)
        self.weight = QuantizedWeight(construction.quantize_rows(table))

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
        if tuple(weight.codes.shape) != (self.num_embeddings, self.features):
            raise ValueError(
                f"the quantized table must have shape ({self.num_embeddings}, {self.features}), "
                f"got {tuple(weight.codes.shape)}"
            )
        return ops.embed_8bit(ids, weight, dtype=self.dtype, backend=self.backend)
