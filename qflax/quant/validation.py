"""Argument checks shared by the quantizers: every error names the argument and what is allowed."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)


def check_float_array(x: Any, name: str = "x", allow_empty: bool = False) -> jax.Array:
    """Returns ``x`` as a jax array after checking it is a (non-empty) fp32/fp16/bf16 array.

    Args:
      x: the array to check (jax or numpy array, or anything jnp.asarray accepts).
      name: the argument name used in error messages.
      allow_empty: accept a zero-size array (a batch of zero rows has an empty result).

    Returns:
      ``x`` as a jax array.

    Raises:
      TypeError: ``x`` is not a float32, float16 or bfloat16 array.
      ValueError: ``x`` is empty (unless ``allow_empty``) or a scalar where an array is needed.
    """
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if dtype.name not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32, float16 or bfloat16, got {dtype.name}")
    x = jnp.asarray(x)
    if x.size == 0 and not allow_empty:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def _same_kind(value: Any, example: Any) -> bool:
    # 64.0 == 64 and True == 1 in Python: a block size must really be an integer, a name a string.
    if isinstance(example, str):
        return isinstance(value, str)
    if isinstance(example, int):
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    return True


def check_choice(value: Any, allowed: tuple, name: str) -> None:
    """Raises ValueError unless ``value`` is one of ``allowed`` (and of the same kind: 64.0 is not 64)."""
    if not any(_same_kind(value, a) and value == a for a in allowed):
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
