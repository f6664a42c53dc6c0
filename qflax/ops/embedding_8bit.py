"""Embedding lookup in a row-wise int8 table (bitsandbytes' Embedding8bit, docs/embeddings.md#embedding8bit).

Only the looked-up rows are dequantized: gather the int8 rows and their absmax, then
``rows * (absmax / 127)`` in float32, cast to the output dtype. ±1 tables come back exactly;
the error of any entry is at most its row's absmax / 254.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qflax.ops import dispatch, embedding_ids
from qflax.quant import validation
from qflax.quant.int8 import INV_127, Int8Rows

OP_NAME = "embed_8bit"


def embed_8bit(ids: jax.Array, w: Int8Rows, dtype=None, backend: Optional[str] = None) -> jax.Array:
    """Looks up rows of an int8 embedding table and dequantizes them.

    An out-of-range id (of any integer dtype) yields a NaN row, eagerly and under jit, instead
    of silently reading another row (:mod:`qflax.ops.embedding_ids`).

    Args:
      ids: integer array of any shape.
      w: the table as :class:`Int8Rows`: int8 ``(num_embeddings, features)`` and float32
        ``(num_embeddings,)`` row absmax.
      dtype: output dtype (float32, float16 or bfloat16); None means float32.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).

    Returns:
      ``(*ids.shape, features)`` in ``dtype``.

    Raises:
      TypeError: ``ids`` not integer, or ``w`` not an Int8Rows.
      ValueError: bad ``dtype`` or mismatched ``w.scale`` length.
    """
    if not isinstance(w, Int8Rows):
        raise TypeError(f"w must be an Int8Rows, got {type(w).__name__}")
    if w.codes.dtype != jnp.int8 or w.codes.ndim != 2:
        raise ValueError(f"w.codes must be a 2-D int8 array, got {w.codes.dtype} {tuple(w.codes.shape)}")
    if w.scale.dtype != jnp.float32 or tuple(w.scale.shape) != (w.codes.shape[0],):
        raise ValueError(
            f"w.scale (SCB) must be float32 of shape ({w.codes.shape[0]},), got {w.scale.dtype} {tuple(w.scale.shape)}"
        )
    out_dtype = np.dtype(jnp.float32 if dtype is None else dtype)
    validation.check_choice(out_dtype.name, validation.FLOAT_DTYPES, "dtype")
    ids, in_range = embedding_ids.checked_ids(ids, w.codes.shape[0])
    # KERNEL HOOK (issue 8): a fused gather-dequant kernel would be chosen here.
    dispatch.choose(OP_NAME, backend, unsupported="there is no GPU kernel for 8-bit embedding lookups")
    rows = jnp.take(w.codes, ids, axis=0)
    scale = jnp.take(w.scale, ids, axis=0)
    # bitsandbytes divides by 127; XLA turns a division by a constant into a multiplication by
    # its reciprocal anyway, so results may differ from bitsandbytes' by one float32 ulp.
    out = rows.astype(jnp.float32) * (scale * INV_127)[..., None]
    return embedding_ids.nan_where_out_of_range(out, in_range).astype(out_dtype)
