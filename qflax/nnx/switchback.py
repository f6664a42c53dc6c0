"""SwitchBack Dense layers (bitsandbytes' SwitchBackLinear family, SPEC §7, §6.5) as NNX modules.

NNX twins of :mod:`qflax.linen.switchback`: the same arguments (``in_features`` and
``out_features`` in place of Linen's ``features``, and ``rngs``, as ``nnx.Linear``), the
same variables ("kernel" ``(in, out)`` and "bias" ``(out,)`` as ``nnx.Param``) and the same
ops, so outputs are identical for identical weights.

Inference mode: :meth:`SwitchBackDense.prepare_for_eval` (or :func:`prepare_for_eval` on a
whole model) stores the int8 weight ("weight") and its absmax ("weight_scale") once as
:class:`~qflax.nnx.QuantizedWeight`; the float kernel is kept, so training can resume.
"""

from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from qflax.nnx.variables import QuantizedWeight
from qflax import ops
from qflax.quant import validation
from qflax.quant.switchback import quantize_global, quantize_rowwise

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nnx.initializers.lecun_normal()


class _FloatDense(nnx.Module):
    """Trainable "kernel" ``(in, out)`` and "bias" ``(out,)``, as ``nnx.Linear`` declares them."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        dtype: Optional[Dtype],
        param_dtype: Dtype,
        kernel_init: Initializer,
        bias_init: Initializer,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.data(nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None)

    def _inputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
        """Checks ``x``, casts it to ``dtype``; returns ``(x, weight (out, in), bias or None)``."""
        x = validation.check_float_array(x, "x", allow_empty=True)
        if x.ndim < 1:
            raise ValueError(f"x must have at least one dimension (features last), got shape {tuple(x.shape)}")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        bias = None if self.bias is None else self.bias[...]
        return x, self.kernel[...].T, bias


class SwitchBackDense(_FloatDense):
    """Dense layer trained with int8 matmuls (bitsandbytes' SwitchBackLinear), NNX twin of the Linen module.

    Args:
      in_features: number of input features.
      out_features: number of output features.
      vector_wise_quantization: per-row weight scales (forward) and per-column ones (input
        gradient) instead of one tensor-wide scale.
      mem_efficient: keep only int8 activations for the backward pass (global scales only).
      use_bias: whether to add a bias.
      dtype: computation dtype; None computes in the input's dtype. The output has this dtype.
      param_dtype: dtype of "kernel" and "bias".
      kernel_init: initializer of the ``(in, out)`` kernel.
      bias_init: initializer of the ``(out,)`` bias.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
      rngs: the ``nnx.Rngs`` the parameters are drawn from.

    Raises:
      ValueError: ``vector_wise_quantization=True`` with ``mem_efficient=True``.

    Example:
      >>> layer = SwitchBackDense(512, 256, vector_wise_quantization=True, rngs=nnx.Rngs(0))
      >>> y = layer(x)
    """

    _fixed: ClassVar[dict[str, bool]] = {}
    # Variables that exist only after prepare_for_eval.
    optional_variables: ClassVar[tuple[str, ...]] = ("weight", "weight_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        vector_wise_quantization: bool = False,
        mem_efficient: bool = False,
        use_bias: bool = True,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        backend: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        settings = {"vector_wise_quantization": vector_wise_quantization, "mem_efficient": mem_efficient}
        for name, value in self._fixed.items():
            if settings[name] != value:
                raise ValueError(f"{type(self).__name__} fixes {name}={value}; got {name}={settings[name]}")
        if vector_wise_quantization and mem_efficient:
            raise ValueError(
                "vector_wise_quantization=True cannot be combined with mem_efficient=True: the "
                "memory-efficient backward pass exists for global (tensor-wise) quantization only"
            )
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        self.vector_wise_quantization = vector_wise_quantization
        self.mem_efficient = mem_efficient
        self.backend = backend
        # Set by prepare_for_eval: the int8 weight and its absmax, quantized once.
        self.weight: Optional[QuantizedWeight] = nnx.data(None)
        self.weight_scale: Optional[QuantizedWeight] = nnx.data(None)

    @property
    def variant(self) -> str:
        """The op variant: "global", "vectorwise" or "global_mem_efficient"."""
        if self.vector_wise_quantization:
            return "vectorwise"
        return "global_mem_efficient" if self.mem_efficient else "global"

    def prepare_for_eval(self) -> None:
        """Quantizes the kernel once for inference (bitsandbytes' prepare_for_eval), keeping the kernel.

        Later calls use the stored int8 weight; training the kernel does not update it
        (call this again after training).
        """
        quantize = quantize_rowwise if self.vector_wise_quantization else quantize_global
        codes, scale = quantize(self.kernel[...].T)
        self.weight = QuantizedWeight(codes)
        self.weight_scale = QuantizedWeight(scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., out_features)``."""
        x, weight, bias = self._inputs(x)
        if self.weight is not None:
            variant = "vectorwise" if self.vector_wise_quantization else "global"
            return ops.switchback_matmul_prepared(
                x, self.weight.get_value(), self.weight_scale.get_value(), bias, variant=variant, backend=self.backend
            )
        return ops.switchback_matmul(x, weight, bias, variant=self.variant, backend=self.backend)


class SwitchBackDenseGlobal(SwitchBackDense):
    """:class:`SwitchBackDense` with tensor-wise weight quantization (SwitchBackLinearGlobal)."""

    _fixed: ClassVar[dict[str, bool]] = {"vector_wise_quantization": False}


class SwitchBackDenseVectorwise(SwitchBackDense):
    """:class:`SwitchBackDense` with vector-wise weight quantization (SwitchBackLinearVectorwise)."""

    _fixed: ClassVar[dict[str, bool]] = {"vector_wise_quantization": True}

    def __init__(self, in_features: int, out_features: int, *, vector_wise_quantization: bool = True, **kwargs):
        super().__init__(in_features, out_features, vector_wise_quantization=vector_wise_quantization, **kwargs)


class SwitchBackDenseGlobalMemEfficient(SwitchBackDense):
    """Global :class:`SwitchBackDense` with the memory-efficient backward pass."""

    _fixed: ClassVar[dict[str, bool]] = {"vector_wise_quantization": False, "mem_efficient": True}

    def __init__(self, in_features: int, out_features: int, *, mem_efficient: bool = True, **kwargs):
        super().__init__(in_features, out_features, mem_efficient=mem_efficient, **kwargs)


class StandardDense(_FloatDense):
    """Float Dense layer with SwitchBack's explicit vjp structure (bitsandbytes' StandardLinear).

    Args:
      in_features, out_features, use_bias, dtype, param_dtype, kernel_init, bias_init, rngs:
        as in :class:`SwitchBackDense`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., out_features)``."""
        x, weight, bias = self._inputs(x)
        return ops.standard_matmul(x, weight, bias)


class SwitchBackDenseBnb(_FloatDense):
    """bitsandbytes' SwitchBackLinearBnb as intended (SPEC §6.5): LLM.int8 forward, 16-bit weight gradient.

    Args:
      in_features, out_features: as in :class:`SwitchBackDense`.
      threshold: outlier threshold, >= 0 (0: no outlier columns).
      use_bias, dtype, param_dtype, kernel_init, bias_init, backend, rngs: as in :class:`SwitchBackDense`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        threshold: float = 0.0,
        use_bias: bool = True,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        backend: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        self.threshold = threshold
        self.backend = backend

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to ``x (..., in_features)``; returns ``(..., out_features)``."""
        x, weight, bias = self._inputs(x)
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
