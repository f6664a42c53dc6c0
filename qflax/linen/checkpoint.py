"""A Linen model's variables <-> a bitsandbytes checkpoint (4-bit and 8-bit together), file or state dict.

:func:`to_bnb_checkpoint` gives (and optionally writes) the state dict bitsandbytes 0.49.2 and torch
would save for the same model; :func:`from_bnb_checkpoint` reads one back. Keys are listed in
:mod:`qflax.layers.bnb_checkpoint` and docs/state_dict.md. ``qflax.nnx`` has the same pair for NNX
models, with the same keys.

Module paths: a torch module name "model.layers.0.q_proj" is the Flax path ("model", "layers", "0",
"q_proj"); pass ``rename`` to map between naming schemes (e.g. ``lambda n: n.replace("layers.",
"layers_")`` on import and the reverse on export).
"""

import os
from typing import Any, Callable, Mapping, Optional, Union

from qflax.layers import bnb_checkpoint

Source = Union[str, os.PathLike, Mapping[str, Any]]


def to_bnb_checkpoint(
    variables: Mapping[str, Any],
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    rename: Optional[Callable[[str], str]] = None,
) -> dict:
    """The bitsandbytes/torch state dict of a model's variables; also written to ``path`` if given.

    4-bit weights give bitsandbytes' Linear4bit entries (load them with ``Params4bit.from_prequantized``),
    int8 weights Linear8bitLt's ``weight``/``SCB``/``weight_format``, float kernels their transpose,
    embedding tables and norm scales ``weight``, everything else its own name.

    Args:
      variables: ``{"params": ..., "quantized": ..., ...}`` of a model (e.g. from :func:`quantize_params`).
      path: a ``.safetensors`` file to write (needs the safetensors package); None writes nothing.
      rename: maps a dotted Flax module path ("layers_0.fc") to the torch module name ("layers.0.fc").

    Returns:
      A flat dict of numpy arrays with bitsandbytes' keys, dtypes and shapes.

    Raises:
      ValueError: two variables map to one key, or a 4-bit weight does not match its recorded shape.
    """
    state = bnb_checkpoint.to_state_dict(variables, rename)
    if path is not None:
        bnb_checkpoint.write_safetensors(path, state)
    return state


def from_bnb_checkpoint(
    source: Source,
    template: Optional[Mapping[str, Any]] = None,
    *,
    rename: Optional[Callable[[str], str]] = None,
) -> dict:
    """Variables from a bitsandbytes checkpoint (state dict or ``.safetensors`` file).

    Without a template, the quantized layers are read (a 4-bit weight is recognised by its
    ``quant_state.bitsandbytes__<type>`` entry, an 8-bit one by its ``SCB``) with their biases; other
    entries are left out. With a template, every variable of the template is read and checked.

    Args:
      source: a state dict (numpy/jax arrays or CPU torch tensors, e.g. ``linear.state_dict()``) or the
        path of a ``.safetensors`` file.
      template: optional variables of the target model (``model.init(...)`` or its ``jax.eval_shape``).
      rename: maps a dotted torch module name ("model.layers.0.q_proj", "" for a root layer) to the
        dotted Flax module path.

    Returns:
      ``{"params": ..., "quantized": ...}`` (template-free), or variables shaped like ``template``.

    Raises:
      ValueError: no quantized weight found (template-free), or an entry does not fit.
      KeyError: a required entry is missing.
      TypeError: ``source`` is neither a mapping nor a path.
    """
    state = bnb_checkpoint.read_source(source)
    if template is None:
        return bnb_checkpoint.quantized_layers_from_state_dict(state, rename)
    return bnb_checkpoint.from_state_dict(state, template, rename)
