"""Keeping chosen params' optimizer state in 32 bit, the optax counterpart of bitsandbytes' override.

bitsandbytes' ``Embedding``/``StableEmbedding`` register ``{"optim_bits": 32}`` for their
weight with ``GlobalOptimManager`` so that 8-bit optimizers keep 32-bit state for it
(docs/embeddings.md#optimizer-state). In qflax, ``Embed`` and ``StableEmbed`` write the mark into the ``"optim_bits"``
variable collection at init (same path as the param, value 32). These helpers read it and
label the params for ``optax.multi_transform``:

Example:
  >>> variables = model.init(rng, ids)
  >>> labels = state_labels_32bit(variables)             # same tree as variables["params"]
  >>> tx = optax.multi_transform(
  ...     {"32bit": optax.adam(1e-3),                         # float32 moments
  ...      "default": optax.adam(1e-3, mu_dtype=jnp.bfloat16)},  # low-precision moments
  ...     labels)
  >>> opt_state = tx.init(variables["params"])
"""

from typing import Any, Mapping

import jax
import numpy as np

from qflax.layers.names import EMBEDDING_OPTIM_BITS, OPTIM_BITS

LABEL_32BIT = "32bit"
LABEL_DEFAULT = "default"


def params_kept_32bit(variables: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The paths in ``variables["params"]`` whose optimizer state should stay in 32 bit.

    Args:
      variables: the full variables returned by ``model.init`` (they hold ``"optim_bits"``).

    Returns:
      Sorted key paths, e.g. ``[("Embed_0", "embedding")]``; empty if nothing is marked.
    """
    marks = variables.get(OPTIM_BITS, {})
    paths = []
    for key_path, bits in jax.tree_util.tree_flatten_with_path(marks)[0]:
        if int(np.asarray(bits)) == EMBEDDING_OPTIM_BITS:
            paths.append(tuple(str(k.key) for k in key_path))
    return sorted(paths)


def state_labels_32bit(
    variables: Mapping[str, Any], label_32bit: str = LABEL_32BIT, label_default: str = LABEL_DEFAULT
) -> Any:
    """A tree like ``variables["params"]`` labelling each leaf for ``optax.multi_transform``.

    Args:
      variables: the full variables returned by ``model.init``.
      label_32bit: label of the params marked for 32-bit state.
      label_default: label of every other param.

    Returns:
      A pytree of strings with the structure of ``variables["params"]``.

    Raises:
      KeyError: ``variables`` has no ``"params"``, or a mark points at a missing param.
    """
    if "params" not in variables:
        raise KeyError("variables must hold 'params' (pass what model.init returned)")
    keep = set(params_kept_32bit(variables))
    params = variables["params"]

    def label(key_path, _):
        path = tuple(str(k.key) for k in key_path)
        return label_32bit if path in keep else label_default

    labels = jax.tree_util.tree_map_with_path(label, params)
    found = {tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(keep - found)
    if missing:
        raise KeyError(f"params marked for 32-bit state are missing from variables['params']: {missing}")
    return labels
