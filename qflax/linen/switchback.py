"""SwitchBack Dense layers (bitsandbytes' SwitchBackLinear family, docs/switchback.md) for Flax Linen.

Parameters keep Flax's names and layout: "kernel" ``(in, out)`` and "bias" ``(out,)`` in
"params", trainable as in ``nn.Dense``; the ops receive ``kernel.T``, bitsandbytes' ``(out, in)``.

Inference mode (bitsandbytes' ``prepare_for_eval``): :func:`prepare_for_eval` adds a
"quantized" collection holding each layer's int8 weight ("weight", ``(out, in)``) and its
absmax ("weight_scale": ``(1,)`` global, ``(out,)`` vector-wise). A layer that finds them
uses them instead of quantizing its kernel on every call. Unlike bitsandbytes, nothing is
deleted: "params" stay as they were, so training can resume from the same variables (pass
only ``{"params": ...}`` to train; the int8 copy is not updated by training). A layer makes
its int8 copy whenever it is applied (not initialized) with "quantized" mutable, which is what
:func:`prepare_for_eval` does; ``mutable=True`` therefore also prepares it.
"""

import functools
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax

from qflax.layers import dtypes, switchback, variants
from qflax.layers.names import QUANTIZED
from qflax.linen.dense_params import DenseParams
from qflax.ops.switchback_matmul import (
    standard_matmul,
    switchback_bnb_matmul,
    switchback_matmul,
    switchback_matmul_prepared,
)

Dtype = Any


class FloatDense(DenseParams):
    """The trainable Dense of the SwitchBack family: "kernel" ``(in, out)`` and "bias" in "params".

    Attributes (besides :class:`~qflax.linen.dense_params.DenseParams`'):
      dtype: computation dtype; None computes in the input's dtype. The output has this dtype (the
        Flax rule of :mod:`qflax.layers.dtypes`).
    """

    dtype: Optional[Dtype] = None

    def dense_inputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
        """Checks ``x``, casts it to ``dtype`` and declares the parameters (call from a compact method).

        Returns:
          ``(x, weight (out, in), bias or None)``.
        """
        x = dtypes.flax_dtype_input(x, self.dtype)
        return x, self.declare_kernel(x.shape[-1]).T, self.declare_bias()


class SwitchBackDense(FloatDense):
    """Dense layer trained with int8 matmuls (bitsandbytes' SwitchBackLinear).

    The forward pass and the input gradient run as int8 matmuls with int32 accumulation;
    the weight gradient ``G^T X`` stays in the input precision ("switch back").

    Attributes (besides :class:`FloatDense`'s):
      vector_wise_quantization: per-row weight scales (forward) and per-column ones
        (input gradient) instead of one tensor-wide scale.
      mem_efficient: keep only int8 activations for the backward pass (global scales only).
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).

    Example:
      >>> layer = SwitchBackDense(256, vector_wise_quantization=True)
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y = layer.apply(variables, x)
    """

    vector_wise_quantization: bool = False
    mem_efficient: bool = False
    backend: Optional[str] = None
    fixed_settings: ClassVar[dict] = {}

    def __post_init__(self):
        settings = {"vector_wise_quantization": self.vector_wise_quantization, "mem_efficient": self.mem_efficient}
        variants.check_fixed(type(self), settings)
        switchback.op_variant(self.vector_wise_quantization, self.mem_efficient)
        super().__post_init__()

    @property
    def variant(self) -> str:
        """The op variant: "global", "vectorwise" or "global_mem_efficient"."""
        return switchback.op_variant(self.vector_wise_quantization, self.mem_efficient)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., features)``."""
        x, weight, bias = self.dense_inputs(x)
        # Prepared weights are made only by an explicit apply with "quantized" mutable
        # (prepare_for_eval), never by init: a fresh model must train on its float kernel.
        if self.has_variable(QUANTIZED, "weight") or (
            self.is_mutable_collection(QUANTIZED) and not self.is_initializing()
        ):
            vectorwise = self.vector_wise_quantization
            prepared = lambda i: switchback.quantize_for_eval(weight, vectorwise)[i]  # noqa: E731
            codes = self.variable(QUANTIZED, "weight", prepared, 0)
            scale = self.variable(QUANTIZED, "weight_scale", prepared, 1)
            variant = switchback.prepared_variant(vectorwise)
            return switchback_matmul_prepared(x, codes.value, scale.value, bias, variant=variant, backend=self.backend)
        return switchback_matmul(x, weight, bias, variant=self.variant, backend=self.backend)


_variant = functools.partial(variants.fixed_variant, module=__name__, defaults=variants.field_defaults)

SwitchBackDenseGlobal, SwitchBackDenseVectorwise, SwitchBackDenseGlobalMemEfficient = (
    _variant(SwitchBackDense, *spec) for spec in switchback.FIXED_VARIANTS
)


class StandardDense(FloatDense):
    """Float Dense layer with SwitchBack's explicit vjp structure (bitsandbytes' StandardLinear).

    The reference SwitchBackDense is compared against; numerically an ``nn.Dense``. Attributes:
    :class:`FloatDense`'s.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., features)``."""
        return standard_matmul(*self.dense_inputs(x))


class SwitchBackDenseBnb(FloatDense):
    """bitsandbytes' SwitchBackLinearBnb as intended (docs/switchback.md#switchbacklinearbnb): LLM.int8
    forward, 16-bit weight gradient.

    bitsandbytes 0.49.2's module raises AttributeError on every call; this one implements the
    documented semantics: row-wise int8 activations (outlier columns ``|x| >= threshold`` in
    float against the float weight), row-wise int8 weight, ``grad_x`` through the int8 weight,
    ``grad_W = G^T X`` in the input precision.

    Attributes (besides :class:`FloatDense`'s):
      threshold: outlier threshold, >= 0 (0: no outlier columns).
      backend: "auto", "xla", "triton" or None.
    """

    threshold: float = 0.0
    backend: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., features)``."""
        x, weight, bias = self.dense_inputs(x)
        return switchback_bnb_matmul(x, weight, bias, threshold=self.threshold, backend=self.backend)


def prepare_for_eval(model: nn.Module, variables: dict, *args, **kwargs) -> dict:
    """Quantizes the weight of every SwitchBackDense in ``model`` once, for inference.

    Runs ``model.apply(variables, *args, **kwargs)`` with the "quantized" collection mutable,
    so each SwitchBackDense stores its int8 weight and scale there. The float "params" are
    kept (bitsandbytes deletes the float weight; we do not).

    Args:
      model: a Linen module containing SwitchBackDense layers.
      variables: its variables (at least "params").
      *args: sample inputs for one forward pass (only their shapes and dtypes matter).
      **kwargs: further keyword arguments for ``model.apply``.

    Returns:
      ``variables`` plus a "quantized" collection; use them with ``model.apply`` for inference.

    Example:
      >>> eval_vars = prepare_for_eval(model, variables, x[:1])
      >>> y = model.apply(eval_vars, x)
    """
    _, state = model.apply(variables, *args, mutable=["quantized"], **kwargs)
    return {**variables, **state}
