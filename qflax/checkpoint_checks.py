"""Validation of quantized checkpoint entries, shared by every loader (framework-free: numpy and jax only).

Every door through which a quantized weight enters qflax or torch_compat -- ``bnb_format``, the
whole-model ``from_bnb_checkpoint`` of qflax.linen and qflax.nnx (:mod:`qflax.layers.bnb_checkpoint`),
NNX ``restore_checkpoint``, torch_compat's ``load_state_dict``, ``QuantState.from_dict`` and
``Params4bit.from_prequantized`` -- calls these checks (and the 4-bit ones of
:mod:`qflax.checkpoint_checks_4bit`) before it changes any state, so a tampered, truncated or
mismatched checkpoint raises instead of loading into wrong numbers.

Errors name the key, what was found and what was expected: :class:`CheckpointError` (a
ValueError), :class:`CheckpointTypeError` (also a TypeError) for a wrong dtype or JSON type,
:class:`MissingEntryError` (a KeyError) and :class:`UnexpectedEntryError` (a ValueError that
is also the AssertionError bitsandbytes raises for unknown quant-state keys).
"""

import sys
from typing import Any, Iterable, Mapping, Optional

import jax
import ml_dtypes
import numpy as np

from qflax.quant import validation


class CheckpointError(ValueError):
    """A checkpoint entry contradicts its own declaration or the module it is loaded into."""


class CheckpointTypeError(CheckpointError, TypeError):
    """A checkpoint entry has the wrong dtype, or a JSON field the wrong type."""


class MissingEntryError(KeyError):
    """A required checkpoint entry is missing (the message names it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnexpectedEntryError(CheckpointError, AssertionError):
    """A checkpoint holds an entry or JSON field that does not belong there.

    Also an AssertionError, the type bitsandbytes' ``QuantState.from_dict`` raises for an
    unknown key, so code written against either library catches it.
    """


# ---------------------------------------------------------------------------------------------
# Describing arrays of any framework without importing it


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view of a numpy/jax array or CPU torch tensor; bfloat16 stays bfloat16 (ml_dtypes)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor, already imported by the caller
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.view(sys.modules["torch"].int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def dtype_name(value: Any) -> str:
    """The dtype name of an array or tensor ("uint8", "bfloat16", ...), whatever its framework."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return np.asarray(value).dtype.name
    text = str(dtype)
    if text.startswith("torch."):
        return text[len("torch."):]
    try:
        return np.dtype(dtype).name
    except TypeError:  # e.g. a JAX PRNG key dtype
        return text


def shape_of(value: Any) -> tuple:
    """The shape of an array or tensor as a tuple of Python ints."""
    return tuple(int(s) for s in getattr(value, "shape", np.shape(value)))


def concrete(value: Any) -> bool:
    """False for a traced value (under jax.jit), whose contents cannot be checked."""
    return not isinstance(value, jax.core.Tracer)


def require(entries: Mapping[str, Any], key: str) -> Any:
    """``entries[key]``, or MissingEntryError naming the key."""
    if key not in entries:
        raise MissingEntryError(f"state dict is missing the key {key!r}")
    return entries[key]


def check_array(value: Any, key: str, shape: tuple, dtype: str) -> None:
    """Raises unless ``value`` has exactly ``dtype`` and ``shape``."""
    got_dtype, got_shape = dtype_name(value), shape_of(value)
    if got_shape != tuple(shape) or got_dtype != dtype:
        cls = CheckpointTypeError if got_dtype != dtype else CheckpointError
        raise cls(f"state dict entry {key!r} must be {dtype} of shape {tuple(shape)}, got {got_dtype} {got_shape}")


def check_scales(value: Any, key: str) -> None:
    """Raises if a float statistics array (absmax, SCB) holds a negative value; NaN marks a non-finite block."""
    if not concrete(value):
        return
    values = to_numpy(value).astype(np.float32)
    if np.any(values < 0):
        raise CheckpointError(
            f"state dict entry {key!r} must hold absolute maxima (>= 0, or NaN for a non-finite block), "
            f"got {float(values[values < 0][0])!r}"
        )


def check_known(keys: Iterable[str], known: Iterable[str], where: str) -> None:
    """Raises UnexpectedEntryError for any key not in ``known``."""
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise UnexpectedEntryError(f"unexpected keys under {where!r}: {unknown}; allowed: {sorted(set(known))}")


def check_bias(bias: Any, out_features: int, key: str) -> None:
    """Raises unless ``bias`` is a float32/float16/bfloat16 array of shape ``(out_features,)``."""
    if dtype_name(bias) not in validation.FLOAT_DTYPES:
        raise CheckpointTypeError(
            f"state dict entry {key!r} must be float32, float16 or bfloat16, got {dtype_name(bias)}"
        )
    if shape_of(bias) != (out_features,):
        raise CheckpointError(f"state dict entry {key!r} must have shape ({out_features},), got {shape_of(bias)}")


def check_float_weight(weight: Any, key: str) -> None:
    """Raises unless an unquantized ``weight`` entry is a 2-D float32/float16/bfloat16 array."""
    if dtype_name(weight) not in validation.FLOAT_DTYPES or len(shape_of(weight)) != 2:
        raise CheckpointTypeError(
            f"state dict entry {key!r} must be a 2-D float32, float16 or bfloat16 weight (out, in) without SCB, "
            f"got {dtype_name(weight)} {shape_of(weight)}"
        )


def check_unique_targets(pairs: Iterable[tuple[str, Any]], what: str) -> None:
    """Raises if two sources map to one target (e.g. two checkpoint names renamed to one module path)."""
    seen: dict = {}
    for source, target in pairs:
        if target in seen:
            raise CheckpointError(f"{what} maps both {seen[target]!r} and {source!r} to {target!r}")
        seen[target] = source


# ---------------------------------------------------------------------------------------------
# 8-bit and whole-tree structure


def check_int8_entries(weight: Any, scb: Any, prefix: str, shape: Optional[tuple] = None) -> None:
    """Checks a bitsandbytes 8-bit weight: int8 ``weight (out, in)`` and float32 ``SCB (out,)`` (>= 0).

    Args:
      weight: the ``weight`` entry.
      scb: the ``SCB`` entry.
      prefix: the module prefix, e.g. ``"fc."``.
      shape: the target module's ``(out, in)``, or None.
    """
    if dtype_name(weight) != "int8" or len(shape_of(weight)) != 2:
        raise CheckpointTypeError(
            f"state dict entry {prefix + 'weight'!r} must be a 2-D int8 array when {prefix + 'SCB'!r} is present, "
            f"got {dtype_name(weight)} {shape_of(weight)}"
        )
    check_array(scb, f"{prefix}SCB", (shape_of(weight)[0],), "float32")
    check_scales(scb, f"{prefix}SCB")
    if shape is not None and shape_of(weight) != tuple(shape):
        raise CheckpointError(
            f"state dict entry {prefix + 'weight'!r} has shape {shape_of(weight)}, the target expects {tuple(shape)}"
        )


def flat_shapes(tree: Any) -> dict[str, tuple]:
    """``{"a/b/c": (shape, dtype name)}`` for every array leaf of a pytree (orbax metadata or a target)."""

    def name(entry: Any) -> str:
        return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(e) for e in path): (shape_of(leaf), dtype_name(leaf)) for path, leaf in leaves}


def check_saved_structure(saved: Mapping[str, tuple], target: Mapping[str, tuple], where: str) -> None:
    """Raises CheckpointError unless a saved tree has exactly the target's arrays, shapes and dtypes.

    Args:
      saved: :func:`flat_shapes` of the checkpoint's metadata.
      target: :func:`flat_shapes` of the model state it is restored into.
      where: the checkpoint, for messages.
    """
    missing, extra = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or extra:
        raise CheckpointError(
            f"{where} does not fit the model: arrays only in the model {missing}, only in the checkpoint {extra} "
            "(different layers, or different quantization settings such as compress_statistics?)"
        )
    for path in sorted(target):
        if saved[path] != target[path]:
            raise CheckpointError(
                f"{where}: {path} is saved as {saved[path][1]} {saved[path][0]}, the model holds "
                f"{target[path][1]} {target[path][0]} (different quantization settings?)"
            )
