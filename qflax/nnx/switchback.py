"""SwitchBack Dense layers (bitsandbytes' SwitchBackLinear family, docs/switchback.md) as NNX modules.

NNX twins of :mod:`qflax.linen.switchback`: the same arguments (``in_features`` and
``out_features`` in place of Linen's ``features``, and ``rngs``, as ``nnx.Linear``), the
same variables ("kernel" ``(in, out)`` and "bias" ``(out,)`` as ``nnx.Param``) and the same
ops, so outputs are identical for identical weights.

Inference mode: :meth:`SwitchBackDense.prepare_for_eval` (or :func:`prepare_for_eval` on a
whole model) stores the int8 weight ("weight") and its absmax ("weight_scale") once as
:class:`~qflax.nnx.QuantizedWeight`; the float kernel is kept, so training can resume.
"""

import functools
from typing import Any, ClassVar, Optional

import jax
from flax import nnx

from qflax import ops
from qflax.layers import dtypes, switchback, variants
from qflax.nnx.construction import DenseParams
from qflax.nnx.variables import QuantizedWeight

Dtype = Any


class FloatDense(DenseParams, nnx.Module):
    """Trainable "kernel" ``(in, out)`` and "bias" ``(out,)`` (``nnx.Param``), as ``nnx.Linear`` declares them.

    Args:
      in_features, out_features: the layer's sizes.
      dtype: computation dtype; None computes in the input's dtype. The output has this dtype (the
        Flax rule of :mod:`qflax.layers.dtypes`).
      **dense: ``use_bias``, ``param_dtype``, ``kernel_init``, ``bias_init`` and ``rngs``, as
        :class:`~qflax.nnx.construction.DenseParams`.
    """

    def __init__(self, in_features: int, out_features: int, *, dtype: Optional[Dtype] = None, **dense):
        self.kernel = nnx.Param(self.init_dense(in_features, out_features, **dense))
        self.dtype = dtype

    def dense_inputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
        """Checks ``x``, casts it to ``dtype``; returns ``(x, weight (out, in), bias or None)``."""
        return dtypes.flax_dtype_input(x, self.dtype), self.kernel[...].T, self.bias_value()


class SwitchBackDense(FloatDense):
    """Dense layer trained with int8 matmuls (bitsandbytes' SwitchBackLinear), NNX twin of the Linen module.

    Args:
      in_features, out_features: the layer's sizes.
      vector_wise_quantization: per-row weight scales (forward) and per-column ones (input
        gradient) instead of one tensor-wide scale.
      mem_efficient: keep only int8 activations for the backward pass (global scales only).
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
      **float_dense: ``dtype`` and the Dense arguments of :class:`FloatDense`.

    Raises:
      ValueError: ``vector_wise_quantization=True`` with ``mem_efficient=True``.

    Example:
      >>> layer = SwitchBackDense(512, 256, vector_wise_quantization=True, rngs=nnx.Rngs(0))
      >>> y = layer(x)
    """

    fixed_settings: ClassVar[dict] = {}
    # Variables that exist only after prepare_for_eval.
    optional_variables: ClassVar[tuple[str, ...]] = ("weight", "weight_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        vector_wise_quantization: bool = False,
        mem_efficient: bool = False,
        backend: Optional[str] = None,
        **float_dense,
    ):
        settings = {"vector_wise_quantization": vector_wise_quantization, "mem_efficient": mem_efficient}
        variants.check_fixed(type(self), settings)
        switchback.op_variant(vector_wise_quantization, mem_efficient)
        super().__init__(in_features, out_features, **float_dense)
        self.vector_wise_quantization, self.mem_efficient = vector_wise_quantization, mem_efficient
        self.backend = backend
        # Set by prepare_for_eval: the int8 weight and its absmax, quantized once.
        self.weight: Optional[QuantizedWeight] = nnx.data(None)
        self.weight_scale: Optional[QuantizedWeight] = nnx.data(None)

    @property
    def variant(self) -> str:
        """The op variant: "global", "vectorwise" or "global_mem_efficient"."""
        return switchback.op_variant(self.vector_wise_quantization, self.mem_efficient)

    def prepare_for_eval(self) -> None:
        """Quantizes the kernel once for inference (bitsandbytes' prepare_for_eval), keeping the kernel.

        Later calls use the stored int8 weight; training the kernel does not update it
        (call this again after training).
        """
        codes, scale = switchback.quantize_for_eval(self.kernel[...].T, self.vector_wise_quantization)
        self.weight = QuantizedWeight(codes)
        self.weight_scale = QuantizedWeight(scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., out_features)``."""
        x, weight, bias = self.dense_inputs(x)
        if self.weight is not None:
            codes, scale = self.weight.get_value(), self.weight_scale.get_value()
            variant = switchback.prepared_variant(self.vector_wise_quantization)
            return ops.switchback_matmul_prepared(x, codes, scale, bias, variant=variant, backend=self.backend)
        return ops.switchback_matmul(x, weight, bias, variant=self.variant, backend=self.backend)


_variant = functools.partial(variants.fixed_variant, module=__name__, defaults=variants.init_defaults)

SwitchBackDenseGlobal, SwitchBackDenseVectorwise, SwitchBackDenseGlobalMemEfficient = (
    _variant(SwitchBackDense, *spec) for spec in switchback.FIXED_VARIANTS
)


class StandardDense(FloatDense):
    """Float Dense layer with SwitchBack's explicit vjp structure (bitsandbytes' StandardLinear).

    Arguments: :class:`FloatDense`'s.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., out_features)``."""
        return ops.standard_matmul(*self.dense_inputs(x))


class SwitchBackDenseBnb(FloatDense):
    """bitsandbytes' SwitchBackLinearBnb as intended (docs/switchback.md#switchbacklinearbnb).

    LLM.int8 forward, 16-bit weight gradient.

    Args:
      in_features, out_features: the layer's sizes.
      threshold: outlier threshold, >= 0 (0: no outlier columns).
      backend: "auto", "xla", "triton" or None.
      **float_dense: ``dtype`` and the Dense arguments of :class:`FloatDense`.
    """

    def __init__(
        self, in_features: int, out_features: int, *, threshold: float = 0.0, backend: Optional[str] = None,
        **float_dense,
    ):
        super().__init__(in_features, out_features, **float_dense)
        self.threshold, self.backend = threshold, backend

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., out_features)``."""
        x, weight, bias = self.dense_inputs(x)
        return ops.switchback_bnb_matmul(x, weight, bias, threshold=self.threshold, backend=self.backend)


def prepare_for_eval(model: nnx.Module) -> nnx.Module:
    """Calls :meth:`SwitchBackDense.prepare_for_eval` on every SwitchBackDense in ``model`` (in place).

    Args:
      model: an NNX module.

    Returns:
      ``model``, for chaining.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, SwitchBackDense):
            module.prepare_for_eval()
    return model
