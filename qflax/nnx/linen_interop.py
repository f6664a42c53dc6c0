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

OPTIM_BITS = "optim_bits"



def _collection(var: nnx.Variable) -> str | None:
    """Linen collection of an NNX variable; None for NNX-only state (random-number streams)."""
    if isinstance(var, nnx.RngState):
        return None
    if isinstance(var, nnx.Param):  # LoRAParam and other Param subclasses are params too
        return "params"
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
    pytree structure, shapes and dtypes; every Linen entry must be used. An entry for a
    variable the NNX model leaves unset (None), such as SwitchBackDense's int8 weight before
    ``prepare_for_eval``, is created.

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
    for path in optim_bits:
        if ("params", *path) not in nnx_vars:
            raise ValueError(f"Linen entry {OPTIM_BITS}/{'/'.join(path)} marks a param the NNX model does not have")
    for key, var in nnx_vars.items():
        if key not in linen:
            raise KeyError(f"Linen variables have no entry {'/'.join(key)} for the NNX variable of that name")
        want, got = _structure(var.get_value()), _structure(linen[key])
        if want != got:
            raise ValueError(
                f"Linen entry {'/'.join(key)} does not match the NNX variable: expected {want}, got {got}"
            )
    for key in linen.keys() - nnx_vars.keys():
        _create_unset(model, key)
    for key, var in nnx_vars.items():
        var.set_value(linen[key])
        if key[0] == "params" and key[1:] in optim_bits:
            var.set_metadata(OPTIM_BITS, int(optim_bits[key[1:]]))
    for key in linen.keys() - nnx_vars.keys():
        _create_unset(model, key, linen[key])
    return model


def _create_unset(model: nnx.Module, key: tuple, value: Any = None) -> None:
    """Checks (value None) or creates the variable ``key`` where the model has an unset attribute."""
    collection, *path = key
    parent = model
    for name in path[:-1]:
        parent = parent[int(name)] if name.isdigit() else getattr(parent, name, None)
    if not isinstance(parent, nnx.Module) or getattr(parent, path[-1], 0) is not None:
        raise ValueError(f"Linen entry {'/'.join(key)} has no NNX variable to load into")
    if value is not None:
        variable_type = nnx.Param if collection == "params" else variablelib.variable_type_from_name(collection)
        setattr(parent, path[-1], variable_type(value))


