"""Whole models <-> bitsandbytes/torch state dicts (docs/state_dict.md), on Linen-style variables.

``qflax.linen.to_bnb_checkpoint``/``from_bnb_checkpoint`` call these on a model's variables, their NNX
twins on ``to_linen_variables(model)``, so a Linen and an NNX model with the same module names give the
same entries, byte for byte. Per-tensor entries come from :mod:`qflax.bnb_format`.

Key of a variable: the torch module name of its layer (the dotted module path, through ``rename``)
plus the torch name of the variable:

- a Packed4bit ``weight``: bitsandbytes' Linear4bit entries (``weight``, ``weight.absmax``, ...);
- an Int8Rows ``weight``: Linear8bitLt's ``weight`` (int8), ``SCB`` and ``weight_format``;
- a float ``kernel`` (Flax ``(in, out)``): ``weight``, transposed to torch's ``(out, in)``;
- an ``embedding`` table and a norm's ``scale``: ``weight``;
- SwitchBack's prepared int8 ``weight`` and ``weight_scale``: its buffers ``W_int8`` and ``state_W``;
- any other array under its own name, any other pytree as ``<name>.<field path>`` per leaf.

The 32-bit optimizer marks (collection ``optim_bits``) are not part of a checkpoint.
"""

import os
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from qflax import bnb_format
from qflax import checkpoint_checks as checks
from qflax.layers.names import OPTIM_BITS, OUTLIERS, PARAMS, QUANTIZED
from qflax.layers.trees import flat_variables, nested_set
from qflax.quant.fourbit import Packed4bit
from qflax.quant.int8 import Int8Rows

Rename = Optional[Callable[[str], str]]
_TO_WEIGHT = ("kernel", "embedding", "scale")
_SWITCHBACK_BUFFERS = {"weight": "W_int8", "weight_scale": "state_W"}


def _module_prefix(module_path: tuple, rename: Rename) -> str:
    dotted = ".".join(module_path)
    name = rename(dotted) if rename is not None else dotted
    return f"{name}." if name else ""


def _torch_name(flat: Mapping[tuple, Any], key: tuple) -> str:
    collection, *module_path, name = key
    if collection == QUANTIZED and name in _SWITCHBACK_BUFFERS and (QUANTIZED, *module_path, "weight_scale") in flat:
        return _SWITCHBACK_BUFFERS[name]
    return "weight" if name in _TO_WEIGHT else name


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _leaf_keys(value: Any, key: str) -> list[str]:
    """Keys of the leaves of a pytree without a bitsandbytes format: ``key.<field path>``."""

    def name(entry) -> str:  # a dataclass field, dict key or sequence index
        return str(getattr(entry, "name", getattr(entry, "key", getattr(entry, "idx", entry))))

    paths = jax.tree_util.tree_flatten_with_path(value)[0]
    return [key + "".join(f".{name(entry)}" for entry in path) for path, _ in paths]


def _entries(flat: Mapping[tuple, Any], key: tuple, value: Any, prefix: str) -> dict[str, np.ndarray]:
    name = key[-1]
    if isinstance(value, Packed4bit):
        if value.packed.shape != ((value.size + 1) // 2, 1):
            where = "/".join(key)
            raise ValueError(f"{where}: packed data {value.packed.shape} does not match shape {value.shape}")
        return bnb_format.to_bnb_state_dict(value, f"{prefix}{name}")
    if isinstance(value, Int8Rows) and name == "weight":
        return bnb_format.to_bnb_int8_state_dict(value, prefix)
    torch_key = prefix + _torch_name(flat, key)
    # Fresh, writable arrays (as qflax.bnb_format's), ready for torch.from_numpy.
    if _is_array(value):
        return {torch_key: np.array(value.T if name == "kernel" else value, order="C")}
    return {k: np.array(leaf) for k, leaf in zip(_leaf_keys(value, torch_key), jax.tree.leaves(value))}


def to_state_dict(variables: Mapping[str, Any], rename: Rename = None) -> dict[str, np.ndarray]:
    """The bitsandbytes/torch state dict of a model's variables (keys as in the module docstring).

    Args:
      variables: ``{"params": ..., "quantized": ..., ...}``.
      rename: maps a dotted Flax module path to the torch module name.

    Returns:
      A flat dict of fresh, writable numpy arrays.

    Raises:
      ValueError: two variables map to the same key, or a 4-bit weight's packed data does not match
        its recorded shape (e.g. stacked by ``nn.scan``).
    """
    flat = {key: value for key, value in flat_variables(variables).items() if key[0] != OPTIM_BITS}
    out: dict[str, np.ndarray] = {}
    for key, value in flat.items():
        entries = _entries(flat, key, value, _module_prefix(key[1:-1], rename))
        clash = sorted(entries.keys() & out.keys())
        if clash:
            raise ValueError(f"{'/'.join(key)} maps to state-dict keys already taken: {clash}")
        out.update(entries)
    return out


def _structure(value: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(value)
    return treedef, [(tuple(leaf.shape), np.dtype(leaf.dtype).name) for leaf in leaves]


def _describe(value: Any) -> str:
    if isinstance(value, Packed4bit):
        return f"{value.quant_type} shape {value.shape} blocksize {value.blocksize} nested={value.nested}"
    if isinstance(value, Int8Rows):
        return f"int8 {tuple(value.codes.shape)}"
    if _is_array(value):
        return f"{np.dtype(value.dtype).name} {tuple(value.shape)}"
    return str(jax.tree.map(lambda a: f"{np.dtype(a.dtype).name} {tuple(a.shape)}", value))


def _read(state: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in state:
        raise KeyError(f"state dict is missing the key {key!r}")
    return bnb_format.to_numpy(state[key])


def _load_one(state: Mapping[str, Any], flat: Mapping[tuple, Any], key: tuple, template: Any, prefix: str) -> Any:
    name = key[-1]
    torch_key = prefix + _torch_name(flat, key)
    if isinstance(template, Packed4bit):
        value = bnb_format.from_bnb_state_dict(state, f"{prefix}{name}")
    elif isinstance(template, Int8Rows) and name == "weight":
        value = bnb_format.from_bnb_int8_state_dict(state, prefix)
    elif _is_array(template):
        value = _read(state, torch_key)
        value = np.ascontiguousarray(value.T) if name == "kernel" else value
    else:
        leaves = [_read(state, k) for k in _leaf_keys(template, torch_key)]
        value = jax.tree.unflatten(jax.tree.structure(template), leaves)
    if isinstance(template, Packed4bit) and isinstance(value, Packed4bit):
        # The packed data's storage dtype (quant_storage) is how it was saved, not structure.
        template = template.replace(quant_storage=value.quant_storage)
    want, got = _structure(template), _structure(value)
    if key[0] == OUTLIERS:  # how many outlier dims a layer has is data, not structure
        want, got = (want[0], [len(s) for s, _ in want[1]]), (got[0], [len(s) for s, _ in got[1]])
    if want != got:
        raise ValueError(
            f"state dict entry {torch_key} does not fit the variable {'/'.join(key)}: "
            f"expected {_describe(template)}, got {_describe(value)}"
        )
    return jax.tree.map(jnp.asarray, value)


def _flax_to_torch_names(state: Mapping[str, Any], rename: Rename) -> Callable[[tuple], str]:
    """Module path -> key prefix for a load with a template, given ``rename`` (torch name -> Flax path).

    ``rename`` runs the torch-to-Flax way, but a template names Flax paths: every dotted prefix of the
    state dict's keys is renamed once, and a template path takes the torch name that renames to it.
    """
    if rename is None:
        return lambda module_path: _module_prefix(module_path, None)
    torch_names: dict[str, str] = {}
    for key in state:
        parts = key.split(".")
        for end in range(len(parts)):
            torch_name = ".".join(parts[:end])
            flax_name = rename(torch_name)
            if torch_names.setdefault(flax_name, torch_name) != torch_name:
                raise checks.CheckpointError(
                    f"rename maps both {torch_names[flax_name]!r} and {torch_name!r} to {flax_name!r}"
                )

    def prefix(module_path: tuple) -> str:
        torch_name = torch_names.get(".".join(module_path), ".".join(module_path))
        return f"{torch_name}." if torch_name else ""

    return prefix


def from_state_dict(state: Mapping[str, Any], template: Mapping[str, Any], rename: Rename = None) -> dict:
    """Variables of ``template``'s structure read from a bitsandbytes/torch state dict.

    Every variable of the template must find its entries with the same structure, shapes, dtypes and
    quantization settings (an ``outliers`` index list may change its length); stored code tables are
    used as stored.

    Args:
      state: keys to numpy arrays, jax arrays or CPU torch tensors.
      template: the variables to fill (values or ``jax.ShapeDtypeStruct`` s; e.g. ``model.init`` or
        ``jax.eval_shape`` of it). Its ``optim_bits`` marks are kept as they are.
      rename: maps a torch module name to the dotted Flax module path.

    Returns:
      New variables (jax arrays), nested like ``template``.

    Raises:
      KeyError: an entry is missing.
      ValueError: an entry does not fit its variable (shape, dtype, quant type, blocksize, ...).
    """
    flat = flat_variables(template)
    prefix = _flax_to_torch_names(state, rename)
    out: dict = {}
    for key, value in flat.items():
        if key[0] != OPTIM_BITS:
            value = _load_one(state, flat, key, value, prefix(key[1:-1]))
        nested_set(out, key, value)
    return out


def _int8_weight_without_state(state: Mapping[str, Any], key: str) -> bool:
    """Whether ``key`` is an int8 ``weight`` entry that is no 4-bit weight's packed data (no quant state)."""
    if not (key == "weight" or key.endswith(".weight")) or checks.dtype_name(state[key]) != "int8":
        return False
    return not any(k.startswith(f"{key}.{bnb_format.QUANT_STATE_KEY}") for k in state)


def quantized_layers_from_state_dict(state: Mapping[str, Any], rename: Rename = None) -> dict:
    """The quantized layers of a checkpoint, found by their keys, without a template.

    A 4-bit weight is recognised by its ``<name>.quant_state.bitsandbytes__nf4|fp4`` entry, an 8-bit one
    by its module's ``SCB`` (its ``weight`` must then be int8) or by an int8 ``weight`` (its ``SCB`` must
    then be there); each goes to ``quantized/<module path>/<name>`` and its module's ``bias`` (if
    present, checked against the weight's rows) to ``params``. Other entries (float layers, norms) are
    left out: load them with a template. Every entry is checked (:mod:`qflax.checkpoint_checks`) before
    the variables are built.

    Args:
      state: keys to numpy arrays, jax arrays or CPU torch tensors.
      rename: maps a torch module name ("model.layers.0.q_proj", "" for a root layer) to the dotted
        Flax module path.

    Returns:
      ``{"params": {..: {"bias"}}, "quantized": {..: {"weight": Packed4bit | Int8Rows}}}``.

    Raises:
      ValueError (CheckpointError): no quantized weight found, ``rename`` maps two weights to one path,
        or an entry is inconsistent (shape, dtype, quant type, a bias of another length or dtype;
        see :mod:`qflax.checkpoint_checks_4bit`).
      KeyError (MissingEntryError): a required entry is missing.
    """
    marker = "." + bnb_format.QUANT_STATE_KEY
    layers: dict[str, tuple] = {}  # module prefix -> (weight name, reader)
    for key in state:
        if marker in key:
            weight_key = key.split(marker)[0]
            module_name, _, leaf = weight_key.rpartition(".")
            layers[module_name] = (leaf, lambda k=weight_key: bnb_format.from_bnb_state_dict(state, prefix=k))
        elif key == "SCB" or key.endswith(".SCB") or _int8_weight_without_state(state, key):
            # An int8 weight is an 8-bit layer's even without its SCB: reading it names the missing entry.
            module_prefix = key[: -len("weight")] if key.endswith("weight") else key[: -len("SCB")]
            read = lambda p=module_prefix: bnb_format.from_bnb_int8_state_dict(state, p)  # noqa: E731
            layers[module_prefix[:-1]] = ("weight", read)
    if not layers:
        raise ValueError(
            f"no quantized weights in the checkpoint: expected keys like 'fc.weight{marker}nf4' (4-bit) or "
            f"'fc.SCB' (8-bit) (found {len(state)} keys, e.g. {list(state)[:3]})"
        )
    targets = []  # (weight key, variable path under "quantized")
    for module_name in sorted(layers):
        flax_name = rename(module_name) if rename is not None else module_name
        path = tuple(flax_name.split(".")) if flax_name else ()
        weight_key = f"{module_name}.{layers[module_name][0]}" if module_name else layers[module_name][0]
        targets.append((weight_key, path + (layers[module_name][0],)))
    checks.check_unique_targets(targets, "rename")
    out: dict = {PARAMS: {}, QUANTIZED: {}}
    for module_name, (_, path) in zip(sorted(layers), targets):
        weight = layers[module_name][1]()
        nested_set(out[QUANTIZED], path, weight)
        bias_key = f"{module_name}.bias" if module_name else "bias"
        if bias_key in state:
            rows = weight.shape[0] if isinstance(weight, Packed4bit) else weight.codes.shape[0]
            checks.check_bias(state[bias_key], rows, bias_key)
            nested_set(out[PARAMS], path[:-1] + ("bias",), jnp.asarray(bnb_format.to_numpy(state[bias_key])))
    return out


def read_source(source: Union[str, os.PathLike, Mapping]) -> Mapping:
    """A state dict as given, or the tensors of a ``.safetensors`` file (bfloat16 kept).

    Raises:
      TypeError: ``source`` is neither a mapping nor a path.
      ImportError: a path without the safetensors package.
    """
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        try:
            from safetensors.flax import load_file  # keeps bfloat16 tensors (numpy has no bfloat16)
        except ImportError as err:
            raise ImportError("reading .safetensors files needs: pip install safetensors") from err
        return load_file(os.fspath(source))
    raise TypeError(f"source must be a state dict (mapping) or a .safetensors path, got {type(source).__name__}")


def write_safetensors(path: Union[str, os.PathLike], state: Mapping[str, np.ndarray]) -> None:
    """Writes a state dict to a ``.safetensors`` file (needs the safetensors package)."""
    try:
        from safetensors.flax import save_file
    except ImportError as err:
        raise ImportError("writing .safetensors files needs: pip install safetensors") from err
    save_file({k: jnp.asarray(v) for k, v in state.items()}, os.fspath(path))
