"""Quantizing one float weight for a layer; the Linen converter, the NNX converter and the NNX
constructors all call these, so the same float weight gives the same bytes everywhere.

Each quantizer is compiled whole (``jax.jit``): run op by op, every primitive would compile separately
for each new shape. NaN/Inf weights do not raise: they follow :mod:`qflax.quant.scaling`'s rule (a
non-finite block or row gets a NaN scale and the zero code), eagerly and under jit alike.
"""

from typing import Union

import jax

from qflax.layers.rules import LayerQuantization
from qflax.quant import fourbit, int8, validation

_quantize_rows_jit = jax.jit(int8.quantize_rows)

Quantized = Union[fourbit.Packed4bit, int8.Int8Rows]


def quantize_4bit(
    w: jax.Array, blocksize: int, quant_type: str, compress_statistics: bool, name: str = "w"
) -> fourbit.Packed4bit:
    """:func:`qflax.quant.quantize_4bit` (compiled there), with errors naming ``w`` as ``name``.

    Raises:
      TypeError: ``w`` is not a float array.
      ValueError: ``w`` is empty.
    """
    w = validation.check_float_array(w, name)
    return fourbit.quantize_4bit(w, blocksize, quant_type, compress_statistics)


def quantize_rows(w: jax.Array, name: str = "w") -> int8.Int8Rows:
    """:func:`qflax.quant.quantize_rows` of a 2-D ``w``, compiled, with errors naming ``w`` as ``name``.

    Raises:
      TypeError: ``w`` is not a float array.
      ValueError: ``w`` is empty or not 2-D.
    """
    w = validation.check_float_array(w, name)
    if w.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, columns), got shape {tuple(w.shape)}")
    return _quantize_rows_jit(w)


def quantize_layer_weight(w: jax.Array, how: LayerQuantization, name: str) -> Quantized:
    """The stored weight of a quantized layer from its float weight in bitsandbytes' layout.

    Args:
      w: a Dense weight ``(out, in)`` (a Flax kernel transposed) or an embedding table.
      how: the resolved rule of the layer.
      name: the weight's path, for error messages.

    Returns:
      A Packed4bit ("4bit") or Int8Rows ("8bit").
    """
    if how.format == "8bit":
        return quantize_rows(w, name)
    return quantize_4bit(w, how.blocksize, how.quant_type, how.compress_statistics, name)
