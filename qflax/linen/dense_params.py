"""The float parameters every qflax Linen Dense layer declares, as ``nn.Dense`` does."""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.lecun_normal()


class DenseParams(nn.Module):
    """Base of the Dense layers: the settings of their float kernel and bias.

    Attributes:
      features: number of output features.
      use_bias: whether to add a bias (a trainable "bias" in "params").
      param_dtype: dtype of the bias and of the float kernel (drawn at init, or trained).
      kernel_init: initializer of the float kernel, Flax's ``(in, out)`` layout.
      bias_init: initializer of the bias.
    """

    features: int
    use_bias: bool = True
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()

    def declare_bias(self) -> Optional[jax.Array]:
        """The "bias" param (None without bias); call from a compact method."""
        return self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None

    def declare_kernel(self, in_features: int) -> jax.Array:
        """The trainable float "kernel" param ``(in, features)``; call from a compact method."""
        return self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)

    def draw_kernel(self, in_features: int) -> jax.Array:
        """A fresh float kernel ``(in, features)`` to quantize at init (not a param)."""
        return self.kernel_init(self.make_rng("params"), (in_features, self.features), self.param_dtype)
