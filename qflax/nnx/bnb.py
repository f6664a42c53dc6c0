"""An NNX model <-> a bitsandbytes checkpoint (4-bit and 8-bit together), file or state dict.

The NNX twins of ``qflax.linen.to_bnb_checkpoint``/``from_bnb_checkpoint``, with the same keys
(:mod:`qflax.layers.bnb_checkpoint`, docs/state_dict.md): the model's state goes through
:func:`~qflax.nnx.to_linen_variables` / :func:`~qflax.nnx.from_linen_variables`, so a Linen and an NNX
model with the same module names give the same entries, byte for byte.
"""

import os
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
from flax import nnx

from qflax.layers import bnb_checkpoint
from qflax.nnx.linen_interop import from_linen_variables, to_linen_variables

Rename = Optional[Callable[[str], str]]


def to_bnb_checkpoint(
    model: nnx.Module, path: Optional[Union[str, os.PathLike]] = None, *, rename: Rename = None
) -> dict[str, np.ndarray]:
    """The bitsandbytes/torch state dict of an NNX model; also written to ``path`` if given.

    Keys are the dotted attribute paths of the layers plus bitsandbytes' names: 4-bit layers give
    ``weight``, ``weight.absmax``, ``weight.quant_map``, [``weight.nested_*``],
    ``weight.quant_state.bitsandbytes__<type>``; frozen int8 layers ``weight`` (int8), ``SCB``,
    ``weight_format``; float kernels are saved transposed as ``weight`` (torch's ``(out, in)``),
    embedding tables and norm scales as ``weight``; other variables under their own names.

    Args:
      model: the NNX model.
      path: a ``.safetensors`` file to write (needs the safetensors package); None writes nothing.
      rename: maps a dotted attribute path ("blocks.0") to the torch module name.

    Returns:
      A flat dict of numpy arrays.
    """
    state = bnb_checkpoint.to_state_dict(to_linen_variables(model), rename)
    if path is not None:
        bnb_checkpoint.write_safetensors(path, state)
    return state


def from_bnb_checkpoint(
    model: nnx.Module, source: Union[str, os.PathLike, Mapping[str, Any]], *, rename: Rename = None
) -> nnx.Module:
    """Loads a bitsandbytes/torch checkpoint (as :func:`to_bnb_checkpoint` names it) into ``model``, in place.

    Every variable of the model must find its entries with the same shapes, dtypes and quantization
    settings (quant type, block size, double quantization); a 4-bit weight's stored code tables are
    used as stored. Nothing is changed when an entry is missing or does not fit.

    Args:
      model: an NNX model of the checkpoint's structure (concrete, or from ``nnx.eval_shape``).
      source: a state dict (numpy/jax arrays or CPU torch tensors) or a ``.safetensors`` path.
      rename: maps a dotted torch module name to the model's dotted attribute path.

    Returns:
      ``model``.

    Raises:
      KeyError: an entry is missing.
      ValueError: an entry does not fit (shape, dtype, quant type, block size...).
    """
    state = bnb_checkpoint.read_source(source)
    loaded = bnb_checkpoint.from_state_dict(state, to_linen_variables(model), rename)
    return from_linen_variables(model, loaded)
