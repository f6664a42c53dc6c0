"""Flax Linen Dense layers with a frozen 4-bit weight: bitsandbytes' Linear4bit / LinearNF4 / LinearFP4.

Variables:
  - collection "quantized", name "weight": a :class:`~qflax.quant.Packed4bit` of shape
    ``(features, in_features)`` (bitsandbytes' layout, so checkpoints load without transposing).
  - collection "params", name "bias": float ``(features,)`` when ``use_bias``.

Keeping the frozen weight out of "params" means ``jax.grad`` over ``variables["params"]`` never
sees integer leaves, and optimizers never touch it::

    variables = model.init(key, x)                      # {"params": {...}, "quantized": {...}}
    grads = jax.grad(loss)(variables["params"], variables["quantized"], x)
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qflax.linen.warn_once import warn_once_per_weight
from qflax.ops.fourbit_matmul import check_packed_weight, dtype_name, matmul_4bit
from qflax.quant import codebooks, validation
from qflax.quant.fourbit import Packed4bit, quantize_4bit

QUANTIZED = "quantized"
Initializer = Any


def check_layer_config(owner: str, quant_type: str, blocksize: int) -> None:
    """Raises ValueError naming ``owner`` when ``quant_type`` or ``blocksize`` is unsupported."""
    validation.check_choice(quant_type, codebooks.QUANT_TYPES, f"{owner} quant_type")
    validation.check_choice(blocksize, validation.BLOCKSIZES_4BIT, f"{owner} blocksize")


def check_loaded_weight(owner: str, q: Any, shape: tuple, quant_type: str, blocksize: int) -> Packed4bit:
    """Checks that a stored quantized weight is what the module declares.

    Raises:
      TypeError: ``q`` is not a Packed4bit.
      ValueError: its shape, quant type or blocksize differs from the module's.
    """
    q = check_packed_weight(q, f"{owner} weight")
    if tuple(q.shape) != tuple(shape):
        raise ValueError(f"{owner}: the quantized weight has shape {q.shape}, but this layer needs {tuple(shape)}")
    if q.quant_type != quant_type:
        raise ValueError(
            f"{owner}: the quantized weight is {q.quant_type!r} but the layer's quant_type is {quant_type!r}"
        )
    if q.blocksize != blocksize:
        raise ValueError(f"{owner}: the quantized weight has blocksize {q.blocksize}, the layer expects {blocksize}")
    return q


def missing_weight_error(owner: str) -> KeyError:
    """The error for an ``apply`` whose variables lack the "quantized" weight."""
    return KeyError(
        f"{owner}: no variable 'weight' in collection {QUANTIZED!r}; pass both collections, e.g. "
        "model.apply({'params': ..., 'quantized': ...}, x), from model.init, quantize_params_4bit or load_bnb_4bit"
    )


class Dense4bit(nn.Module):
    """A Dense layer whose weight is stored as NF4/FP4 codes (QLoRA's frozen base layer).

    ``y = x @ W.T + bias`` with ``W`` the dequantized ``(features, in_features)`` weight. ``init``
    draws the float kernel with ``kernel_init`` (Flax layout ``(in, out)``) and quantizes it once.
    The weight never receives a gradient; the bias does.

    Attributes:
      features: number of output features.
      quant_type: "nf4" or "fp4".
      blocksize: elements per absmax block: 32, 64, 128, ..., 4096 (bitsandbytes uses 64).
      compress_statistics: double-quantize the absmax at init (bitsandbytes' default True).
        Only affects ``init``: a loaded weight keeps its own statistics.
      compute_dtype: dtype of the product; None computes in the input's dtype (SPEC §6.1).
        A float16 input with ``compute_dtype=None`` warns once per layer, as bitsandbytes does.
      use_bias: whether to add a bias.
      param_dtype: dtype of the bias and of the float kernel drawn at init (the quantized
        weight records it as its dtype).
      kernel_init: initializer of the float kernel, shape ``(in, out)``.
      bias_init: initializer of the bias.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
    """

    features: int
    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = True
    compute_dtype: Optional[Any] = None
    use_bias: bool = True
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    backend: Optional[str] = None

    def _owner(self) -> str:
        path = "/".join(str(p) for p in self.scope.path) if self.scope is not None else ""
        return f"{type(self).__name__}({path or 'root'})"

    def _quantized_kernel(self, in_features: int) -> Packed4bit:
        kernel = self.kernel_init(self.make_rng("params"), (in_features, self.features), self.param_dtype)
        return quantize_4bit(kernel.T, self.blocksize, self.quant_type, self.compress_statistics)

    def frozen_output(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ W.T + bias`` with the 4-bit weight; subclasses (LoRA) add to it."""
        owner = self._owner()
        check_layer_config(owner, self.quant_type, self.blocksize)
        if not isinstance(self.features, (int, np.integer)) or self.features <= 0:
            raise ValueError(f"{owner}: features must be a positive integer, got {self.features!r}")
        input_dtype = np.dtype(inputs.dtype).name
        if input_dtype not in validation.FLOAT_DTYPES:
            raise TypeError(f"{owner}: inputs must have dtype float32, float16 or bfloat16, got {input_dtype}")
        if inputs.ndim == 0:
            raise ValueError(f"{owner}: inputs must have shape (..., in_features), got a scalar")
        in_features = inputs.shape[-1]
        if not self.has_variable(QUANTIZED, "weight") and not self.is_mutable_collection(QUANTIZED):
            raise missing_weight_error(owner)
        q = self.variable(QUANTIZED, "weight", self._quantized_kernel, in_features).value
        if isinstance(q, Packed4bit) and len(q.shape) == 2 and q.shape[1] != in_features:
            raise ValueError(
                f"{owner}: inputs have {in_features} features but the weight {q.shape} expects {q.shape[1]}"
            )
        q = check_loaded_weight(owner, q, (self.features, in_features), self.quant_type, self.blocksize)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        if self.compute_dtype is None and input_dtype == "float16":
            rows = "inference." if inputs.size == in_features else "inference or training speed."
            warn_once_per_weight(
                q.packed,
                f"Input type into {owner} is float16, but compute_dtype is not set (bitsandbytes' "
                f"bnb_4bit_compute_dtype default is float32); pass compute_dtype explicitly. "
                f"This will lead to slow {rows}",
                stacklevel=4,
            )
        compute = None if self.compute_dtype is None else dtype_name(self.compute_dtype, f"{owner} compute_dtype")
        return matmul_4bit(inputs, q, bias, compute_dtype=compute, backend=self.backend)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: float32/float16/bfloat16 array ``(..., in_features)``.

        Returns:
          ``(..., features)`` in the dtype of ``inputs``.

        Raises:
          TypeError: integer (or other non-float) inputs.
          ValueError: ``inputs`` has a different number of features than the stored weight,
            or the stored weight's shape/quant_type/blocksize differs from the layer's.
          KeyError: the variables lack the "quantized" weight.
        """
        return self.frozen_output(inputs)


class DenseNF4(Dense4bit):
    """:class:`Dense4bit` with ``quant_type="nf4"`` (bitsandbytes' LinearNF4)."""

    quant_type: str = "nf4"

    def __post_init__(self):
        if self.quant_type != "nf4":
            raise ValueError(f"DenseNF4 quant_type is fixed to 'nf4', got {self.quant_type!r}; use Dense4bit")
        super().__post_init__()


class DenseFP4(Dense4bit):
    """:class:`Dense4bit` with ``quant_type="fp4"`` (bitsandbytes' LinearFP4)."""

    quant_type: str = "fp4"

    def __post_init__(self):
        if self.quant_type != "fp4":
            raise ValueError(f"DenseFP4 quant_type is fixed to 'fp4', got {self.quant_type!r}; use Dense4bit")
        super().__post_init__()
