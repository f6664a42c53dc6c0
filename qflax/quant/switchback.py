"""SwitchBack quantizers (docs/switchback.md#quantizers): row-wise, column-wise-transposed, global, global-transposed.

All compute ``rne(127 * x / absmax)`` in float32 (bitsandbytes' Triton kernels worked in
the input precision; float32 is at least as accurate). Scales are returned in float32. An
all-zero row/column/tensor has scale 0 and codes 0, never NaN. A row/column/tensor holding
NaN or +-Inf has scale NaN and codes 0 (its products are NaN), and scaling is exact up to
float32's maximum, eagerly and under jit alike (:mod:`qflax.quant.scaling`).
"""

import jax
import jax.numpy as jnp

from qflax.quant import scaling, validation
from qflax.quant.int8 import round_to_int8


def _codes(x: jax.Array, absmax: jax.Array) -> jax.Array:
    """int8 ``rne(x * (127 / absmax))``; codes 0 for a unit with absmax 0 or NaN."""
    codes = round_to_int8(scaling.scale_by_division(x, absmax, 127))
    return jnp.where(scaling.usable(absmax), codes, jnp.int8(0))


def _as_2d(x: jax.Array, name: str = "x") -> jax.Array:
    x = validation.check_float_array(x, name, allow_empty=True)  # zero rows give empty codes
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    return x.astype(jnp.float32)


def quantize_rowwise(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row int8 codes of a 2-D ``x (M, K)`` and float32 row absmax ``(M,)``."""
    x = _as_2d(x)
    absmax = scaling.absmax(x, axis=1)
    return _codes(x, absmax[:, None]), absmax


def quantize_columnwise_and_transpose(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-column int8 codes of ``x (M, N)``, written transposed ``(N, M)``, and column absmax ``(N,)``."""
    x = _as_2d(x)
    absmax = scaling.absmax(x, axis=0)
    return _codes(x, absmax[None, :]).T, absmax


def quantize_global(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 codes of ``x`` (any shape) with one tensor-wide absmax, returned as float32 ``(1,)``."""
    x = validation.check_float_array(x, allow_empty=True).astype(jnp.float32)
    absmax = scaling.absmax(x, axis=None).reshape(1)
    return _codes(x, absmax[0]), absmax


def quantize_global_transpose(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Global int8 codes of a 2-D ``x (M, N)`` written transposed ``(N, M)``, and the absmax ``(1,)``."""
    codes, absmax = quantize_global(_as_2d(x))
    return codes.T, absmax


def dequantize_rowwise(codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """float32 ``absmax[m] * codes[m, k] / 127``."""
    return codes.astype(jnp.float32) * (absmax.astype(jnp.float32)[:, None] / jnp.float32(127))
