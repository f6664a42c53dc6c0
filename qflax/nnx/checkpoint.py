"""Saving and loading NNX models with quantized layers: orbax, and bitsandbytes' state-dict format.

orbax (``pip install orbax-checkpoint``): :func:`save_checkpoint` writes ``nnx.state(model)``
(quantized weights included, as their uint8/int8/float32 arrays) and
:func:`restore_checkpoint` reads it back into a model of the same structure, byte for byte.

bitsandbytes: :func:`to_bnb_state_dict` gives the torch-style state dict bitsandbytes 0.49.2
would save for the same model (``<path>.weight``, ``<path>.weight.absmax``, ... for 4-bit
layers, SPEC §6.2; ``weight``/``SCB``/``weight_format`` for int8 ones, SPEC §6.3; float
weights transposed to torch's ``(out, in)``); :func:`load_bnb_state_dict` loads such a dict
into a model of the same structure.
"""

import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from qflax import bnb_format
from qflax import checkpoint_checks as checks
from qflax import checkpoint_checks_4bit as checks_4bit
from qflax.nnx.outlier_aware import OutlierDims
from qflax.nnx.switchback import SwitchBackDense
from qflax.quant.fourbit import Packed4bit
from qflax.quant.int8 import Int8Rows


def save_checkpoint(directory: str, model: nnx.Module) -> None:
    """Saves ``nnx.state(model)`` with orbax (``StandardCheckpointer``) into a new ``directory``.

    Args:
      directory: the checkpoint directory; it must not exist yet.
      model: the NNX model.
    """
    import orbax.checkpoint as ocp  # optional dependency: only needed here

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), nnx.state(model))
    checkpointer.wait_until_finished()


def restore_checkpoint(directory: str, model: nnx.Module) -> nnx.Module:
    """Restores a :func:`save_checkpoint` checkpoint into ``model`` (in place) and returns it.

    Args:
      directory: the checkpoint directory.
      model: a model of the same structure and settings (quant types, block sizes), concrete
        or abstract (``nnx.eval_shape(lambda: Model(...))``): its state is the target.

    Returns:
      ``model`` holding the restored state.

    Raises:
      ValueError (CheckpointError): the checkpoint's arrays, shapes or dtypes differ from the
        model's (other layers, or other quantization settings such as compress_statistics or
        blocksize), or a restored 4-bit weight's code table is not the layer's quant type.
        The model is left unchanged.
    """
    import orbax.checkpoint as ocp  # optional dependency: only needed here

    path, checkpointer = os.path.abspath(directory), ocp.StandardCheckpointer()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(model))
    # orbax would cast a saved array to the target's dtype (uint8 absmax codes into float32): compare first.
    saved = checkpointer.metadata(path).item_metadata
    checks.check_saved_structure(checks.flat_shapes(getattr(saved, "tree", saved)), checks.flat_shapes(target), path)
    restored = checkpointer.restore(path, target)
    checks_4bit.check_packed4bit_leaves(restored, path)  # e.g. an NF4 table restored into an FP4 layer
    nnx.update(model, restored)
    return model


# ------------------------------------------------------------------------------------------
# bitsandbytes / torch state-dict names of each variable


def _transposed(value: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(value).T)


def _torch_key(module: nnx.Module, name: str) -> str:
    """The torch name of an array variable of ``module`` (the variable's own name otherwise)."""
    if name in ("kernel", "embedding"):
        return "weight"
    if isinstance(module, nnx.LayerNorm) and name == "scale":
        return "weight"
    if isinstance(module, SwitchBackDense) and name in ("weight", "weight_scale"):
        # The prepared int8 weight: bitsandbytes' SwitchBackLinear buffers after prepare_for_eval.
        return {"weight": "W_int8", "weight_scale": "state_W"}[name]
    return name


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _leaf_keys(value: Any, key: str) -> list[str]:
    """Keys of the leaves of a pytree variable without a bitsandbytes format: ``key.<field path>``."""

    def name(entry) -> str:  # a dataclass field, dict key or sequence index
        return str(getattr(entry, "name", getattr(entry, "key", getattr(entry, "idx", entry))))

    paths = jax.tree_util.tree_flatten_with_path(value)[0]
    return [key + "".join(f".{name(entry)}" for entry in path) for path, _ in paths]


def _export(module: nnx.Module, name: str, value: Any, prefix: str) -> dict[str, np.ndarray]:
    if isinstance(value, Packed4bit):
        return bnb_format.to_bnb_state_dict(value, f"{prefix}{name}")
    if isinstance(value, Int8Rows) and name == "weight":
        return bnb_format.to_bnb_int8_state_dict(value, prefix)
    key = prefix + _torch_key(module, name)
    if _is_array(value):
        # Flax kernels are (in, out); torch's Linear weight is (out, in).
        return {key: _transposed(value) if name == "kernel" else np.asarray(value)}
    return {k: np.asarray(leaf) for k, leaf in zip(_leaf_keys(value, key), jax.tree.leaves(value))}


def _read(d: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in d:
        raise KeyError(f"state dict is missing the key {key!r}")
    return bnb_format.to_numpy(d[key])


def _import(module: nnx.Module, name: str, variable: nnx.Variable, d: Mapping[str, Any], prefix: str) -> Any:
    template = variable.get_value()
    key = prefix + _torch_key(module, name)
    if isinstance(template, Packed4bit):
        value = bnb_format.from_bnb_state_dict(d, f"{prefix}{name}")
    elif isinstance(template, Int8Rows) and name == "weight":
        value = bnb_format.from_bnb_int8_state_dict(d, prefix)
    elif _is_array(template):
        value = _transposed(_read(d, key)) if name == "kernel" else _read(d, key)
    else:
        leaves = [_read(d, k) for k in _leaf_keys(template, key)]
        value = jax.tree.unflatten(jax.tree.structure(template), leaves)
    if isinstance(template, Packed4bit) and isinstance(value, Packed4bit):  # storage dtype is not structure
        template = template.replace(quant_storage=value.quant_storage)
    want, got = _structure(template), _structure(value)
    if isinstance(variable, OutlierDims):  # the number of outlier dims is data, not structure
        want, got = (want[0], [len(s) for s in want[1]]), (got[0], [len(s) for s in got[1]])
    if want != got:
        raise ValueError(
            f"state dict entry {key} does not fit the model's {type(module).__name__} variable {name!r}: "
            f"expected {_describe(template)}, got {_describe(value)}"
        )
    return jax.tree.map(jax.numpy.asarray, value)


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


def _variables_by_module(model: nnx.Module, visit: Callable[[nnx.Module, str, nnx.Variable, str], None]) -> None:
    """Calls ``visit(module, name, variable, prefix)`` for every non-RNG variable of every module."""
    modules = dict(nnx.iter_modules(model))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))):
        module = modules[tuple(path[:-1])]
        prefix = "".join(f"{p}." for p in path[:-1])
        visit(module, str(path[-1]), variable, prefix)


def to_bnb_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The bitsandbytes/torch state dict of an NNX model with qflax layers.

    Keys are the dotted attribute paths of the layers plus bitsandbytes' names: 4-bit layers
    (Dense4bit, Embed4bit, ...) give ``weight``, ``weight.absmax``, ``weight.quant_map``,
    [``weight.nested_*``], ``weight.quant_state.bitsandbytes__<type>``; frozen int8 layers give
    ``weight`` (int8), ``SCB``, ``weight_format``; float kernels are saved transposed as
    ``weight`` (torch's ``(out, in)``), embedding tables as ``weight``, LayerNorm scales as
    ``weight``; other variables under their own names.

    Args:
      model: the NNX model.

    Returns:
      A flat dict of numpy arrays (save it with ``safetensors.numpy.save_file`` or convert to
      torch tensors for ``load_state_dict``).
    """
    out: dict[str, np.ndarray] = {}

    def visit(module, name, variable, prefix):
        out.update(_export(module, name, variable.get_value(), prefix))

    _variables_by_module(model, visit)
    return out


def load_bnb_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
    """Loads a bitsandbytes/torch state dict (as :func:`to_bnb_state_dict` names it) into ``model``, in place.

    Every variable of the model must find its entries with the same shapes, dtypes and
    quantization settings (quant type, block size, double quantization); a 4-bit weight's
    stored code tables are used as stored.

    Args:
      model: an NNX model of the checkpoint's structure.
      state_dict: keys to numpy arrays, jax arrays or CPU torch tensors.

    Returns:
      ``model``.

    Raises:
      KeyError: an entry is missing.
      ValueError: an entry does not fit (shape, dtype, quant type, block size...).
    """
    loaded = []

    def visit(module, name, variable, prefix):
        loaded.append((variable, _import(module, name, variable, state_dict, prefix)))

    _variables_by_module(model, visit)
    for variable, value in loaded:
        variable.set_value(value)
    return model


__all__ = ["load_bnb_state_dict", "restore_checkpoint", "save_checkpoint", "to_bnb_state_dict"]
