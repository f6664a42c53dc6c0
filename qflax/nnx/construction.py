"""Building NNX Dense layers: their float parameters, and construction from a float ``nnx.Linear``.

NNX modules quantize their weights eagerly in ``__init__`` through :mod:`qflax.layers.quantize`, the
same compiled quantizers the Linen converter uses, so the same float weight gives the same bytes.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

default_kernel_init = nnx.initializers.lecun_normal()


class DenseParams:
    """Mixin of the NNX Dense layers: the float kernel and bias, declared as ``nnx.Linear`` does.

    Each layer's ``__init__`` takes ``**dense`` and calls :meth:`init_dense` with it; these are the
    arguments every qflax NNX Dense layer shares with ``nnx.Linear``:

    Args (of :meth:`init_dense`):
      in_features: input features.
      out_features: output features.
      use_bias: whether to add a (trainable ``nnx.Param``) bias.
      param_dtype: dtype of the bias and of the float kernel (drawn here, then quantized or trained).
      kernel_init: initializer of the float kernel, Flax's ``(in, out)`` layout.
      bias_init: initializer of the bias.
      rngs: the ``nnx.Rngs`` the parameters are drawn from.
    """

    def init_dense(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        rngs: nnx.Rngs,
    ) -> jax.Array:
        """Stores the sizes, creates the bias and returns the freshly drawn float kernel ``(in, out)``."""
        self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        self.bias = nnx.data(nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None)
        return kernel

    def bias_value(self) -> Optional[jax.Array]:
        """The bias array, or None."""
        return None if self.bias is None else self.bias[...]

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
