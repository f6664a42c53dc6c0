"""Tree-wide layout changes of 4-bit weights: the row view for sharding, bitsandbytes' flat layout for saving.

A 4-bit weight split along its input features (row-parallel) must be in the row view of
:mod:`qflax.quant.fourbit_rows` (``packed (N, K // 2)``, ``absmax (N, K // blocksize)``):
bitsandbytes' flat ``((n + 1) // 2, 1)`` array has no axis for the input features. Both layouts
hold the same bytes in the same order; only the leaves' shapes differ. Every qflax op and
``dequantize_4bit`` accept both. bitsandbytes' state dicts and safetensors files take the flat
layout: apply :func:`to_flat_layout` (after ``jax.device_get``) before ``to_bnb_state_dict`` or
``to_bnb_checkpoint``; ``from_bnb_state_dict`` rejects a row view.
"""

from typing import Any

import jax

from qflax.quant import fourbit_rows
from qflax.quant.fourbit import Packed4bit


def _is_packed(node: Any) -> bool:
    return isinstance(node, Packed4bit)


def to_row_view(tree: Any) -> Any:
    """Every :class:`Packed4bit` of ``tree`` whose rows are whole absmax blocks, in the row view.

    Works on Linen variables, an NNX ``State`` (``nnx.split``/``nnx.state``) or any pytree;
    other leaves and 4-bit tensors that cannot be viewed so (``K % blocksize != 0``, not 2-D)
    are returned unchanged. No byte is moved or copied on the host.

    Args:
      tree: a pytree holding Packed4bit nodes.

    Returns:
      The same tree with those Packed4bit leaves reshaped.

    Example:
      >>> variables = to_row_view(quantize_params(float_params))
      >>> shardings = quantized_shardings(variables, rules, mesh)
    """

    def view(node):
        if _is_packed(node) and fourbit_rows.has_whole_block_rows(node):
            return fourbit_rows.to_row_view(node)
        return node

    return jax.tree.map(view, tree, is_leaf=_is_packed)


def to_flat_layout(tree: Any) -> Any:
    """Every :class:`Packed4bit` of ``tree`` in bitsandbytes' flat layout (inverse of :func:`to_row_view`).

    Args:
      tree: a pytree holding Packed4bit nodes (flat or row view).

    Returns:
      The same tree with ``packed ((n + 1) // 2, 1)`` and ``absmax (nblocks,)`` everywhere.
    """
    return jax.tree.map(lambda n: fourbit_rows.to_flat(n) if _is_packed(n) else n, tree, is_leaf=_is_packed)
