"""The dtype rules of the qflax layers; Linen and NNX layers both call these, so the rules cannot drift.

* 4-bit layers (Dense4bit and its NF4/FP4 variants, LoRADense4bit, Embed4bit.attend) take
  bitsandbytes' ``compute_dtype``: the product is computed in ``compute_dtype`` (None: the input's
  dtype) and the output always has the input's dtype, as ``bitsandbytes.nn.Linear4bit``
  (docs/fourbit.md#layers). QLoRA code written for bitsandbytes' ``bnb_4bit_compute_dtype`` keeps its
  meaning, and a frozen 4-bit base layer never changes the dtype flowing through a model.
* 8-bit and SwitchBack layers (Dense8bitLt, SwitchBackDense and its variants, SwitchBackDenseBnb,
  StandardDense) take Flax's ``dtype``: inputs are cast to ``dtype`` before the matmul and the output
  has that dtype; None (the default) keeps the input's dtype. bitsandbytes' Linear8bitLt and
  SwitchBackLinear have no compute-dtype option, so these layers take the option their Flax neighbour
  (``nn.Dense(dtype=...)``) has. With the defaults both rules give what bitsandbytes gives: the output
  in the input's dtype.
* Embedding lookups return the table's dtype (``param_dtype``); Embed8bit, whose table is int8, returns
  its ``dtype`` (float32 by default), as bitsandbytes' Embedding8bit returns its construction dtype.
"""

from typing import Any, Optional

import jax
import numpy as np

from qflax.layers.warn_once import warn_once_per_weight
from qflax.ops.fourbit_matmul import dtype_name
from qflax.quant import validation
from qflax.quant.fourbit import Packed4bit


def flax_dtype_input(x: Any, dtype: Optional[Any]) -> jax.Array:
    """The Flax rule: ``x`` checked and cast to ``dtype`` (None keeps its dtype).

    A batch of zero rows is accepted: the layer gives an empty output (and gradients).

    Raises:
      TypeError: ``x`` is not a float32/float16/bfloat16 array.
      ValueError: ``x`` is a scalar.
    """
    x = validation.check_float_array(x, "x", allow_empty=True)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dimension (features last), got shape {tuple(x.shape)}")
    return x if dtype is None else x.astype(dtype)


def check_4bit_input(owner: str, x: Any) -> None:
    """Checks the input of a 4-bit layer: a float32/float16/bfloat16 array ``(..., in_features)``.

    Raises:
      TypeError: another dtype.
      ValueError: a scalar.
    """
    input_dtype = np.dtype(x.dtype).name
    if input_dtype not in validation.FLOAT_DTYPES:
        raise TypeError(f"{owner}: inputs must have dtype float32, float16 or bfloat16, got {input_dtype}")
    if x.ndim == 0:
        raise ValueError(f"{owner}: inputs must have shape (..., in_features), got a scalar")


def fourbit_compute_dtype(
    owner: str, x: jax.Array, q: Packed4bit, compute_dtype: Optional[Any], stacklevel: int = 2
) -> Optional[str]:
    """The bitsandbytes rule: the compute dtype's name for an input checked by :func:`check_4bit_input`.

    A float16 input with ``compute_dtype=None`` warns once per layer, as bitsandbytes' Linear4bit does
    (its default compute dtype is float32, so float16 there is a slow path).

    Args:
      owner: the layer, for messages.
      x: the layer's input ``(..., in_features)``.
      q: the layer's weight (the key of the once-per-layer warning).
      compute_dtype: the layer's ``compute_dtype``.
      stacklevel: the warning's ``stacklevel`` as seen from the layer method calling this (2: its caller).

    Returns:
      The compute dtype's name, or None to compute in the input's dtype.

    Raises:
      TypeError: a ``compute_dtype`` that is not a float dtype.
    """
    if compute_dtype is not None:
        return dtype_name(compute_dtype, f"{owner} compute_dtype")
    if np.dtype(x.dtype).name == "float16":
        rows = "inference." if x.size == x.shape[-1] else "inference or training speed."
        warn_once_per_weight(
            q.packed,
            f"Input type into {owner} is float16, but compute_dtype is not set (bitsandbytes' "
            f"bnb_4bit_compute_dtype default is float32); pass compute_dtype explicitly. "
            f"This will lead to slow {rows}",
            stacklevel=stacklevel + 2,
        )
    return None
