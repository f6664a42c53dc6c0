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

import functools
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax

from qflax.layers import checks, dtypes, variants
from qflax.layers.names import QUANTIZED
from qflax.linen.dense_params import DenseParams
from qflax.ops.fourbit_matmul import matmul_4bit
from qflax.quant.fourbit import Packed4bit, quantize_4bit


def missing_weight_error(owner: str) -> KeyError:
    """The error for an ``apply`` whose variables lack the "quantized" weight."""
    return KeyError(
        f"{owner}: no variable 'weight' in collection {QUANTIZED!r}; pass both collections, e.g. "
        "model.apply({'params': ..., 'quantized': ...}, x), from model.init, quantize_params or from_bnb_checkpoint"
    )


def owner_name(module: nn.Module) -> str:
    """``ClassName(path/in/model)``: how a Linen layer names itself in errors and warnings."""
    path = "/".join(str(p) for p in module.scope.path) if module.scope is not None else ""
    return f"{type(module).__name__}({path or 'root'})"


class Dense4bit(DenseParams):
    """A Dense layer whose weight is stored as NF4/FP4 codes (QLoRA's frozen base layer).

    ``y = x @ W.T + bias`` with ``W`` the dequantized ``(features, in_features)`` weight. ``init``
    draws the float kernel with ``kernel_init`` (Flax layout ``(in, out)``) and quantizes it once.
    The weight never receives a gradient; the bias does.

    Attributes (besides :class:`~qflax.linen.dense_params.DenseParams`' features, use_bias,
    param_dtype, kernel_init, bias_init; the quantized weight records param_dtype as its dtype):
      quant_type: "nf4" or "fp4".
      blocksize: elements per absmax block: 32, 64, 128, ..., 4096 (bitsandbytes uses 64).
      compress_statistics: double-quantize the absmax at init (bitsandbytes' default True).
        Only affects ``init``: a loaded weight keeps its own statistics.
      compute_dtype: dtype of the product; None computes in the input's dtype; the output always
        has the input's dtype (the 4-bit rule of :mod:`qflax.layers.dtypes`). A float16 input with
        ``compute_dtype=None`` warns once per layer, as bitsandbytes does.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = True
    compute_dtype: Optional[Any] = None
    backend: Optional[str] = None
    fixed_settings: ClassVar[dict] = {}

    def __post_init__(self):
        variants.check_fixed(type(self), {"quant_type": self.quant_type})
        super().__post_init__()

    def _quantized_kernel(self, in_features: int) -> Packed4bit:
        kernel = self.draw_kernel(in_features)
        return quantize_4bit(kernel.T, self.blocksize, self.quant_type, self.compress_statistics)

    def frozen_output(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ W.T + bias`` with the 4-bit weight; subclasses (LoRA) add to it."""
        owner = owner_name(self)
        checks.check_4bit_config(owner, self.quant_type, self.blocksize)
        checks.check_positive_int(owner, "features", self.features)
        dtypes.check_4bit_input(owner, inputs)
        if not self.has_variable(QUANTIZED, "weight") and not self.is_mutable_collection(QUANTIZED):
            raise missing_weight_error(owner)
        q = self.variable(QUANTIZED, "weight", self._quantized_kernel, inputs.shape[-1]).value
        q = checks.check_dense_4bit_weight(owner, q, inputs, self.features, self.quant_type, self.blocksize)
        bias = self.declare_bias()
        compute = dtypes.fourbit_compute_dtype(owner, inputs, q, self.compute_dtype, stacklevel=3)
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


_variant = functools.partial(variants.fixed_variant, module=__name__, defaults=variants.field_defaults)

DenseNF4, DenseFP4 = (_variant(Dense4bit, *spec) for spec in variants.FOURBIT_DENSE)
