"""Variables of :class:`Dense8bitLt` from float Dense params and to/from bitsandbytes' 8-bit keys.

A float ``nn.Dense`` holds ``params = {"kernel": (in, out), "bias": (out,)}``; a frozen
``Dense8bitLt`` holds ``{"params": {"bias"}, "quantized": {"weight": Int8Rows}}`` where the
Int8Rows is the row-wise int8 quantization of ``kernel.T`` (bitsandbytes' ``(out, in)``
layout). bitsandbytes' ``Linear8bitLt`` state dict holds ``weight`` (int8 ``(out, in)``),
``SCB`` (float32 ``(out,)``), ``weight_format`` (0 = "row") and ``bias`` (SPEC §6.3); with
``has_fp16_weights=True`` it holds only the float ``weight (out, in)`` and ``bias``.
"""

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from qflax import bnb_format
from qflax import checkpoint_checks as checks
from qflax.quant import int8 as int8_quant
from qflax.quant import validation

QUANTIZED = "quantized"


def int8_weight_from_kernel(kernel: Any) -> int8_quant.Int8Rows:
    """The frozen Dense8bitLt weight of a float Flax kernel ``(in, out)``: ``quantize_rows(kernel.T)``.

    Raises:
      TypeError: ``kernel`` is not a float array.
      ValueError: ``kernel`` is not 2-D.
    """
    kernel = validation.check_float_array(kernel, "kernel")
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be 2-D (in_features, out_features), got shape {tuple(kernel.shape)}")
    return int8_quant.quantize_rows(kernel.T)


def quantize_params_8bit(params: Mapping[str, Any]) -> dict[str, dict]:
    """Turns float Dense params (nested to any depth) into frozen Dense8bitLt variables.

    Every sub-dict that holds a 2-D float ``"kernel"`` is treated as one dense layer: the
    kernel is replaced by an :class:`Int8Rows` ``"weight"`` at the same path in the
    ``"quantized"`` collection; its other entries (the bias) stay in ``"params"``. So the
    params of a model built from ``nn.Dense`` load into the same model built from
    ``Dense8bitLt(has_fp16_weights=False)``.

    Example:
      >>> float_vars = float_mlp.init(rng, x)
      >>> int8_vars = quantize_params_8bit(float_vars["params"])
      >>> y = int8_mlp.apply(int8_vars, x)

    Args:
      params: a (nested) mapping of float params, e.g. ``variables["params"]``.

    Returns:
      ``{"params": ..., "quantized": ...}``.
    """
    new_params, quantized = {}, {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            sub = quantize_params_8bit(value)
            if sub["params"]:
                new_params[key] = sub["params"]
            if sub["quantized"]:
                quantized[key] = sub["quantized"]
        elif key == "kernel" and getattr(value, "ndim", 0) == 2:
            quantized["weight"] = int8_weight_from_kernel(value)
        else:
            new_params[key] = value
    return {"params": new_params, QUANTIZED: quantized}


def to_bnb_state_dict_8bit(variables: Mapping[str, Any], module_prefix: str = "") -> dict[str, np.ndarray]:
    """bitsandbytes ``Linear8bitLt`` state-dict entries of one Dense8bitLt's variables.

    Args:
      variables: ``{"params": {["bias"], ["kernel"]}, ["quantized": {"weight"}]}`` of one layer:
        frozen (int8 weight) or trainable (float kernel, saved as ``weight = kernel.T`` and
        no SCB, as bitsandbytes does with ``has_fp16_weights=True``).
      module_prefix: prepended to every key, e.g. ``"model.fc1."``.

    Returns:
      A dict of numpy arrays with bitsandbytes' keys, dtypes and shapes.

    Raises:
      KeyError: neither a quantized weight nor a kernel is present.
    """
    params = variables.get("params", {})
    quantized = variables.get(QUANTIZED, {})
    if "weight" in quantized:
        out = bnb_format.to_bnb_int8_state_dict(quantized["weight"], module_prefix)
    elif "kernel" in params:
        out = {f"{module_prefix}weight": np.asarray(params["kernel"]).T.copy()}
    else:
        raise KeyError("variables must hold quantized['weight'] (frozen) or params['kernel'] (trainable)")
    if "bias" in params:
        out[f"{module_prefix}bias"] = np.asarray(params["bias"])
    return out


def from_bnb_state_dict_8bit(d: Mapping[str, Any], module_prefix: str = "") -> dict[str, dict]:
    """Dense8bitLt variables from a bitsandbytes ``Linear8bitLt`` state dict.

    An int8 ``weight`` with ``SCB`` gives frozen variables (``has_fp16_weights=False``); a
    float ``weight`` without ``SCB`` gives trainable ones (``"kernel" = weight.T``).

    Args:
      d: a mapping of keys to numpy arrays, jax arrays or CPU torch tensors.
      module_prefix: the layer's key prefix, e.g. ``"model.fc1."``.

    Returns:
      ``{"params": {["bias"], ["kernel"]}, "quantized": {["weight"]}}``.

    Raises:
      KeyError: ``weight`` missing, or an int8 weight without ``SCB``.
      ValueError: unknown ``weight_format``, SCB length != weight rows, wrong dtypes (a
        non-int8 ``weight`` next to ``SCB`` is a TypeError too), a bias of another length.
    """
    weight_key = f"{module_prefix}weight"
    if weight_key not in d:
        raise KeyError(f"state dict is missing the key {weight_key!r}")
    weight = bnb_format.to_numpy(d[weight_key])
    params: dict[str, Any] = {}
    quantized: dict[str, Any] = {}
    if weight.dtype == np.int8 or f"{module_prefix}SCB" in d:  # SCB makes it an int8 checkpoint
        quantized["weight"] = bnb_format.from_bnb_int8_state_dict(d, module_prefix)
    else:
        checks.check_float_weight(weight, weight_key)
        params["kernel"] = validation.check_float_array(weight, weight_key).T
    if f"{module_prefix}bias" in d:
        checks.check_bias(d[f"{module_prefix}bias"], weight.shape[0], f"{module_prefix}bias")
        params["bias"] = validation.check_float_array(bnb_format.to_numpy(d[f"{module_prefix}bias"]), "bias")
    return {"params": params, QUANTIZED: quantized}


def dense_kernel_from_int8(weight: int8_quant.Int8Rows, dtype: Any = jnp.float32) -> Any:
    """The float Flax kernel ``(in, out)`` of a frozen weight: ``dequant(weight).T`` in ``dtype``."""
    return int8_quant.int8_vectorwise_dequant(weight.codes, weight.scale).T.astype(dtype)
