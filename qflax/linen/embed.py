"""Embedding layers: ``Embed``, ``StableEmbed`` and ``Embed8bit`` (docs/embeddings.md).

``Embed`` is bitsandbytes' ``Embedding``, not ``flax.linen.Embed``: xavier-uniform init (Flax's is
unit-variance normal), a zero padding row, ``max_norm`` and the 32-bit optimizer mark; use
``flax.linen.Embed`` for Flax's own. ``Embed`` and ``StableEmbed`` keep a float table in ``"params"``
under ``"embedding"`` and, at init, mark it in the ``"optim_bits"`` collection (value 32), the Flax
counterpart of bitsandbytes' ``GlobalOptimManager`` override: an optimizer set up with
:func:`qflax.linen.optim_32bit.state_labels_32bit` keeps that table's state in float32 even when the
rest of the model uses a low-precision optimizer state. ``Embed8bit`` keeps a frozen row-wise int8
table in ``"quantized"`` under ``"weight"``.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qflax import ops
from qflax.layers import checks, embedding
from qflax.layers.names import EMBEDDING_OPTIM_BITS, OPTIM_BITS, QUANTIZED
from qflax.quant import int8 as int8_quant

Initializer = Callable[..., jax.Array]

TABLE = "embedding"


def _lookup(module: "Embed", ids: jax.Array) -> jax.Array:
    """Creates the table (called from a compact ``__call__``) and returns its rows for ``ids``."""
    row = embedding.padding_row(module.padding_idx, module.num_embeddings)
    embedding.check_max_norm(module.max_norm)

    def init(rng, shape, dtype):
        return embedding.zero_padding_row(module.embedding_init(rng, shape, dtype), row)

    table = module.param(TABLE, init, (module.num_embeddings, module.features), module.param_dtype)
    if module.is_mutable_collection(OPTIM_BITS):
        module.variable(OPTIM_BITS, TABLE, lambda: jnp.array(EMBEDDING_OPTIM_BITS, jnp.int32))
    return embedding.lookup_rows(table, ids, row, module.max_norm, module.norm_type)


class Embed(nn.Module):
    """An embedding table with bitsandbytes' ``Embedding`` init (xavier-uniform, zero padding row).

    Attributes:
      num_embeddings: number of rows.
      features: embedding size.
      padding_idx: optional row that is zero at init and gets no gradient (negative counts
        from the end).
      max_norm: if set, looked-up rows with a larger ``norm_type``-norm are scaled down to it.
      norm_type: the p of the p-norm for ``max_norm``.
      param_dtype: dtype of the table (and of the output).
      embedding_init: initializer of the ``(num_embeddings, features)`` table; the default
        is xavier-uniform, bound ``sqrt(6 / (num_embeddings + features))``.
    """

    num_embeddings: int
    features: int
    padding_idx: Optional[int] = None
    max_norm: Optional[float] = None
    norm_type: float = 2.0
    param_dtype: Any = jnp.float32
    embedding_init: Initializer = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """Looks up integer ``ids`` (any shape); returns ``(*ids.shape, features)`` in the table dtype."""
        return _lookup(self, ids)


class StableEmbed(Embed):
    """``Embed`` followed by a LayerNorm computed in float32, output in the table dtype (bitsandbytes' StableEmbedding).

    The LayerNorm (epsilon 1e-5, scale 1, bias 0 at init) keeps float32 parameters whatever
    ``param_dtype`` is (bitsandbytes' ``dtype`` argument fails with a TypeError; ours works).
    """

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """Looks up ``ids`` and normalizes each row; returns ``(*ids.shape, features)`` in the table dtype."""
        rows = _lookup(self, ids)
        normed = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name="norm")(
            rows.astype(jnp.float32)
        )
        return normed.astype(rows.dtype)


class Embed8bit(nn.Module):
    """An embedding table stored as row-wise int8 (bitsandbytes' Embedding8bit).

    The table is an :class:`qflax.quant.Int8Rows` (int8 ``(num_embeddings, features)`` and
    float32 row absmax) in the ``"quantized"`` collection under ``"weight"``; a float table
    converts with ``qflax.quant.quantize_rows(table)``. Each looked-up row is dequantized as
    ``codes * absmax / 127`` (error at most absmax / 254).

    Attributes:
      num_embeddings: number of rows.
      features: embedding size.
      dtype: output dtype.
      embedding_init: initializer of the float table that is quantized at init (torch's
        ``nn.Embedding`` default, N(0, 1)).
      backend: "auto", "xla", "triton" or None.
    """

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
    backend: Optional[str] = None

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """Looks up integer ``ids`` (any shape); returns ``(*ids.shape, features)`` in ``dtype``."""
        weight = self.variable(QUANTIZED, "weight", self._init_weight).value
        checks.check_int8_table(weight, self.num_embeddings, self.features)
        return ops.embed_8bit(ids, weight, dtype=self.dtype, backend=self.backend)

    def _init_weight(self) -> int8_quant.Int8Rows:
        table = self.embedding_init(self.make_rng("params"), (self.num_embeddings, self.features), jnp.float32)
        return int8_quant.quantize_rows(table)
