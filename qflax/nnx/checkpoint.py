"""Saving and loading NNX models with quantized layers with orbax (bitsandbytes checkpoints: bnb.py).

orbax (``pip install orbax-checkpoint``): :func:`save_checkpoint` writes ``nnx.state(model)``
(quantized weights included, as their uint8/int8/float32 arrays) and
:func:`restore_checkpoint` reads it back into a model of the same structure, byte for byte.
"""

import os

import jax
from flax import nnx

from qflax import checkpoint_checks as checks
from qflax import checkpoint_checks_4bit as checks_4bit


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


__all__ = ["restore_checkpoint", "save_checkpoint"]
