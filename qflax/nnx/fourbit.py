"""4-bit NF4/FP4 layers as NNX modules: Dense4bit, DenseNF4, DenseFP4, Embed4bit, EmbedNF4, EmbedFP4.

NNX twins of the Linen modules (docs/fourbit.md#layers): same arguments (``in_features``/
``out_features`` in place of Linen's ``features``, plus ``rngs``), same variable names, same
ops (:func:`qflax.ops.matmul_4bit`, :func:`qflax.ops.embed_4bit`) and the same checks and dtype rules
(:mod:`qflax.layers`). The frozen weight is a :class:`~qflax.quant.Packed4bit` in bitsandbytes'
``(out, in)`` layout inside a :class:`~qflax.nnx.QuantizedWeight` named "weight"; the bias is an
``nnx.Param``, so QLoRA trains adapters (and optionally the bias) with ``nnx.Optimizer(model, tx,
wrt=...)`` while the packed bytes never change.
"""

import functools
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from qflax import ops
from qflax.layers import checks, dtypes, embedding, quantize, variants
from qflax.nnx.construction import DenseParams
from qflax.nnx.variables import QuantizedWeight
from qflax.quant import fourbit

Initializer = Callable[..., jax.Array]


class Dense4bit(DenseParams, nnx.Module):
    """A dense layer ``y = x @ W.T + bias`` with a frozen 4-bit weight (bitsandbytes' Linear4bit).

    Args:
      in_features, out_features: the layer's sizes.
      quant_type: "nf4" or "fp4".
      blocksize: elements per absmax block (32 ... 4096).
      compress_statistics: double-quantize the absmax statistics (bitsandbytes' default).
      compute_dtype: dtype of the dequantized weight and of the product; None computes in
        the input's dtype. The output always has the input's dtype (the 4-bit rule of
        :mod:`qflax.layers.dtypes`).
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
      **dense: ``use_bias``, ``param_dtype`` (of the bias and of the float kernel before
        quantization, the dequantized weight's dtype), ``kernel_init``, ``bias_init`` and ``rngs``,
        as :class:`~qflax.nnx.construction.DenseParams`.

    Example:
      >>> layer = DenseNF4(4096, 4096, rngs=nnx.Rngs(0))
      >>> y = layer(x)
    """

    fixed_settings: ClassVar[dict] = {}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: Optional[Any] = None,
        backend: Optional[str] = None,
        **dense,
    ):
        variants.check_fixed(type(self), {"quant_type": quant_type})
        checks.check_4bit_config(type(self).__name__, quant_type, blocksize)
        kernel = self.init_dense(in_features, out_features, **dense)
        self.quant_type, self.blocksize, self.compress_statistics = quant_type, blocksize, compress_statistics
        self.compute_dtype, self.backend = compute_dtype, backend
        self.weight = QuantizedWeight(quantize.quantize_4bit(kernel.T, blocksize, quant_type, compress_statistics))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in)``; returns ``(..., out)`` in ``x``'s dtype.

        A float16 input with ``compute_dtype=None`` warns once per layer, as bitsandbytes does.

        Raises:
          TypeError: non-float ``x``.
          ValueError: ``x`` has another number of features than the weight, or the stored
            weight's shape/quant_type/blocksize differs from the layer's.
        """
        owner = type(self).__name__
        dtypes.check_4bit_input(owner, x)
        q = self.weight.get_value()
        q = checks.check_dense_4bit_weight(owner, q, x, self.out_features, self.quant_type, self.blocksize)
        compute = dtypes.fourbit_compute_dtype(owner, x, q, self.compute_dtype)
        return ops.matmul_4bit(x, q, self.bias_value(), compute_dtype=compute, backend=self.backend)


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

    fixed_settings: ClassVar[dict] = {}

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        param_dtype: Any = jnp.float32,
        embedding_init: Initializer = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = False,
        backend: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        variants.check_fixed(type(self), {"quant_type": quant_type})
        checks.check_4bit_config(owner, quant_type, blocksize)
        checks.check_positive_int(owner, "num_embeddings", num_embeddings)
        checks.check_positive_int(owner, "features", features)
        self.num_embeddings, self.features = num_embeddings, features
        self.quant_type, self.blocksize, self.compress_statistics = quant_type, blocksize, compress_statistics
        self.backend = backend
        table = embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
        self.weight = QuantizedWeight(quantize.quantize_4bit(table, blocksize, quant_type, compress_statistics))

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
        shape = (self.num_embeddings, self.features)
        owner = type(self).__name__
        return embedding.checked_4bit_table(owner, self.weight.get_value(), shape, self.quant_type, self.blocksize)

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


_variant = functools.partial(variants.fixed_variant, module=__name__, defaults=variants.init_defaults)

DenseNF4, DenseFP4 = (_variant(Dense4bit, *spec) for spec in variants.FOURBIT_DENSE)
EmbedNF4, EmbedFP4 = (_variant(Embed4bit, *spec) for spec in variants.FOURBIT_EMBED)
