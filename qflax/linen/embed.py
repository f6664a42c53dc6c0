"""Embedding layers: ``Embed``, ``StableEmbed`` (SPEC §6.6, §6.7) and ``Embed8bit`` (SPEC §6.9).

``Embed`` and ``StableEmbed`` keep a float table in ``"params"`` under ``"embedding"`` and, at
init, mark it in the ``"optim_bits"`` collection (value 32), the Flax counterpart of
bitsandbytes' ``GlobalOptimManager`` override: an optimizer set up with
:func:`qflax.linen.optim_32bit.state_labels_32bit` keeps that table's state in float32 even
when the rest of the model uses a low-precision optimizer state. ``Embed8bit`` keeps a
frozen row-wise int8 table in ``"quantized"`` under ``"weight"``.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qflax import ops
from qflax.ops.embedding_ids import take_rows
from qflax.quant import int8 as int8_quant

Initializer = Callable[..., jax.Array]

QUANTIZED = "quantized"
OPTIM_BITS = "optim_bits"
TABLE = "embedding"


def _padding_row(padding_idx: Optional[int], num_embeddings: int) -> Optional[int]:
    """``padding_idx`` as a row number in ``[0, num_embeddings)`` (negative counts from the end, as torch)."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must lie in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


def _lookup(module: "Embed", ids: jax.Array) -> jax.Array:
    """Creates the table (called from a compact ``__call__``) and returns its rows for ``ids``."""
    padding_row = _padding_row(module.padding_idx, module.num_embeddings)
    if module.max_norm is not None and not module.max_norm > 0:
        raise ValueError(f"max_norm must be > 0 or None, got {module.max_norm!r}")

    def init(rng, shape, dtype):
        table = module.embedding_init(rng, shape, dtype)
        return table if padding_row is None else table.at[padding_row].set(0)

    table = module.param(TABLE, init, (module.num_embeddings, module.features), module.param_dtype)
    if module.is_mutable_collection(OPTIM_BITS):
        module.variable(OPTIM_BITS, TABLE, lambda: jnp.array(32, jnp.int32))
    ids, rows = take_rows(table, ids)  # NaN rows for out-of-range ids (qflax.ops.embedding_ids)
    if padding_row is not None:
        # As torch: the padding row is looked up as stored but never receives a gradient.
        rows = jnp.where((ids == padding_row)[..., None], jax.lax.stop_gradient(rows), rows)
    if module.max_norm is not None:
        # torch renormalizes the looked-up rows of the table in place, outside autograd. Here
        # the table is immutable: the looked-up rows are scaled, the scale is a constant for
        # the gradient, and the stored table is unchanged.
        norms = jnp.linalg.norm(rows.astype(jnp.float32), ord=module.norm_type, axis=-1, keepdims=True)
        scale = jnp.where(norms > module.max_norm, module.max_norm / (norms + 1e-7), 1.0).astype(jnp.float32)
        rows = (rows.astype(jnp.float32) * jax.lax.stop_gradient(scale)).astype(rows.dtype)
    return rows


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
        if tuple(weight.codes.shape) != (self.num_embeddings, self.features):
            raise ValueError(
                f"the quantized table must have shape ({self.num_embeddings}, {self.features}), "
                f"got {tuple(weight.codes.shape)}"
            )
        return ops.embed_8bit(ids, weight, dtype=self.dtype, backend=self.backend)

    def _init_weight(self) -> int8_quant.Int8Rows:
        table = self.embedding_init(self.make_rng("params"), (self.num_embeddings, self.features), jnp.float32)
        return int8_quant.quantize_rows(table)
