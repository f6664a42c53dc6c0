"""``OutlierAwareDense`` and its outlier search as NNX (bitsandbytes' OutlierAwareLinear/OutlierTracer, SPEC §8).

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
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qflax import ops
from qflax.linen.outlier_aware import OutlierSplitWeight
from qflax.nnx.variables import QuantizedWeight
from qflax.quant import int8 as int8_quant
from qflax.quant import validation

Initializer = Callable[..., jax.Array]


@nnx.register_variable_name("outliers")
class OutlierDims(nnx.Variable):
    """The outlier input dimensions of an :class:`OutlierAwareDense` (int32 ``(n,)``); Linen collection "outliers"."""


# While find_outlier_dims runs: {id(layer): input statistics}, filled by the layers' __call__.
_recording: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("qflax_outlier_recording", default=None)


class OutlierAwareDense(nnx.Module):
    """A dense layer that keeps chosen input dimensions in full precision and the rest in int8.

    Args:
      in_features: input features.
      out_features: output features.
      use_bias: whether to add a bias.
      param_dtype: dtype of the float kernel and bias.
      kernel_init: initializer of the ``(in, out)`` kernel.
      bias_init: initializer of the bias.
      backend: "auto", "xla", "triton" or None, for the int8 matmul.
      rngs: the ``nnx.Rngs`` the parameters are drawn from.
    """

    # Variables that exist only before ("kernel") or after ("weight") quantization.
    optional_variables: ClassVar[tuple[str, ...]] = ("kernel", "weight")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        param_dtype: Any = jnp.float32,
        kernel_init: Initializer = nnx.initializers.lecun_normal(),
        bias_init: Initializer = nnx.initializers.zeros_init(),
        backend: Optional[str] = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.backend = backend
        self.kernel = nnx.data(nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype)))
        self.bias = nnx.data(nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None)
        self.idx = OutlierDims(jnp.zeros((0,), jnp.int32))
        self.weight: Optional[QuantizedWeight] = nnx.data(None)

    def _outlier_idx(self) -> jax.Array:
        idx = self.idx.get_value()
        if not jnp.issubdtype(idx.dtype, jnp.integer) or idx.ndim != 1:
            raise TypeError(f"outliers['idx'] must be a 1-D integer array, got {idx.dtype} {tuple(idx.shape)}")
        if not isinstance(idx, jax.core.Tracer) and idx.size and (
            int(idx.min()) < 0 or int(idx.max()) >= self.in_features
        ):
            raise ValueError(f"outliers['idx'] must lie in [0, {self.in_features}), got {np.asarray(idx).tolist()}")
        return idx

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
          :class:`~qflax.linen.outlier_aware.OutlierSplitWeight`.
        """
        w_int8 = int8_quant.quantize_rows(w.at[:, outlier_idx].set(0))
        return OutlierSplitWeight(int8=w_int8, outlier_columns=w[:, outlier_idx])

    def forward_with_outliers(self, x: jax.Array, outlier_idx: jax.Array) -> jax.Array:
        """Hook: the output from the stored "weight".

        The default: the outlier input dimensions multiply their float weight columns in the
        input precision; the others go through LLM.int8 (``matmul_8bit``, threshold 0) with
        the outlier columns of ``x`` zeroed.

        Returns:
          ``(..., out_features)`` in ``x``'s dtype.
        """
        weight: OutlierSplitWeight = self.weight.get_value()
        bias = None if self.bias is None else self.bias[...]
        y = ops.matmul_8bit(x.at[..., outlier_idx].set(0), weight.int8, bias, backend=self.backend)
        if outlier_idx.shape[0]:
            x_out = x[..., outlier_idx]
            y_out = jnp.matmul(x_out, weight.outlier_columns.T.astype(x.dtype), preferred_element_type=jnp.float32)
            y = (y.astype(jnp.float32) + y_out).astype(x.dtype)
        return y

    def __call__(self, x: jax.Array) -> jax.Array:
        """Float Dense before quantization, ``forward_with_outliers(x, outlier_idx)`` after."""
        x = validation.check_float_array(x, "x", allow_empty=True)
        recording = _recording.get()
        if recording is not None:
            _record(recording, self, x)
        outlier_idx = self._outlier_idx()
        if self.weight is not None:
            return self.forward_with_outliers(x, outlier_idx)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        y = jnp.matmul(x, self.kernel[...].astype(x.dtype), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def _record(recording: dict, layer: OutlierAwareDense, x: jax.Array) -> None:
    """Input statistics of one call: per-dimension absmax and (if asked) z-score of the std."""
    h = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    stats = {"absmax": jnp.max(jnp.abs(h), axis=0)}
    if recording["zscore"]:
        std = jnp.std(h, axis=0, ddof=1) if h.shape[0] > 1 else jnp.zeros(h.shape[-1], jnp.float32)
        stats["z"] = (std - jnp.mean(std)) / jnp.maximum(jnp.std(std, ddof=1), jnp.float32(1e-12))
    found = recording["found"]
    key = id(layer)
    found[key] = jax.tree.map(jnp.maximum, found[key], stats) if key in found else stats


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
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    if zscore is not None and not zscore > 0:
        raise ValueError(f"zscore must be > 0 or None, got {zscore!r}")
    samples = [samples] if isinstance(samples, (jax.Array, np.ndarray)) else list(samples)
    if not samples:
        raise ValueError("samples must hold at least one input")
    masks: dict = {}
    for x in samples:
        for path, stats in _collect(model, x, zscore is not None).items():
            mask = np.zeros(stats["absmax"].shape, bool)
            if threshold > 0:
                mask |= np.asarray(stats["absmax"]) >= threshold
            if zscore is not None:
                mask |= np.asarray(stats["z"]) > zscore
            masks[path] = masks[path] | mask if path in masks else mask
    if not masks:
        raise ValueError("no OutlierAwareDense layer was called by the model")
    return {path: np.nonzero(mask)[0].astype(np.int32) for path, mask in masks.items()}


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
