"""SwitchBack Dense layers (bitsandbytes' SwitchBackLinear family, SPEC §7.2, §7.3, §6.5) for Flax Linen.

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

from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qflax.ops.switchback_matmul import (
    standard_matmul,
    switchback_bnb_matmul,
    switchback_matmul,
    switchback_matmul_prepared,
)
from qflax.quant import validation
from qflax.quant.switchback import quantize_global, quantize_rowwise

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.lecun_normal()


def _dense_inputs(module: nn.Module, x: jax.Array) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    """Checks ``x``, casts it to ``module.dtype`` and declares the Dense parameters.

    Returns:
      ``(x, weight (out, in), bias or None)``.
    """
    x = validation.check_float_array(x, "x", allow_empty=True)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dimension (features last), got shape {tuple(x.shape)}")
    if module.dtype is not None:
        x = x.astype(module.dtype)
    kernel = module.param("kernel", module.kernel_init, (x.shape[-1], module.features), module.param_dtype)
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype) if module.use_bias else None
    return x, kernel.T, bias


class SwitchBackDense(nn.Module):
    """Dense layer trained with int8 matmuls (bitsandbytes' SwitchBackLinear).

    The forward pass and the input gradient run as int8 matmuls with int32 accumulation;
    the weight gradient ``G^T X`` stays in the input precision ("switch back").

    Attributes:
      features: number of output features.
      vector_wise_quantization: per-row weight scales (forward) and per-column ones
        (input gradient) instead of one tensor-wide scale.
      mem_efficient: keep only int8 activations for the backward pass (global scales only).
      use_bias: whether to add a bias.
      dtype: computation dtype; None computes in the input's dtype. The output has this dtype.
      param_dtype: dtype of "kernel" and "bias".
      kernel_init: initializer of the ``(in, out)`` kernel.
      bias_init: initializer of the ``(out,)`` bias.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).

    Example:
      >>> layer = SwitchBackDense(256, vector_wise_quantization=True)
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y = layer.apply(variables, x)
    """

    features: int
    vector_wise_quantization: bool = False
    mem_efficient: bool = False
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    backend: Optional[str] = None

    # Subclasses with a fixed variant name the attributes they fix and the value they fix them to.
    _fixed: ClassVar[dict[str, bool]] = {}

    def __post_init__(self):
        for name, value in self._fixed.items():
            if getattr(self, name) != value:
                raise ValueError(f"{type(self).__name__} fixes {name}={value}; got {name}={getattr(self, name)}")
        if self.vector_wise_quantization and self.mem_efficient:
            raise ValueError(
                "vector_wise_quantization=True cannot be combined with mem_efficient=True: the "
                "memory-efficient backward pass exists for global (tensor-wise) quantization only"
            )
        super().__post_init__()

    @property
    def variant(self) -> str:
        """The op variant: "global", "vectorwise" or "global_mem_efficient"."""
        if self.vector_wise_quantization:
            return "vectorwise"
        return "global_mem_efficient" if self.mem_efficient else "global"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., features)``."""
        x, weight, bias = _dense_inputs(self, x)
        prepared_variant = "vectorwise" if self.vector_wise_quantization else "global"
        # Prepared weights are made only by an explicit apply with "quantized" mutable
        # (prepare_for_eval), never by init: a fresh model must train on its float kernel.
        if self.has_variable("quantized", "weight") or (
            self.is_mutable_collection("quantized") and not self.is_initializing()
        ):
            quantize = quantize_rowwise if self.vector_wise_quantization else quantize_global
            codes = self.variable("quantized", "weight", lambda: quantize(weight)[0])
            scale = self.variable("quantized", "weight_scale", lambda: quantize(weight)[1])
            return switchback_matmul_prepared(
                x, codes.value, scale.value, bias, variant=prepared_variant, backend=self.backend
            )
        return switchback_matmul(x, weight, bias, variant=self.variant, backend=self.backend)


class SwitchBackDenseGlobal(SwitchBackDense):
    """:class:`SwitchBackDense` with tensor-wise weight quantization (bitsandbytes' SwitchBackLinearGlobal)."""

    vector_wise_quantization: bool = False
    _fixed: ClassVar[dict[str, bool]] = {"vector_wise_quantization": False}


class SwitchBackDenseVectorwise(SwitchBackDense):
    """:class:`SwitchBackDense` with vector-wise weight quantization (bitsandbytes' SwitchBackLinearVectorwise)."""

    vector_wise_quantization: bool = True
    _fixed: ClassVar[dict[str, bool]] = {"vector_wise_quantization": True}


class SwitchBackDenseGlobalMemEfficient(SwitchBackDense):
    """Global :class:`SwitchBackDense` with the memory-efficient backward pass (SwitchBackLinearGlobalMemEfficient)."""

    mem_efficient: bool = True
    _fixed: ClassVar[dict[str, bool]] = {"vector_wise_quantization": False, "mem_efficient": True}


class StandardDense(nn.Module):
    """Float Dense layer with SwitchBack's explicit vjp structure (bitsandbytes' StandardLinear).

    The reference SwitchBackDense is compared against; numerically an ``nn.Dense``.

    Attributes:
      features, use_bias, dtype, param_dtype, kernel_init, bias_init: as in :class:`SwitchBackDense`.
    """

    features: int
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., features)``."""
        x, weight, bias = _dense_inputs(self, x)
        return standard_matmul(x, weight, bias)


class SwitchBackDenseBnb(nn.Module):
    """bitsandbytes' SwitchBackLinearBnb as intended (SPEC §6.5): LLM.int8 forward, 16-bit weight gradient.

    bitsandbytes 0.49.2's module raises AttributeError on every call; this one implements the
    documented semantics: row-wise int8 activations (outlier columns ``|x| >= threshold`` in
    float against the float weight), row-wise int8 weight, ``grad_x`` through the int8 weight,
    ``grad_W = G^T X`` in the input precision.

    Attributes:
      features: number of output features.
      threshold: outlier threshold, >= 0 (0: no outlier columns).
      use_bias, dtype, param_dtype, kernel_init, bias_init, backend: as in :class:`SwitchBackDense`.
    """

    features: int
    threshold: float = 0.0
    use_bias: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    backend: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., features)``."""
        x, weight, bias = _dense_inputs(self, x)
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
