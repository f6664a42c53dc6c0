"""``OutlierAwareDense`` and the outlier tracer: bitsandbytes' OutlierAwareLinear/OutlierTracer (docs/int8.md).

bitsandbytes hooks every ``nn.Linear`` with a forward pre-hook that records outlier input
dimensions, then each ``OutlierAwareLinear`` calls ``quantize_weight(w, outlier_idx)`` once, at
its first forward. The JAX equivalent here is functional and happens in three steps:

1. Float pass: ``model.init`` gives a float ``"kernel"`` and ``"bias"`` in ``"params"`` and an
   empty outlier list; applying those variables runs the layer as a float Dense.
2. :func:`find_outlier_dims` runs sample inputs through the model under a Flax method
   interceptor and returns, per layer path, the input dimensions holding any
   ``|x| >= threshold`` (LLM.int8's criterion) and, optionally, those whose standard
   deviation has a z-score above ``zscore`` (bitsandbytes' ``find_outlier_dims`` statistic).
3. :func:`quantize_outlier_aware` stores the indices in the ``"outliers"`` collection
   (``"idx"``), calls each layer's ``quantize_weight`` through one apply with ``"quantized"``
   mutable, and drops the float kernels.

After that, ``__call__`` returns ``forward_with_outliers(x, outlier_idx)`` (bitsandbytes'
forward returns None; we return the result). Subclasses override the two hooks; the
defaults keep the outlier input dimensions in the input precision and the rest in LLM.int8.
"""

from typing import Any, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qflax.layers import checks, outliers
from qflax.layers.names import OUTLIERS, QUANTIZED
from qflax.layers.outliers import OutlierSplitWeight
from qflax.layers.trees import nested_set
from qflax.linen.dense_params import DenseParams
from qflax.quant import validation


class OutlierAwareDense(DenseParams):
    """A dense layer that keeps chosen input dimensions in full precision and the rest in int8.

    Attributes (besides :class:`~qflax.linen.dense_params.DenseParams`'):
      backend: "auto", "xla", "triton" or None, for the int8 matmul.
    """

    backend: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Float Dense before quantization, ``forward_with_outliers(x, outlier_idx)`` after."""
        x = validation.check_float_array(x, "x", allow_empty=True)
        in_features = x.shape[-1]
        bias = self.declare_bias()
        outlier_idx = self._outlier_idx(in_features)
        if self.has_variable(QUANTIZED, "weight"):
            return self.forward_with_outliers(x, outlier_idx)
        kernel = self.declare_kernel(in_features)
        if self.is_mutable_collection(QUANTIZED) and not self.is_initializing():
            # The counterpart of bitsandbytes' quantize-at-first-forward.
            self.variable(QUANTIZED, "weight", lambda: self.quantize_weight(kernel.T, outlier_idx))
            return self.forward_with_outliers(x, outlier_idx)
        return outliers.float_forward(x, kernel, bias)

    def _outlier_idx(self, in_features: int) -> jax.Array:
        if self.has_variable(OUTLIERS, "idx") or self.is_mutable_collection(OUTLIERS):
            idx = self.variable(OUTLIERS, "idx", lambda: jnp.zeros((0,), jnp.int32)).value
        else:
            idx = jnp.zeros((0,), jnp.int32)
        return checks.check_outlier_idx(idx, in_features)

    def quantize_weight(self, w: jax.Array, outlier_idx: jax.Array) -> Any:
        """Hook: quantizes the float weight ``w (out, in)`` given the outlier input dims.

        Called once per layer by :func:`quantize_outlier_aware`; whatever it returns is stored
        as ``quantized["weight"]`` and read by :meth:`forward_with_outliers`.

        Returns:
          The default: an :class:`OutlierSplitWeight`.
        """
        return outliers.split_weight(w, outlier_idx)

    def forward_with_outliers(self, x: jax.Array, outlier_idx: jax.Array) -> jax.Array:
        """Hook: the layer's output from the stored ``quantized["weight"]``.

        The default: the outlier input dimensions multiply their float weight columns in the
        input precision; the other dimensions go through LLM.int8 (``matmul_8bit``,
        threshold 0) with the outlier columns of ``x`` zeroed.

        Returns:
          ``(..., features)`` in ``x``'s dtype.
        """
        weight: OutlierSplitWeight = self.get_variable(QUANTIZED, "weight")
        bias = self.get_variable("params", "bias") if self.use_bias else None
        return outliers.split_forward(x, weight, bias, outlier_idx, self.backend)


def _collect_inputs(model: nn.Module, layer_types: tuple, variables: Mapping, x: jax.Array, zscore: bool) -> dict:
    """Per-layer statistics of the inputs of ``layer_types`` layers for one sample (jit-able)."""
    found: dict = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, layer_types) and args:
            outliers.merge_stats(found, context.module.path, outliers.input_stats(jnp.asarray(args[0]), zscore))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, x)
    return found


def find_outlier_dims(
    model: nn.Module,
    variables: Mapping[str, Any],
    samples: Any,
    threshold: float = 6.0,
    zscore: Optional[float] = None,
    layer_types: Sequence[type] = (OutlierAwareDense,),
) -> dict[tuple[str, ...], np.ndarray]:
    """Runs sample inputs through ``model`` and records each layer's outlier input dimensions.

    Args:
      model: a Linen module taking the sample as its only argument.
      variables: its variables (float ``OutlierAwareDense`` layers, i.e. not yet quantized).
      samples: one input array or an iterable of them.
      threshold: a dimension is an outlier if any input value has ``|x| >= threshold``;
        0 disables this criterion.
      zscore: if set, a dimension is also an outlier when the z-score (across dimensions) of
        its standard deviation over the batch exceeds ``zscore`` in any sample.
      layer_types: module classes whose inputs are traced.

    Returns:
      ``{layer_path: sorted int32 indices}`` for every traced layer (possibly empty arrays).

    Raises:
      ValueError: negative threshold, no samples, or no traced layer in the model.
    """
    search = outliers.OutlierSearch(threshold, zscore)
    layer_types = tuple(layer_types)
    collect = jax.jit(lambda v, x: _collect_inputs(model, layer_types, v, x, zscore is not None))
    for x in search.samples(samples):
        search.add(collect(variables, x))
    return search.indices(t.__name__ for t in layer_types)


def _without_kernels(params: Mapping, paths: set) -> dict:
    def strip(tree: Mapping, prefix: tuple) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, Mapping):
                out[key] = strip(value, prefix + (key,))
            elif not (key == "kernel" and prefix in paths):
                out[key] = value
        return out

    return strip(params, ())


def quantize_outlier_aware(
    model: nn.Module,
    variables: Mapping[str, Any],
    outlier_dims: Mapping[tuple[str, ...], Any],
    sample: jax.Array,
) -> dict[str, Any]:
    """Quantizes every ``OutlierAwareDense`` of ``model`` with its outlier dims.

    Args:
      model: the Linen module.
      variables: its float variables (as used with :func:`find_outlier_dims`).
      outlier_dims: ``{layer_path: indices}`` (e.g. from :func:`find_outlier_dims`); layers
        not listed keep the indices already in ``variables["outliers"]`` (empty after init).
      sample: one input, used to run each layer's ``quantize_weight`` once.

    Returns:
      New variables: ``"outliers"`` with the indices, ``"quantized"`` with each layer's
      quantized weight, ``"params"`` without the quantized layers' float kernels.
    """
    dims = flax.core.unfreeze(variables.get(OUTLIERS, {}))  # a deep copy we may edit
    for path, idx in outlier_dims.items():
        nested_set(dims, tuple(path) + ("idx",), jnp.asarray(np.asarray(idx), jnp.int32))
    new_vars = {k: v for k, v in variables.items() if k != OUTLIERS}
    new_vars[OUTLIERS] = dims
    quantized_paths: set = set()

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, OutlierAwareDense):
            quantized_paths.add(context.module.path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        _, updated = model.apply(new_vars, sample, mutable=[QUANTIZED])
    new_vars[QUANTIZED] = updated[QUANTIZED]
    new_vars["params"] = _without_kernels(variables["params"], quantized_paths)
    return new_vars
