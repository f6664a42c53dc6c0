"""The one batching rule of every qflax kernel launcher (``jax.custom_batching.custom_vmap``).

A batch of activations folds into the kernel's rows (one launch for the whole batch, the way a
real model batches tokens); anything else batched (a weight, a bias) launches once per batch
element with ``lax.map``. Both the 4-bit and the int8 launchers use :func:`fold_or_map`.
"""

import functools

import jax
import jax.numpy as jnp


def fold_or_map(fn, foldable, axis_size, in_batched, args):
    """Batching rule body: fold the leading batch axis of the ``foldable`` args into their rows.

    Folding is valid when exactly the ``foldable`` arguments (activations and their per-row data)
    carry the batch; otherwise each batch element gets its own launch.

    Args:
      fn: the unbatched launcher.
      foldable: indices of the arguments whose rows may absorb the batch axis.
      axis_size: the batch size.
      in_batched: per argument, whether it carries the batch axis (leading).
      args: the arguments.

    Returns:
      (outputs, out_batched) as ``custom_vmap`` rules return them.
    """
    if all(b == (i in foldable) for i, b in enumerate(in_batched)) and any(in_batched):
        folded = [a.reshape((-1,) + a.shape[2:]) if i in foldable else a for i, a in enumerate(args)]
        out = fn(*folded)
        return jax.tree.map(lambda o: o.reshape((axis_size, -1) + o.shape[1:]), out), jax.tree.map(lambda _: True, out)
    batched = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(args, in_batched)]
    out = jax.lax.map(lambda xs: fn(*xs), batched)
    return out, jax.tree.map(lambda _: True, out)


def batched_launcher(launch, foldable):
    """``launch`` as a ``custom_vmap`` function whose batching rule is :func:`fold_or_map`."""
    fn = jax.custom_batching.custom_vmap(launch)

    @fn.def_vmap
    def _rule(axis_size, in_batched, *args):
        return fold_or_map(launch, foldable, axis_size, in_batched, args)

    return fn
