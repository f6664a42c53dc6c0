"""Getting weights into (and out of) the 4-bit Linen layers.

- :func:`quantize_params_4bit`: a float Flax params tree (``nn.Dense`` kernels ``(in, out)``,
  ``nn.Embed`` tables) -> ``{"params", "quantized"}`` variables for Dense4bit / Embed4bit /
  LoRADense4bit at the same module paths. One call, a tqdm progress bar for large trees.
- :func:`load_bnb_4bit`: a bitsandbytes 4-bit checkpoint (safetensors file or state dict, SPEC
  §6.2 keys, one layer or a whole model) -> the same variables.
- :func:`to_bnb_4bit_state_dict` / :func:`save_bnb_4bit`: the reverse, byte-compatible with
  bitsandbytes 0.49.2's ``Linear4bit`` (load it with ``Params4bit.from_prequantized``).

Module paths: a torch module name "model.layers.0.q_proj" is the Flax path
("model", "layers", "0", "q_proj"); pass ``rename`` to map between naming schemes (e.g.
``lambda n: n.replace("layers.", "layers_")``). The names are 4-bit specific on purpose: 8-bit
layers have their own converters.
"""

import os
import sys
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qflax import bnb_format
from qflax import checkpoint_checks as checks
from qflax.linen.dense_4bit import QUANTIZED, check_layer_config
from qflax.quant import validation
from qflax.quant.fourbit import Packed4bit, quantize_4bit

# Trees with at least this many weights to quantize show a progress bar by default.
PROGRESS_MIN_WEIGHTS = 1 << 26
_FLOAT_KINDS = {"kernel": "dense", "embedding": "embed"}

_quantize_jit = jax.jit(quantize_4bit, static_argnames=("blocksize", "quant_type", "compress_statistics"))


def _set(tree: dict, path: tuple, value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _float_jobs(params: Mapping, keep_float: Optional[Callable[[tuple], bool]]) -> tuple[list, dict]:
    """Splits the tree into (to_quantize, kept_params): each job is (module_path, leaf_name, array)."""
    jobs, kept = [], {}

    def walk(node: Mapping, path: tuple) -> None:
        for name, value in node.items():
            if isinstance(value, Mapping):
                walk(value, path + (name,))
                continue
            quantize = (
                name in _FLOAT_KINDS
                and getattr(value, "ndim", None) == 2
                and not (keep_float is not None and keep_float(path))
            )
            if quantize:
                jobs.append((path, name, value))
            else:
                _set(kept, path + (name,), value)

    walk(params, ())
    return jobs, kept


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
    """Quantizes every Dense kernel and Embed table of a float params tree, in one call.

    Each 2-D ``kernel`` (Flax ``(in, out)``) becomes a quantized ``weight`` of shape
    ``(out, in)``; each 2-D ``embedding`` becomes a quantized ``weight`` of the same shape; all
    other leaves (biases, norms, N-D kernels, layers selected by ``keep_float``) stay in
    "params" unchanged. Use the same module names in the 4-bit model (explicit ``name=`` or
    ``setup`` attributes), and declare the layers with the same quant_type and blocksize.

    Args:
      params: the float params tree (``variables["params"]`` of an ``nn.Dense``/``nn.Embed`` model).
      quant_type: "nf4" or "fp4".
      blocksize: absmax block size (32 ... 4096).
      compress_statistics: double quantization for Dense kernels (Dense4bit's default True).
      embed_compress_statistics: double quantization for Embed tables (Embed4bit's default False).
      keep_float: optional predicate on a module path (tuple of names); True keeps that
        layer's weight in float (e.g. ``lambda p: p[-1] == "lm_head"``).
      progress: show a tqdm bar; None shows it when at least 2**26 weights are quantized.

    Returns:
      ``{"params": ..., "quantized": ...}`` (plain dicts) for ``model.apply``.

    Raises:
      TypeError: ``params`` is not a mapping, or a weight to quantize is not a float array.
      ValueError: bad ``quant_type``/``blocksize``. (NaN/Inf are values: their blocks decode to
        NaN, see :mod:`qflax.quant.scaling`.)

    Example:
      >>> float_params = FloatMLP().init(key, x)["params"]        # nn.Dense(name="fc1"), ...
      >>> variables = quantize_params_4bit(float_params)
      >>> y = MLP4bit().apply(variables, x)                      # DenseNF4(name="fc1"), ...
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping (a Flax params tree), got {type(params).__name__}")
    check_layer_config("quantize_params_4bit", quant_type, blocksize)
    jobs, kept = _float_jobs(params, keep_float)
    total = sum(int(np.prod(value.shape)) for _, _, value in jobs)
    show = total >= PROGRESS_MIN_WEIGHTS if progress is None else progress
    quantized: dict = {}
    bar = tqdm(jobs, desc="quantizing to 4 bits", unit="layer", disable=not show, file=sys.stderr)
    for path, name, value in bar:
        where = "/".join(str(p) for p in path + (name,))
        value = validation.check_float_array(value, f"params/{where}")
        if _FLOAT_KINDS[name] == "dense":
            value, nested = value.T, compress_statistics  # Flax (in, out) -> bitsandbytes (out, in)
        else:
            nested = embed_compress_statistics
        q = _quantize_jit(value, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        _set(quantized, path + ("weight",), q)
    return {"params": kept, QUANTIZED: quantized}


def _read_source(source: Union[str, os.PathLike, Mapping]) -> Mapping:
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        try:
            from safetensors.flax import load_file  # keeps bfloat16 tensors (numpy has no bfloat16)
        except ImportError as err:
            raise ImportError("reading .safetensors files needs: pip install safetensors") from err
        return load_file(os.fspath(source))
    raise TypeError(f"source must be a state dict (mapping) or a .safetensors path, got {type(source).__name__}")


def _module_path(module_prefix: str, rename: Optional[Callable[[str], str]]) -> tuple:
    name = rename(module_prefix) if rename is not None else module_prefix
    return tuple(name.split(".")) if name else ()


def load_bnb_4bit(
    source: Union[str, os.PathLike, Mapping], *, rename: Optional[Callable[[str], str]] = None
) -> dict:
    """Loads every 4-bit weight of a bitsandbytes checkpoint into qflax variables.

    A 4-bit weight is recognised by its ``<name>.quant_state.bitsandbytes__nf4|fp4`` entry; its
    packed bytes, absmax, quant maps and nested statistics are read with
    :func:`qflax.bnb_format.from_bnb_state_dict` (stored tables always honoured), and the
    module's ``bias`` (if present) goes to "params". Other entries (float layers, norms) are
    left out: map them to your model yourself.

    Args:
      source: a state dict (numpy/jax arrays or CPU torch tensors, e.g. ``linear.state_dict()``)
        or the path of a ``.safetensors`` file.
      rename: optional function from a dotted torch module name ("model.layers.0.q_proj",
        "" for a root layer) to the dotted Flax module path.

    Returns:
      ``{"params": {..: {"bias"}}, "quantized": {..: {"weight": Packed4bit}}}``.

    Raises:
      ValueError: no 4-bit weight found, ``rename`` maps two weights to one path, or an entry is
        inconsistent (see :mod:`qflax.checkpoint_checks_4bit`).
      KeyError: a required entry (packed weight, absmax, quant_map, nested statistics) is missing.
      TypeError: ``source`` is neither a mapping nor a path.
    """
    state = _read_source(source)
    marker = "." + bnb_format.QUANT_STATE_KEY
    weight_keys = sorted({key.split(marker)[0] for key in state if marker in key})
    if not weight_keys:
        raise ValueError(
            f"no 4-bit weights in the checkpoint: expected keys like 'fc.weight{marker}nf4' "
            f"(found {len(state)} keys, e.g. {list(state)[:3]})"
        )
    targets = [(k, _module_path(k.rpartition(".")[0], rename) + (k.rpartition(".")[2],)) for k in weight_keys]
    checks.check_unique_targets(targets, "rename")
    params: dict = {}
    quantized: dict = {}
    for weight_key, path in targets:
        module_prefix = weight_key.rpartition(".")[0]
        q = bnb_format.from_bnb_state_dict(state, prefix=weight_key)
        _set(quantized, path, q)
        bias_key = f"{module_prefix}.bias" if module_prefix else "bias"
        if bias_key in state:
            checks.check_bias(state[bias_key], q.shape[0], bias_key)
            _set(params, path[:-1] + ("bias",), jnp.asarray(bnb_format.to_numpy(state[bias_key])))
    return {"params": params, QUANTIZED: quantized}


def to_bnb_4bit_state_dict(variables: Mapping, *, rename: Optional[Callable[[str], str]] = None) -> dict:
    """The bitsandbytes state-dict entries of every 4-bit weight (and its module's bias).

    Args:
      variables: ``{"params": ..., "quantized": ...}`` of a model with 4-bit layers.
      rename: optional function from the dotted Flax module path to the torch module name.

    Returns:
      A flat dict of numpy arrays: for each layer ``<m>.weight`` and its SPEC §6.2 entries, and
      ``<m>.bias`` when the layer has one. Float layers are not included.

    Raises:
      KeyError: ``variables`` has no "quantized" collection.
      ValueError: a quantized leaf does not match its recorded shape (e.g. stacked by nn.scan).
    """
    if QUANTIZED not in variables:
        raise KeyError(f"variables has no {QUANTIZED!r} collection, got {list(variables)}")
    is_weight = lambda x: isinstance(x, Packed4bit)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(variables[QUANTIZED], is_leaf=is_weight)[0]
    params = variables.get("params", {})
    out: dict = {}
    for key_path, q in leaves:
        if not isinstance(q, Packed4bit):
            continue
        names = tuple(str(getattr(k, "key", k)) for k in key_path)
        if q.packed.shape != ((q.size + 1) // 2, 1):
            where = "/".join(names)
            raise ValueError(f"quantized/{where}: packed data {q.packed.shape} does not match shape {q.shape}")
        module_path, leaf = names[:-1], names[-1]
        dotted = ".".join(module_path)
        module_prefix = rename(dotted) if rename is not None else dotted
        weight_key = f"{module_prefix}.{leaf}" if module_prefix else leaf
        out.update(bnb_format.to_bnb_state_dict(q, prefix=weight_key))
        node = params
        for name in module_path:
            node = node.get(name, {}) if isinstance(node, Mapping) else {}
        if isinstance(node, Mapping) and "bias" in node:
            out[f"{module_prefix}.bias" if module_prefix else "bias"] = np.asarray(node["bias"])
    return out


def save_bnb_4bit(
    path: Union[str, os.PathLike], variables: Mapping, *, rename: Optional[Callable[[str], str]] = None
) -> None:
    """Writes :func:`to_bnb_4bit_state_dict` to a ``.safetensors`` file (needs the safetensors package)."""
    try:
        from safetensors.flax import save_file
    except ImportError as err:
        raise ImportError("writing .safetensors files needs: pip install safetensors") from err
    state = to_bnb_4bit_state_dict(variables, rename=rename)
    save_file({k: jnp.asarray(v) for k, v in state.items()}, os.fspath(path))
