"""Building NNX layers: quantization at construction, and construction from float ``nnx.Linear``.

NNX modules quantize their weights eagerly in ``__init__``. Running a quantizer op by op
would compile every primitive separately for each new shape; a whole-quantizer ``jax.jit``
(qflax.quant's 4-bit quantizer is jitted already, the row-wise int8 one is jitted here)
compiles it at once and gives the same bytes.
"""

import jax
from flax import nnx

from qflax.quant import fourbit, int8, validation


def quantize_4bit(w: jax.Array, blocksize: int, quant_type: str, compress_statistics: bool) -> fourbit.Packed4bit:
    """:func:`qflax.quant.quantize_4bit` (already compiled there), with errors naming ``w``."""
    w = validation.check_float_array(w, "w")
    return fourbit.quantize_4bit(w, blocksize, quant_type, compress_statistics)


_quantize_rows_jit = jax.jit(int8.quantize_rows)


def quantize_rows(w: jax.Array) -> int8.Int8Rows:
    """:func:`qflax.quant.quantize_rows`, compiled; raises the same errors."""
    w = validation.check_float_array(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    return _quantize_rows_jit(w)


class FromLinear:
    """Mixin for quantized Dense layers: build one from a float ``nnx.Linear``'s weights."""

    @classmethod
    def from_linear(cls, linear: nnx.Linear, **options):
        """A layer of this class holding the (quantized) weights of a float ``nnx.Linear``.

        Args:
          linear: the float layer.
          **options: the layer's own settings (quant_type, threshold, backend, ...).

        Returns:
          A new layer of ``cls``.
        """
        kernel = linear.kernel[...]
        bias = None if linear.bias is None else linear.bias[...]
        return cls(
            linear.in_features,
            linear.out_features,
            use_bias=bias is not None,
            param_dtype=kernel.dtype,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: bias,
            rngs=nnx.Rngs(0),
            **options,
        )
