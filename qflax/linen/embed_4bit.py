"""Flax Linen embedding tables stored in 4 bits: bitsandbytes' Embedding4bit / EmbeddingNF4 / EmbeddingFP4.

Variables: collection "quantized", name "weight": a :class:`~qflax.quant.Packed4bit` of shape
``(num_embeddings, features)``, the whole table flattened row-major and block-quantized, as
bitsandbytes does. Unlike bitsandbytes (whose ``state_dict()`` raises NotImplementedError), the
table exports and loads with the same functions as the Dense layers (``qflax.linen.to_bnb_checkpoint`` /
``from_bnb_checkpoint``).
"""

import functools
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qflax.layers import checks, embedding, variants
from qflax.layers.names import QUANTIZED
from qflax.linen.dense_4bit import missing_weight_error, owner_name
from qflax.ops.embedding_4bit import embed_4bit
from qflax.ops.fourbit_matmul import matmul_4bit
from qflax.quant.fourbit import Packed4bit, quantize_4bit

Initializer = Any
# Flax's nn.Embed default: unit variance per row.
default_embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


class Embed4bit(nn.Module):
    """An embedding table stored as NF4/FP4 codes.

    Lookups decode only the gathered rows when ``features % blocksize == 0``; otherwise blocks
    straddle rows, the whole table is decoded per call, and a UserWarning says so (once per
    table). Out-of-range ids give NaN rows (see :func:`qflax.ops.embed_4bit`).

    Attributes:
      num_embeddings: number of rows.
      features: row width.
      quant_type: "nf4" or "fp4".
      blocksize: elements per absmax block (bitsandbytes uses 64).
      compress_statistics: double-quantize the absmax at init (bitsandbytes' Embedding4bit
        does not: default False). Only affects ``init``.
      param_dtype: dtype of the float table drawn at init; lookups return this dtype.
      embedding_init: initializer of the float table ``(num_embeddings, features)``.
      backend: "auto", "xla", "triton" or None.
    """

    num_embeddings: int
    features: int
    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = False
    param_dtype: Any = jnp.float32
    embedding_init: Initializer = default_embed_init
    backend: Optional[str] = None
    fixed_settings: ClassVar[dict] = {}

    def __post_init__(self):
        variants.check_fixed(type(self), {"quant_type": self.quant_type})
        super().__post_init__()

    def _quantized_table(self) -> Packed4bit:
        table = self.embedding_init(self.make_rng("params"), (self.num_embeddings, self.features), self.param_dtype)
        return quantize_4bit(table, self.blocksize, self.quant_type, self.compress_statistics)

    def setup(self):
        owner = owner_name(self)
        checks.check_4bit_config(owner, self.quant_type, self.blocksize)
        checks.check_positive_int(owner, "num_embeddings", self.num_embeddings)
        checks.check_positive_int(owner, "features", self.features)
        if not self.has_variable(QUANTIZED, "weight") and not self.is_mutable_collection(QUANTIZED):
            raise missing_weight_error(owner)
        self.weight = self.variable(QUANTIZED, "weight", self._quantized_table)

    def table(self) -> Packed4bit:
        """The stored (or, during init, freshly quantized) table, checked against the layer's settings."""
        shape = (self.num_embeddings, self.features)
        return embedding.checked_4bit_table(owner_name(self), self.weight.value, shape, self.quant_type, self.blocksize)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Looks up rows.

        Args:
          inputs: integer ids of any shape.

        Returns:
          ``(*inputs.shape, features)`` in ``param_dtype``; NaN rows for out-of-range ids.

        Raises:
          TypeError: non-integer ids.
          ValueError: the stored table's shape/quant_type/blocksize differs from the layer's.
          KeyError: the variables lack the "quantized" weight.
        """
        return embed_4bit(inputs, self.table(), backend=self.backend)

    def attend(self, query: jax.Array) -> jax.Array:
        """``query @ table.T`` (tied output projection), through :func:`qflax.ops.matmul_4bit`.

        Args:
          query: float array ``(..., features)``.

        Returns:
          ``(..., num_embeddings)`` in the dtype of ``query``.
        """
        return matmul_4bit(query, self.table(), backend=self.backend)


_variant = functools.partial(variants.fixed_variant, module=__name__, defaults=variants.field_defaults)

EmbedNF4, EmbedFP4 = (_variant(Embed4bit, *spec) for spec in variants.FOURBIT_EMBED)
