"""Linen variables <-> NNX state of the same model.

The qflax Linen and NNX modules hold the same variables under the same names: trainable
"kernel"/"bias"/"embedding" (Linen collection "params", NNX ``nnx.Param``) and frozen
quantized "weight" (Linen collection "quantized", NNX :class:`QuantizedWeight`). A Linen
model and an NNX model whose submodules carry the same names (Linen module names = NNX
attribute names, list items by index) therefore convert into each other entry by entry.

The Linen embeddings' "optim_bits" marks (32 for tables that keep 32-bit optimizer state)
correspond to the ``optim_bits`` metadata of the NNX ``nnx.Param``.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.nnx import variablelib

from qflax.layers.names import OPTIM_BITS, PARAMS
from qflax.nnx.outlier_aware import OutlierDims


def _collection(var: nnx.Variable) -> str | None:
    """Linen collection of an NNX variable; None for NNX-only state (random-number streams)."""
    if isinstance(var, nnx.RngState):
        return None
    if isinstance(var, nnx.Param):  # LoRAParam and other Param subclasses are params too
        return PARAMS
    return variablelib.variable_name_from_type(type(var), allow_register=True)


def _flat_variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    """``{(collection, *path): variable}`` of a model, paths as strings, NNX-only state left out."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        collection = _collection(var)
        if collection is not None:
            out[(collection, *(str(p) for p in path))] = var
    return out


def to_linen_variables(model: nnx.Module) -> dict[str, dict]:
    """The Linen variables of an NNX model: ``{"params": ..., "quantized": ..., ...}``.

    Args:
      model: an NNX module (e.g. of :mod:`qflax.nnx` layers).

    Returns:
      Nested dicts by collection, then by submodule name; leaves are the arrays (or
      ``Packed4bit``/``Int8Rows`` pytrees) the NNX variables hold, not copies.
      ``model.apply(variables, x)`` of the Linen twin gives the same output.
    """
    flat = {}
    for key, var in _flat_variables(model).items():
        flat[key] = var.get_value()
        bits = var.get_metadata().get(OPTIM_BITS)
        if bits is not None:
            flat[(OPTIM_BITS, *key[1:])] = jnp.array(bits, jnp.int32)
    return traverse_util.unflatten_dict(flat)


def _structure(value: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(value)
    return treedef, [(tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves]


def _without_lengths(structure: tuple) -> tuple:
    treedef, leaves = structure
    return treedef, [(len(shape), dtype) for shape, dtype in leaves]


def _linen_flat(variables: Mapping[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
    """Flattens Linen variables (nested mappings) down to arrays and quantized pytrees (kept whole)."""
    flat = {}
    for name, value in variables.items():
        if isinstance(value, Mapping):
            flat.update(_linen_flat(value, (*prefix, str(name))))
        else:
            flat[(*prefix, str(name))] = value
    return flat


def from_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Loads Linen variables into an NNX model, in place.

    Every NNX variable (random-number streams aside) must find its entry, with the same
    pytree structure, shapes and dtypes; every Linen entry must find its variable. The
    exception are the variables a layer lists in ``optional_variables`` (those that exist
    only in one mode, such as SwitchBackDense's prepared int8 weight or OutlierAwareDense's
    kernel before and weight after quantization): they are created or removed to match.

    Args:
      model: the NNX model (a concrete one, or an abstract one from ``nnx.eval_shape``).
      variables: Linen variables, e.g. ``linen_model.init(key, x)``.

    Returns:
      ``model``, for chaining.

    Raises:
      KeyError: an NNX variable has no Linen entry.
      ValueError: an entry's structure/shape/dtype differs (e.g. another quant_type or
        blocksize), or a Linen entry has no NNX variable to go to.
    """
    linen = _linen_flat(variables)
    optim_bits = {key[1:]: value for key, value in linen.items() if key[0] == OPTIM_BITS}
    linen = {key: value for key, value in linen.items() if key[0] != OPTIM_BITS}
    nnx_vars = _flat_variables(model)
    modules = {tuple(str(p) for p in path): module for path, module in nnx.iter_modules(model)}
    for path in optim_bits:
        if (PARAMS, *path) not in nnx_vars:
            raise ValueError(f"Linen entry {OPTIM_BITS}/{'/'.join(path)} marks a param the NNX model does not have")
    to_drop = []
    for key, var in nnx_vars.items():
        if key not in linen:
            if not _optional(modules, key):
                raise KeyError(f"Linen variables have no entry {'/'.join(key)} for the NNX variable of that name")
            to_drop.append(key)
            continue
        want, got = _structure(var.get_value()), _structure(linen[key])
        if isinstance(var, OutlierDims):  # the number of outlier dims is data, not structure
            want, got = _without_lengths(want), _without_lengths(got)
        if want != got:
            raise ValueError(f"Linen entry {'/'.join(key)} does not match the NNX variable: expected {want}, got {got}")
    to_create = sorted(linen.keys() - nnx_vars.keys())
    for key in to_create:
        if not _optional(modules, key):
            raise ValueError(f"Linen entry {'/'.join(key)} has no NNX variable to load into")
    for key, var in nnx_vars.items():
        if key in linen:
            var.set_value(linen[key])
            if key[0] == PARAMS and key[1:] in optim_bits:
                var.set_metadata(OPTIM_BITS, int(optim_bits[key[1:]]))
    for key in to_drop:
        setattr(modules[tuple(key[1:-1])], key[-1], None)
    for key in to_create:
        collection = key[0]
        variable_type = nnx.Param if collection == PARAMS else variablelib.variable_type_from_name(collection)
        setattr(modules[tuple(key[1:-1])], key[-1], variable_type(linen[key]))
    return model


def _optional(modules: dict, key: tuple) -> bool:
    """Whether ``key`` names a variable its layer may lack (listed in the layer's ``optional_variables``)."""
    module = modules.get(tuple(key[1:-1]))
    return module is not None and key[-1] in getattr(module, "optional_variables", ())
