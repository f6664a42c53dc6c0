"""4-bit NF4/FP4 layers as NNX modules: Dense4bit, DenseNF4, DenseFP4, Embed4bit, EmbedNF4, EmbedFP4.

NNX twins of the Linen modules (SPEC §6.1, §6.10): same arguments (``in_features``/
``out_features`` in place of Linen's ``features``, plus ``rngs``), same variable names, same
ops (:func:`qflax.ops.matmul_4bit`, :func:`qflax.ops.embed_4bit`). The frozen weight is a
:class:`~qflax.quant.Packed4bit` in bitsandbytes' ``(out, in)`` layout inside a
:class:`~qflax.nnx.QuantizedWeight` named "weight"; the bias is an ``nnx.Param``, so QLoRA
trains adapters (and optionally the bias) with ``nnx.Optimizer(model, tx, wrt=...)`` while
the packed bytes never change.
"""

from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from qflax import ops
from qflax.linen.dense_4bit import check_layer_config, check_loaded_weight
from qflax.linen.warn_once import warn_once_per_weight
from qflax.nnx import construction
from qflax.nnx.variables import QuantizedWeight
from qflax.quant import fourbit

Initializer = Callable[..., jax.Array]


class Dense4bit(construction.FromLinear, nnx.Module):
    """A dense layer ``y = x @ W.T + bias`` with a frozen 4-bit weight (bitsandbytes' Linear4bit).

    Args:
      in_features: input features.
      out_features: output features.
      quant_type: "nf4" or "fp4".
      blocksize: elements per absmax block (32 ... 4096).
      compress_statistics: double-quantize the absmax statistics (bitsandbytes' default).
      compute_dtype: dtype of the dequantized weight and of the product; None computes in
        the input's dtype. The output always has the input's dtype.
      use_bias: whether to add a (trainable) bias.
      param_dtype: dtype of the float kernel before quantization (the dequantized weight's
        dtype) and of the bias.
      kernel_init: initializer of the ``(in, out)`` float kernel quantized at construction.
      bias_init: initializer of the bias.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
      rngs: the ``nnx.Rngs`` the parameters are drawn from.

    Example:
      >>> layer = DenseNF4(4096, 4096, rngs=nnx.Rngs(0))
      >>> y = layer(x)
    """

    fixed_quant_type: ClassVar[Optional[str]] = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: Optional[Any] = None,
        use_bias: bool = True,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
        bias_init: Initializer = nnx.initializers.zeros_init(),
        backend: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        if self.fixed_quant_type is not None and quant_type != self.fixed_quant_type:
            raise ValueError(f"{type(self).__name__} fixes quant_type={self.fixed_quant_type!r}; got {quant_type!r}")
        check_layer_config(type(self).__name__, quant_type, blocksize)
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.compute_dtype = compute_dtype
        self.use_bias = use_bias
        self.backend = backend
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        self.weight = QuantizedWeight(construction.quantize_4bit(kernel.T, blocksize, quant_type, compress_statistics))
        self.bias = nnx.data(nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in)``; returns ``(..., out)`` in ``x``'s dtype.

        A float16 input with ``compute_dtype=None`` warns once per layer, as bitsandbytes does.

        Raises:
          TypeError: non-float ``x``.
          ValueError: ``x`` has another number of features than the weight, or the stored
            weight's shape/quant_type/blocksize differs from the layer's.
        """
        owner = type(self).__name__
        q = check_loaded_weight(
            owner, self.weight.get_value(), (self.out_features, self.in_features), self.quant_type, self.blocksize
        )
        bias = None if self.bias is None else self.bias[...]
        x_dtype = getattr(x, "dtype", None)
        if self.compute_dtype is None and x_dtype == jnp.float16 and x.ndim > 0:
            rows = "inference." if x.size == x.shape[-1] else "inference or training speed."
            warn_once_per_weight(
                q.packed,
                f"Input type into {owner} is float16, but compute_dtype is not set (bitsandbytes' "
                f"bnb_4bit_compute_dtype default is float32); pass compute_dtype explicitly. "
                f"This will lead to slow {rows}",
                stacklevel=3,
            )
        return ops.matmul_4bit(x, q, bias, compute_dtype=self.compute_dtype, backend=self.backend)


class DenseNF4(Dense4bit):
    """:class:`Dense4bit` with ``quant_type="nf4"`` (bitsandbytes' LinearNF4)."""

    fixed_quant_type: ClassVar[Optional[str]] = "nf4"

    def __init__(self, in_features: int, out_features: int, *, quant_type: str = "nf4", **kwargs):
        super().__init__(in_features, out_features, quant_type=quant_type, **kwargs)


class DenseFP4(Dense4bit):
    """:class:`Dense4bit` with ``quant_type="fp4"`` (bitsandbytes' LinearFP4)."""

    fixed_quant_type: ClassVar[Optional[str]] = "fp4"

    def __init__(self, in_features: int, out_features: int, *, quant_type: str = "fp4", **kwargs):
        super().__init__(in_features, out_features, quant_type=quant_type, **kwargs)


class Embed4bit(nnx.Module):
    """An embedding table stored in 4 bits (bitsandbytes' Embedding4bit).

    Lookups dequantize only the gathered rows when ``features % blocksize == 0``, otherwise
    the whole table (see :func:`qflax.ops.embed_4bit`).

    Args:
      num_embeddings: number of rows.
      features: embedding size.
      quant_type: "nf4" or "fp4".
      blocksize: elements per absmax block (bitsandbytes uses 64).
      compress_statistics: double-quantize the absmax (bitsandbytes' Embedding4bit does not).
      param_dtype: dtype of the float table before quantization (and of the output).
      embedding_init: initializer of the float table quantized at construction (Flax's
        ``nn.Embed`` default, unit variance per row).
      backend: "auto", "xla", "triton" or None.
      rngs: the ``nnx.Rngs`` the table is drawn from.
    """

    fixed_quant_type: ClassVar[Optional[str]] = None

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = False,
        param_dtype: Any = jnp.float32,
        embedding_init: Initializer = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
        backend: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        if self.fixed_quant_type is not None and quant_type != self.fixed_quant_type:
            raise ValueError(f"{type(self).__name__} fixes quant_type={self.fixed_quant_type!r}; got {quant_type!r}")
        owner = type(self).__name__
        check_layer_config(owner, quant_type, blocksize)
        for name, value in (("num_embeddings", num_embeddings), ("features", features)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
        self.num_embeddings = num_embeddings
        self.features = features
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.backend = backend
        table = embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
        self.weight = QuantizedWeight(construction.quantize_4bit(table, blocksize, quant_type, compress_statistics))

    @classmethod
    def from_embed(cls, embed: nnx.Embed, **options) -> "Embed4bit":
        """A 4-bit table holding the quantization of a float ``nnx.Embed`` table.

        Args:
          embed: the float layer.
          **options: quant_type, blocksize, compress_statistics, backend.
        """
        table = embed.embedding[...]
        return cls(
            embed.num_embeddings,
            embed.features,
            param_dtype=table.dtype,
            embedding_init=lambda *_: table,
            rngs=nnx.Rngs(0),
            **options,
        )

    def table(self) -> fourbit.Packed4bit:
        """The stored table, checked against the layer's settings (warns once if rows straddle blocks)."""
        q = check_loaded_weight(
            type(self).__name__,
            self.weight.get_value(),
            (self.num_embeddings, self.features),
            self.quant_type,
            self.blocksize,
        )
        if self.features % self.blocksize != 0:
            warn_once_per_weight(
                q.packed,
                f"Embedding size {self.features} is not divisible by block size {self.blocksize}. "
                "This will lead to slow inference.",
                stacklevel=4,
            )
        return q

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Looks up integer ``ids`` (any shape); returns ``(*ids.shape, features)`` in the table dtype.

        Out-of-range ids give NaN rows (see :func:`qflax.ops.embed_4bit`).

        Raises:
          TypeError: non-integer ids.
          ValueError: the stored table's shape/quant_type/blocksize differs from the layer's.
        """
        return ops.embed_4bit(ids, self.table(), backend=self.backend)

    def attend(self, query: jax.Array) -> jax.Array:
        """``query @ table.T`` (tied output projection), through :func:`qflax.ops.matmul_4bit`.

        Args:
          query: float array ``(..., features)``.

        Returns:
          ``(..., num_embeddings)`` in the dtype of ``query``.
        """
        return ops.matmul_4bit(query, self.table(), backend=self.backend)


class EmbedNF4(Embed4bit):
    """:class:`Embed4bit` with ``quant_type="nf4"`` (bitsandbytes' EmbeddingNF4)."""

    fixed_quant_type: ClassVar[Optional[str]] = "nf4"

    def __init__(self, num_embeddings: int, features: int, *, quant_type: str = "nf4", **kwargs):
        super().__init__(num_embeddings, features, quant_type=quant_type, **kwargs)


class EmbedFP4(Embed4bit):
    """:class:`Embed4bit` with ``quant_type="fp4"`` (bitsandbytes' EmbeddingFP4)."""

    fixed_quant_type: ClassVar[Optional[str]] = "fp4"

    def __init__(self, num_embeddings: int, features: int, *, quant_type: str = "fp4", **kwargs):
        super().__init__(num_embeddings, features, quant_type=quant_type, **kwargs)
