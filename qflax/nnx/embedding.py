"""Float embedding layers as NNX modules: Embed and StableEmbed (docs/embeddings.md).

NNX twins of :class:`qflax.linen.Embed` / :class:`qflax.linen.StableEmbed`, and like them
bitsandbytes' ``Embedding``, not ``flax.nnx.Embed`` (whose init is unit-variance normal): bitsandbytes'
init (xavier-uniform, zeroed padding row), ``padding_idx`` rows that get no gradient,
``max_norm`` scaling of looked-up rows, and for StableEmbed a float32 LayerNorm (named
"norm") with the output in the table dtype. The table is the ``nnx.Param`` "embedding",
marked with the metadata ``optim_bits=32`` (the NNX form of the Linen modules' "optim_bits"
collection and of bitsandbytes' GlobalOptimManager override): see :func:`optim_32bit_filter`.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from qflax.layers import embedding
from qflax.layers.names import EMBEDDING_OPTIM_BITS, OPTIM_BITS

Initializer = Callable[..., jax.Array]


class Embed(nnx.Module):
    """An embedding table with bitsandbytes' ``Embedding`` init (xavier-uniform, zero padding row).

    Args:
      num_embeddings: number of rows.
      features: embedding size.
      padding_idx: optional row that is zero at init and gets no gradient (negative counts
        from the end).
      max_norm: if set, looked-up rows with a larger ``norm_type``-norm are scaled down to it
        (the stored table is not changed).
      norm_type: the p of the p-norm for ``max_norm``.
      param_dtype: dtype of the table (and of the output).
      embedding_init: initializer of the ``(num_embeddings, features)`` table; default
        xavier-uniform, bound ``sqrt(6 / (num_embeddings + features))``.
      rngs: the ``nnx.Rngs`` the table is drawn from.

    Raises:
      TypeError: ``padding_idx`` is not an int.
      ValueError: ``padding_idx`` out of range or ``max_norm <= 0``.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        param_dtype: Any = jnp.float32,
        embedding_init: Initializer = nnx.initializers.xavier_uniform(),
        rngs: nnx.Rngs,
    ):
        self.padding_row = embedding.padding_row(padding_idx, num_embeddings)
        embedding.check_max_norm(max_norm)
        self.num_embeddings, self.features, self.padding_idx = num_embeddings, features, padding_idx
        self.max_norm, self.norm_type = max_norm, norm_type
        table = embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
        table = embedding.zero_padding_row(table, self.padding_row)
        self.embedding = nnx.Param(table, **{OPTIM_BITS: EMBEDDING_OPTIM_BITS})

    def _lookup(self, ids: jax.Array) -> jax.Array:
        return embedding.lookup_rows(self.embedding[...], ids, self.padding_row, self.max_norm, self.norm_type)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Looks up integer ``ids`` (any shape); returns ``(*ids.shape, features)`` in the table dtype."""
        return self._lookup(ids)


class StableEmbed(Embed):
    """``Embed`` followed by a LayerNorm computed in float32, output in the table dtype (StableEmbedding).

    The LayerNorm "norm" (epsilon 1e-5, scale 1, bias 0 at init) keeps float32 parameters
    whatever ``param_dtype`` is. Arguments as :class:`Embed`.
    """

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, **kwargs):
        super().__init__(num_embeddings, features, rngs=rngs, **kwargs)
        self.norm = nnx.LayerNorm(features, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Looks up ``ids`` and normalizes each row; returns ``(*ids.shape, features)`` in the table dtype."""
        rows = self._lookup(ids)
        return self.norm(rows.astype(jnp.float32)).astype(rows.dtype)


def optim_32bit_filter(path: tuple, variable: nnx.Variable) -> bool:
    """An ``nnx`` filter selecting the tables marked for 32-bit optimizer state (``optim_bits=32``).

    Use it to give embedding tables a float32 optimizer while the rest of the model uses a
    low-precision one, e.g. with ``optax.multi_transform`` over labels built from
    ``nnx.state(model, optim_32bit_filter)``.
    """
    return isinstance(variable, nnx.Param) and getattr(variable, OPTIM_BITS, None) == EMBEDDING_OPTIM_BITS
