"""Per-unit absmax statistics and scaling by them: one rule for non-finite and extreme values.

Every quantizer (4-bit blocks, 8-bit blockwise, LLM.int8 rows and columns, SwitchBack rows,
columns and tensors) computes its statistics and scaled values here, so the rules below hold
the same eagerly, under ``jax.jit`` and on every XLA backend:

* Non-finite input: a NaN or +-Inf element makes the absmax of its unit NaN; the quantizers
  then write the code of zero for the whole unit, so it dequantizes to NaN throughout and every
  other unit is exactly what it would be without it. (XLA's max reduction may drop a NaN, in
  particular for 16-bit inputs, so the NaN is set explicitly.) Nothing raises on values.
* Extreme input: the scaled value ``x * (c * (1 / absmax))`` (bitsandbytes' CUDA order; ``c``
  is 1 or 127) is exact in float32 for any finite absmax from the smallest normal float32 to
  float32's maximum. Where ``1 / absmax`` would be subnormal (XLA on CPU flushes it to zero: a
  block with absmax >= ~8.5e37 would quantize to all-zero codes) or ``c / absmax`` would
  overflow, ``x`` and ``absmax`` are both first multiplied by a power of two (exact), which
  leaves every ordinary unit bit-identical to the plain formula.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Units whose absmax lies outside [2**-64, 2**64] are rescaled by 2**64 or 2**-64 first; within
# that range 1/absmax and 127/absmax are normal float32 numbers.
_LIMIT = np.float32(2.0**64)
_INV_LIMIT = np.float32(2.0**-64)


def absmax(x: jax.Array, axis) -> jax.Array:
    """float32 ``max |x|`` over ``axis``, NaN where the reduced values hold any NaN or +-Inf.

    Args:
      x: float array (cast to float32).
      axis: the axis (or axes) reduced: a block, row, column or the whole tensor.

    Returns:
      float32 statistics; an empty reduction gives 0.
    """
    x = x.astype(jnp.float32)
    finite = jnp.isfinite(x)
    largest = jnp.max(jnp.abs(jnp.where(finite, x, jnp.float32(0))), axis=axis, initial=np.float32(0))
    return jnp.where(jnp.all(finite, axis=axis), largest, jnp.float32(jnp.nan))


def _power_of_two(stat: jax.Array) -> jax.Array:
    """1, or 2**-64 / 2**64 for a statistic above / below the safe range (exact rescaling factors)."""
    factor = jnp.where(stat > _LIMIT, _INV_LIMIT, jnp.float32(1))
    return jnp.where((stat < _INV_LIMIT) & (stat > 0), _LIMIT, factor)


def scale_by_reciprocal(x: jax.Array, stat: jax.Array, numerator: float = 1.0) -> jax.Array:
    """``x * (numerator * (1 / stat))`` in float32, exact for any finite ``stat`` (reciprocal first).

    Args:
      x: float32 values.
      stat: their absmax, broadcastable against ``x`` (0 or NaN give non-finite results:
        callers replace those units' codes).
      numerator: 1 (4-bit, blockwise) or 127 (LLM.int8).

    Returns:
      float32 scaled values, ``|s| <= numerator`` where ``stat`` is the absmax of ``x``.
    """
    factor = _power_of_two(stat)
    return (x * factor) * (jnp.float32(numerator) * (jnp.float32(1) / (stat * factor)))


def scale_by_division(x: jax.Array, stat: jax.Array, numerator: float) -> jax.Array:
    """``x * (numerator / stat)`` in float32 (SwitchBack's order), exact for any finite ``stat``."""
    factor = _power_of_two(stat)
    return (x * factor) * (jnp.float32(numerator) / (stat * factor))


def usable(stat: jax.Array) -> jax.Array:
    """True where a unit's statistic is positive and finite, i.e. where its scaled values are codes.

    An all-zero unit (stat 0) and a non-finite one (stat NaN) get the code of zero instead.
    """
    return stat > 0
