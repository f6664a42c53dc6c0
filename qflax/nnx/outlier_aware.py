"""``OutlierAwareDense`` and its outlier search as NNX: bitsandbytes' OutlierAwareLinear/OutlierTracer (docs/int8.md).

NNX twin of :mod:`qflax.linen.outlier_aware`, in the same three steps:

1. A fresh layer holds a float "kernel" and "bias" (``nnx.Param``) and an empty outlier
   index list ("idx", an :class:`OutlierDims` variable); it runs as a float Dense.
2. :func:`find_outlier_dims` runs sample inputs through the model and returns, per layer
   path, the input dimensions holding any ``|x| >= threshold`` and, optionally, those whose
   standard deviation has a z-score above ``zscore``.
3. :func:`quantize_outlier_aware` stores the indices and calls each layer's
   ``quantize_weight`` once; the result becomes the :class:`QuantizedWeight` "weight" and the
   float kernel is dropped. From then on ``__call__`` returns
   ``forward_with_outliers(x, outlier_idx)``.

Subclasses override the two hooks, as with the Linen module.
"""

import contextlib
import contextvars
from typing import Any, ClassVar, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qflax.layers import checks, outliers
from qflax.layers.names import OUTLIERS
from qflax.layers.outliers import OutlierSplitWeight
from qflax.nnx.construction import DenseParams
from qflax.nnx.variables import QuantizedWeight
from qflax.quant import validation


@nnx.register_variable_name(OUTLIERS)
class OutlierDims(nnx.Variable):
    """The outlier input dimensions of an :class:`OutlierAwareDense` (int32 ``(n,)``); Linen collection "outliers"."""


# While find_outlier_dims runs: {id(layer): input statistics}, filled by the layers' __call__.
_recording: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("qflax_outlier_recording", default=None)


class OutlierAwareDense(DenseParams, nnx.Module):
    """A dense layer that keeps chosen input dimensions in full precision and the rest in int8.

    Args:
      in_features, out_features: the layer's sizes.
      backend: "auto", "xla", "triton" or None, for the int8 matmul.
      **dense: ``use_bias``, ``param_dtype``, ``kernel_init``, ``bias_init`` and ``rngs``, as
        :class:`~qflax.nnx.construction.DenseParams`.
    """

    # Variables that exist only before ("kernel") or after ("weight") quantization.
    optional_variables: ClassVar[tuple[str, ...]] = ("kernel", "weight")

    def __init__(self, in_features: int, out_features: int, *, backend: Optional[str] = None, **dense):
        self.kernel = nnx.data(nnx.Param(self.init_dense(in_features, out_features, **dense)))
        self.backend = backend
        self.idx = OutlierDims(jnp.zeros((0,), jnp.int32))
        self.weight: Optional[QuantizedWeight] = nnx.data(None)

    def _outlier_idx(self) -> jax.Array:
        return checks.check_outlier_idx(self.idx.get_value(), self.in_features)

    def quantize(self) -> None:
        """Quantizes the float kernel with the current outlier dims (``quantize_weight``) and drops it."""
        if self.weight is not None:
            raise ValueError("this OutlierAwareDense is already quantized")
        self.weight = QuantizedWeight(self.quantize_weight(self.kernel[...].T, self._outlier_idx()))
        self.kernel = None

    def quantize_weight(self, w: jax.Array, outlier_idx: jax.Array) -> Any:
        """Hook: quantizes the float weight ``w (out, in)`` given the outlier input dims.

        Returns:
          What :meth:`forward_with_outliers` reads from "weight"; the default is an
          :class:`~qflax.layers.outliers.OutlierSplitWeight`.
        """
        return outliers.split_weight(w, outlier_idx)

    def forward_with_outliers(self, x: jax.Array, outlier_idx: jax.Array) -> jax.Array:
        """Hook: the output from the stored "weight".

        The default: the outlier input dimensions multiply their float weight columns in the
        input precision; the others go through LLM.int8 (``matmul_8bit``, threshold 0) with
        the outlier columns of ``x`` zeroed.

        Returns:
          ``(..., out_features)`` in ``x``'s dtype.
        """
        weight: OutlierSplitWeight = self.weight.get_value()
        return outliers.split_forward(x, weight, self.bias_value(), outlier_idx, self.backend)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Float Dense before quantization, ``forward_with_outliers(x, outlier_idx)`` after."""
        x = validation.check_float_array(x, "x", allow_empty=True)
        recording = _recording.get()
        if recording is not None:
            outliers.merge_stats(recording["found"], id(self), outliers.input_stats(x, recording["zscore"]))
        outlier_idx = self._outlier_idx()
        if self.weight is not None:
            return self.forward_with_outliers(x, outlier_idx)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        return outliers.float_forward(x, self.kernel[...], self.bias_value())


@contextlib.contextmanager
def _record_inputs(zscore: bool) -> Iterator[dict]:
    found: dict = {}
    token = _recording.set({"zscore": zscore, "found": found})
    try:
        yield found
    finally:
        _recording.reset(token)


@nnx.jit(static_argnums=2)
def _collect(model: nnx.Module, x: jax.Array, zscore: bool) -> dict:
    paths = {id(m): ".".join(str(p) for p in path) for path, m in nnx.iter_modules(model)}
    with _record_inputs(zscore) as found:
        model(x)
    return {paths[key]: stats for key, stats in found.items()}


def find_outlier_dims(
    model: nnx.Module, samples: Any, threshold: float = 6.0, zscore: Optional[float] = None
) -> dict[str, np.ndarray]:
    """Runs sample inputs through ``model`` and records each OutlierAwareDense's outlier input dimensions.

    Args:
      model: an NNX model taking the sample as its only argument, with float (not yet
        quantized) OutlierAwareDense layers.
      samples: one input array or an iterable of them.
      threshold: a dimension is an outlier if any input value has ``|x| >= threshold``;
        0 disables this criterion.
      zscore: if set, a dimension is also an outlier when the z-score (across dimensions) of
        its standard deviation over the batch exceeds ``zscore`` in any sample.

    Returns:
      ``{dotted layer path: sorted int32 indices}`` ("" for a model that is one layer).

    Raises:
      ValueError: negative threshold, bad zscore, no samples, or no OutlierAwareDense called.
    """
    search = outliers.OutlierSearch(threshold, zscore)
    for x in search.samples(samples):
        search.add(_collect(model, x, zscore is not None))
    return search.indices([OutlierAwareDense.__name__])


def quantize_outlier_aware(model: nnx.Module, outlier_dims: Mapping[str, Any]) -> nnx.Module:
    """Stores outlier dims and quantizes every float OutlierAwareDense of ``model``, in place.

    Args:
      model: the NNX model.
      outlier_dims: ``{dotted layer path: indices}`` (e.g. from :func:`find_outlier_dims`);
        layers not listed keep the indices they hold (empty when fresh).

    Returns:
      ``model``.

    Raises:
      KeyError: a path of ``outlier_dims`` is not an OutlierAwareDense of the model.
    """
    layers = {
        ".".join(str(p) for p in path): m for path, m in nnx.iter_modules(model) if isinstance(m, OutlierAwareDense)
    }
    unknown = sorted(set(outlier_dims) - set(layers))
    if unknown:
        raise KeyError(f"outlier_dims names paths that are not OutlierAwareDense layers of the model: {unknown}")
    for path, idx in outlier_dims.items():
        layers[path].idx.set_value(jnp.asarray(np.asarray(idx), jnp.int32))
    for layer in layers.values():
        if layer.weight is None:
            layer.quantize()
    return model
