"""OutlierAwareDense's maths and its outlier search, shared by the Linen and NNX layers (docs/int8.md#outlier-aware).

A layer keeps chosen input dimensions (the outliers) in the input precision and the rest in LLM.int8.
The search runs sample inputs through a model; each traced layer reports per-dimension statistics of
its inputs (:func:`input_stats`), merged over calls and samples into outlier indices
(:class:`OutlierSearch`).
"""

from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qflax import ops
from qflax.quant import int8 as int8_quant


@struct.dataclass
class OutlierSplitWeight:
    """A weight split by input dimension: int8 for the ordinary ones, float for the outliers.

    Attributes:
      int8: :class:`~qflax.quant.Int8Rows` of the ``(out, in)`` weight with the outlier columns zeroed.
      outlier_columns: float ``(out, n_outliers)``: the weight's outlier columns as they were.
    """

    int8: int8_quant.Int8Rows
    outlier_columns: jax.Array


def split_weight(w: jax.Array, outlier_idx: jax.Array) -> OutlierSplitWeight:
    """The default ``quantize_weight``: outlier columns of ``w (out, in)`` kept float, the rest LLM.int8."""
    return OutlierSplitWeight(
        int8=int8_quant.quantize_rows(w.at[:, outlier_idx].set(0)), outlier_columns=w[:, outlier_idx]
    )


def split_forward(
    x: jax.Array, weight: OutlierSplitWeight, bias: Optional[jax.Array], outlier_idx: jax.Array, backend: Any
) -> jax.Array:
    """The default ``forward_with_outliers``.

    The outlier input dimensions multiply their float weight columns in the input precision; the other
    dimensions go through LLM.int8 (``matmul_8bit``, threshold 0) with the outlier columns of ``x`` zeroed.

    Returns:
      ``(..., out)`` in ``x``'s dtype.
    """
    y = ops.matmul_8bit(x.at[..., outlier_idx].set(0), weight.int8, bias, backend=backend)
    if outlier_idx.shape[0]:
        x_out = x[..., outlier_idx]
        y_out = jnp.matmul(x_out, weight.outlier_columns.T.astype(x.dtype), preferred_element_type=jnp.float32)
        y = (y.astype(jnp.float32) + y_out).astype(x.dtype)
    return y


def float_forward(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """The layer before quantization: a float Dense with a ``(in, out)`` kernel, float32 accumulation."""
    y = jnp.matmul(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def input_stats(x: jax.Array, zscore: bool) -> dict[str, jax.Array]:
    """Per-dimension statistics of one layer input ``(..., in)``: absmax and (if asked) the z-score of the std.

    The z-score is bitsandbytes' ``find_outlier_dims`` statistic: the standard deviation of each
    dimension over the batch, standardized across dimensions.
    """
    h = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    stats = {"absmax": jnp.max(jnp.abs(h), axis=0)}
    if zscore:
        std = jnp.std(h, axis=0, ddof=1) if h.shape[0] > 1 else jnp.zeros(h.shape[-1], jnp.float32)
        stats["z"] = (std - jnp.mean(std)) / jnp.maximum(jnp.std(std, ddof=1), jnp.float32(1e-12))
    return stats


def merge_stats(found: dict, key: Any, stats: dict) -> None:
    """Records ``stats`` for layer ``key``; a layer applied twice keeps the larger statistic per dim."""
    found[key] = jax.tree_util.tree_map(jnp.maximum, found[key], stats) if key in found else stats


class OutlierSearch:
    """Outlier indices per layer, from the statistics of any number of samples.

    Args:
      threshold: a dimension is an outlier if any input value has ``|x| >= threshold`` (LLM.int8's
        criterion); 0 disables this criterion.
      zscore: if set, a dimension is also an outlier when the z-score of its standard deviation exceeds
        it in any sample.

    Raises:
      ValueError: a negative or non-finite threshold, or a zscore that is not positive.
    """

    def __init__(self, threshold: float, zscore: Optional[float]):
        if not np.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        if zscore is not None and not zscore > 0:
            raise ValueError(f"zscore must be > 0 or None, got {zscore!r}")
        self.threshold = threshold
        self.zscore = zscore
        self._masks: dict = {}

    @staticmethod
    def samples(samples: Any) -> list:
        """One input array or an iterable of them, as a non-empty list.

        Raises:
          ValueError: no samples.
        """
        if isinstance(samples, (jax.Array, np.ndarray)):
            return [samples]
        samples = list(samples)
        if not samples:
            raise ValueError("samples must hold at least one input")
        return samples

    def add(self, stats_by_layer: dict) -> None:
        """Adds one sample's ``{layer: input_stats}``."""
        for layer, stats in stats_by_layer.items():
            mask = np.zeros(stats["absmax"].shape, bool)
            if self.threshold > 0:
                mask |= np.asarray(stats["absmax"]) >= self.threshold
            if self.zscore is not None:
                mask |= np.asarray(stats["z"]) > self.zscore
            self._masks[layer] = self._masks[layer] | mask if layer in self._masks else mask

    def indices(self, layer_names: Iterable[str]) -> dict:
        """``{layer: sorted int32 outlier indices}`` of every layer seen.

        Args:
          layer_names: what was traced, for the error when no layer was seen.

        Raises:
          ValueError: no traced layer was called.
        """
        if not self._masks:
            raise ValueError(f"no layer of type {list(layer_names)} was called by the model")
        return {layer: np.nonzero(mask)[0].astype(np.int32) for layer, mask in self._masks.items()}
