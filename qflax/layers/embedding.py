"""Embedding rules shared by the Linen and NNX tables: padding row, max-norm, lookups (docs/embeddings.md)."""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from qflax.layers.checks import check_loaded_weight
from qflax.layers.warn_once import warn_once_per_weight
from qflax.ops.embedding_ids import take_rows
from qflax.quant.fourbit import Packed4bit


def padding_row(padding_idx: Optional[int], num_embeddings: int) -> Optional[int]:
    """``padding_idx`` as a row number in ``[0, num_embeddings)`` (negative counts from the end, as torch).

    Raises:
      TypeError: ``padding_idx`` is neither an int nor None.
      ValueError: it is out of range.
    """
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must lie in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


def check_max_norm(max_norm: Optional[float]) -> None:
    """Raises ValueError unless ``max_norm`` is None or positive."""
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 or None, got {max_norm!r}")


def zero_padding_row(table: jax.Array, row: Optional[int]) -> jax.Array:
    """The freshly drawn ``table`` with its padding row zeroed (bitsandbytes' Embedding init)."""
    return table if row is None else table.at[row].set(0)


def lookup_rows(
    table: jax.Array, ids: Any, row: Optional[int], max_norm: Optional[float], norm_type: float
) -> jax.Array:
    """The rows of a float ``table`` for integer ``ids``, with torch's padding-row and max-norm rules.

    The padding row is looked up as stored but never receives a gradient. torch renormalizes looked-up
    rows of the table in place, outside autograd; here the table is immutable: the looked-up rows are
    scaled, the scale is a constant for the gradient, and the stored table is unchanged.

    Args:
      table: ``(num_embeddings, features)``.
      ids: integer ids of any shape.
      row: the padding row (from :func:`padding_row`) or None.
      max_norm: rows with a larger ``norm_type``-norm are scaled down to it; None: no scaling.
      norm_type: the p of the p-norm.

    Returns:
      ``(*ids.shape, features)`` in the table's dtype; a NaN row for an out-of-range id, eager and
      jitted (:mod:`qflax.ops.embedding_ids`).

    Raises:
      TypeError: non-integer ids.
    """
    ids, rows = take_rows(table, ids)
    if row is not None:
        rows = jnp.where((ids == row)[..., None], jax.lax.stop_gradient(rows), rows)
    if max_norm is not None:
        norms = jnp.linalg.norm(rows.astype(jnp.float32), ord=norm_type, axis=-1, keepdims=True)
        scale = jnp.where(norms > max_norm, max_norm / (norms + 1e-7), 1.0).astype(jnp.float32)
        rows = (rows.astype(jnp.float32) * jax.lax.stop_gradient(scale)).astype(rows.dtype)
    return rows


def checked_4bit_table(owner: str, q: Any, shape: tuple, quant_type: str, blocksize: int) -> Packed4bit:
    """A stored 4-bit table checked against the layer; warns once if its rows straddle absmax blocks.

    Rows straddle blocks when ``features % blocksize != 0``: then lookups decode the whole table.

    Raises:
      TypeError, ValueError: as :func:`qflax.layers.checks.check_loaded_weight`.
    """
    q = check_loaded_weight(owner, q, shape, quant_type, blocksize)
    features = shape[1]
    if features % blocksize != 0:
        warn_once_per_weight(
            q.packed,
            f"Embedding size {features} is not divisible by block size {blocksize}. This will lead to slow inference.",
            stacklevel=5,
        )
    return q
