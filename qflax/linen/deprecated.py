"""The converter names of the previous release, kept for one release as thin aliases.

Each warns with a DeprecationWarning naming its replacement: :func:`qflax.linen.quantize_params` with a
:class:`qflax.layers.QuantRules` for choosing what is quantized, and
:func:`qflax.linen.to_bnb_checkpoint` / :func:`qflax.linen.from_bnb_checkpoint` for whole-model
bitsandbytes checkpoints (4-bit and 8-bit together). Per-tensor entries stay in :mod:`qflax.bnb_format`.
"""

import os
import warnings
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from qflax import bnb_format
from qflax import checkpoint_checks as checks
from qflax.layers import trees
from qflax.layers.names import PARAMS, QUANTIZED
from qflax.layers.rules import QuantRules, Rule
from qflax.linen.checkpoint import from_bnb_checkpoint, to_bnb_checkpoint
from qflax.linen.convert import quantize_params
from qflax.quant import validation
from qflax.quant.fourbit import Packed4bit

Rename = Optional[Callable[[str], str]]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"qflax.linen.{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=3,
    )


def quantize_params_4bit(
    params: Mapping,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    embed_compress_statistics: bool = False,
    keep_float: Optional[Callable[[tuple], bool]] = None,
    progress: Optional[bool] = None,
) -> dict:
    """Deprecated: every 2-D Dense kernel and Embed table to 4 bits; use :func:`quantize_params`.

    ``keep_float(module_path_tuple)`` keeps chosen layers float, as ``Rule(pattern, keep_float=True)``.
    """
    _deprecated("quantize_params_4bit", "quantize_params(params, QuantRules(...))")
    settings = dict(format="4bit", quant_type=quant_type, blocksize=blocksize)
    keep = []
    if keep_float is not None:
        keep.append(Rule(lambda path: keep_float(tuple(path.split(".")) if path else ()), keep_float=True))
    rules = QuantRules(
        *keep,
        Rule("*", layers="dense", compress_statistics=compress_statistics, **settings),
        Rule("*", layers="embed", compress_statistics=embed_compress_statistics, **settings),
    )
    return quantize_params(params, rules, progress=progress)


def quantize_params_8bit(params: Mapping[str, Any]) -> dict:
    """Deprecated: every 2-D Dense kernel to LLM.int8 rows; use ``quantize_params(params, Rule(format="8bit"))``."""
    _deprecated("quantize_params_8bit", 'quantize_params(params, Rule("*", layers="dense", format="8bit"))')
    return quantize_params(params, Rule("*", layers="dense", format="8bit"), progress=False)


def load_bnb_4bit(source: Union[str, os.PathLike, Mapping], *, rename: Rename = None) -> dict:
    """Deprecated: the quantized layers of a bitsandbytes checkpoint; use :func:`from_bnb_checkpoint`."""
    _deprecated("load_bnb_4bit", "from_bnb_checkpoint(source)")
    return from_bnb_checkpoint(source, rename=rename)


def _only_4bit(variables: Mapping) -> dict:
    """The 4-bit weights of ``variables`` and the biases of their modules (the old exporters' scope)."""
    if QUANTIZED not in variables:
        raise KeyError(f"variables has no {QUANTIZED!r} collection, got {list(variables)}")
    params = trees.flat_variables(variables.get(PARAMS, {}))
    out: dict = {}
    for key, value in trees.flat_variables(variables[QUANTIZED]).items():
        if isinstance(value, Packed4bit):
            trees.nested_set(out, (QUANTIZED,) + key, value)
            bias = key[:-1] + ("bias",)
            if bias in params:
                trees.nested_set(out, (PARAMS,) + bias, params[bias])
    return out


def to_bnb_4bit_state_dict(variables: Mapping, *, rename: Rename = None) -> dict:
    """Deprecated: the entries of the 4-bit layers only; use :func:`to_bnb_checkpoint` (every layer)."""
    _deprecated("to_bnb_4bit_state_dict", "to_bnb_checkpoint(variables)")
    return to_bnb_checkpoint(_only_4bit(variables), rename=rename)


def save_bnb_4bit(path: Union[str, os.PathLike], variables: Mapping, *, rename: Rename = None) -> None:
    """Deprecated: writes the 4-bit layers' entries to a file; use ``to_bnb_checkpoint(variables, path)``."""
    _deprecated("save_bnb_4bit", "to_bnb_checkpoint(variables, path)")
    to_bnb_checkpoint(_only_4bit(variables), path, rename=rename)


def to_bnb_state_dict_8bit(variables: Mapping[str, Any], module_prefix: str = "") -> dict[str, np.ndarray]:
    """Deprecated: one Dense8bitLt's entries under ``module_prefix``; use :func:`to_bnb_checkpoint`."""
    _deprecated("to_bnb_state_dict_8bit", "to_bnb_checkpoint(variables)")
    if "weight" not in variables.get(QUANTIZED, {}) and "kernel" not in variables.get(PARAMS, {}):
        raise KeyError("variables must hold quantized['weight'] (frozen) or params['kernel'] (trainable)")
    return {f"{module_prefix}{key}": value for key, value in to_bnb_checkpoint(variables).items()}


def from_bnb_state_dict_8bit(d: Mapping[str, Any], module_prefix: str = "") -> dict[str, dict]:
    """Deprecated: one Dense8bitLt's variables from bitsandbytes' entries; use :func:`from_bnb_checkpoint`.

    An int8 ``weight`` or an ``SCB`` entry gives frozen variables (``SCB`` makes it an int8 checkpoint:
    its ``weight`` must be int8); a float ``weight`` without ``SCB`` gives trainable ones
    (``"kernel" = weight.T``, bitsandbytes' ``has_fp16_weights=True``).

    Raises:
      KeyError: ``weight`` missing, or an int8 weight without ``SCB``.
      ValueError: unknown ``weight_format``, SCB length != weight rows, wrong dtypes (a non-int8
        ``weight`` next to ``SCB`` is a TypeError too), a bias of another length.
    """
    _deprecated("from_bnb_state_dict_8bit", "from_bnb_checkpoint(state_dict)")
    weight_key = f"{module_prefix}weight"
    weight = bnb_format.to_numpy(checks.require(d, weight_key))
    params: dict[str, Any] = {}
    quantized: dict[str, Any] = {}
    if weight.dtype == np.int8 or f"{module_prefix}SCB" in d:
        quantized["weight"] = bnb_format.from_bnb_int8_state_dict(d, module_prefix)
    else:
        checks.check_float_weight(weight, weight_key)
        params["kernel"] = validation.check_float_array(weight, weight_key).T
    if f"{module_prefix}bias" in d:
        checks.check_bias(d[f"{module_prefix}bias"], weight.shape[0], f"{module_prefix}bias")
        params["bias"] = validation.check_float_array(bnb_format.to_numpy(d[f"{module_prefix}bias"]), "bias")
    return {PARAMS: params, QUANTIZED: quantized}
