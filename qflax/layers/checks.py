"""Setting and weight checks of the Linen and NNX layers: every error names the layer and what is allowed."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qflax.ops.fourbit_matmul import check_packed_weight
from qflax.quant import codebooks, validation
from qflax.quant.fourbit import Packed4bit


def check_4bit_config(owner: str, quant_type: str, blocksize: int) -> None:
    """Raises ValueError naming ``owner`` when ``quant_type`` or ``blocksize`` is unsupported."""
    validation.check_choice(quant_type, codebooks.QUANT_TYPES, f"{owner} quant_type")
    validation.check_choice(blocksize, validation.BLOCKSIZES_4BIT, f"{owner} blocksize")


def check_positive_int(owner: str, name: str, value: Any) -> None:
    """Raises ValueError unless ``value`` is a positive int (bools are not counts)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def check_loaded_weight(owner: str, q: Any, shape: tuple, quant_type: str, blocksize: int) -> Packed4bit:
    """Checks that a stored 4-bit weight is what the layer declares, and returns it.

    Args:
      owner: the layer, for messages (e.g. "DenseNF4(encoder/fc)").
      q: the stored weight.
      shape: the shape the layer needs, e.g. ``(out_features, in_features)``.
      quant_type: the layer's quant type.
      blocksize: the layer's blocksize.

    Returns:
      ``q``.

    Raises:
      TypeError: ``q`` is not a Packed4bit.
      ValueError: its shape, quant type or blocksize differs from the layer's.
    """
    q = check_packed_weight(q, f"{owner} weight")
    if tuple(q.shape) != tuple(shape):
        raise ValueError(f"{owner}: the quantized weight has shape {q.shape}, but this layer needs {tuple(shape)}")
    if q.quant_type != quant_type:
        raise ValueError(
            f"{owner}: the quantized weight is {q.quant_type!r} but the layer's quant_type is {quant_type!r}"
        )
    if q.blocksize != blocksize:
        raise ValueError(f"{owner}: the quantized weight has blocksize {q.blocksize}, the layer expects {blocksize}")
    return q


def check_dense_4bit_weight(owner: str, q: Any, x: jax.Array, out_features: int, quant_type: str, blocksize: int):
    """:func:`check_loaded_weight` for a Dense layer applied to ``x``, naming a feature mismatch first.

    Raises:
      ValueError: ``x`` has another number of features than the weight, or as check_loaded_weight.
      TypeError: as check_loaded_weight.
    """
    in_features = x.shape[-1]
    if isinstance(q, Packed4bit) and len(q.shape) == 2 and q.shape[1] != in_features:
        raise ValueError(f"{owner}: inputs have {in_features} features but the weight {q.shape} expects {q.shape[1]}")
    return check_loaded_weight(owner, q, (out_features, in_features), quant_type, blocksize)


def check_int8_table(weight: Any, num_embeddings: int, features: int) -> None:
    """Raises ValueError unless an int8 embedding table has shape ``(num_embeddings, features)``."""
    if tuple(weight.codes.shape) != (num_embeddings, features):
        raise ValueError(
            f"the quantized table must have shape ({num_embeddings}, {features}), got {tuple(weight.codes.shape)}"
        )


def check_outlier_idx(idx: jax.Array, in_features: int) -> jax.Array:
    """Checks OutlierAwareDense's outlier indices: 1-D integers in ``[0, in_features)`` (when concrete).

    Raises:
      TypeError: not a 1-D integer array.
      ValueError: a concrete index is out of range.
    """
    if not jnp.issubdtype(idx.dtype, jnp.integer) or idx.ndim != 1:
        raise TypeError(f"outliers['idx'] must be a 1-D integer array, got {idx.dtype} {tuple(idx.shape)}")
    if not isinstance(idx, jax.core.Tracer) and idx.size and (int(idx.min()) < 0 or int(idx.max()) >= in_features):
        raise ValueError(f"outliers['idx'] must lie in [0, {in_features}), got {np.asarray(idx).tolist()}")
    return idx
