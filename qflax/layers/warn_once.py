"""Warnings shown once per layer, without touching the process-wide warnings filters.

bitsandbytes silences its 4-bit warnings by installing global ``warnings.filterwarnings``
entries (docs/deviations.md#warnings), which also hides unrelated warnings. Flax modules are re-created on
every ``apply`` and NNX modules may be split and merged, so "once per layer" is tracked by the identity of
the layer's quantized weight array: eagerly that is the same array on every call; under ``jax.jit`` it is a
tracer, so the warning comes once per trace (normally once per compilation).
"""

import warnings
import weakref
from typing import Any

_warned: dict[int, weakref.ref] = {}


def warn_once_per_weight(weight: Any, message: str, stacklevel: int = 3) -> None:
    """Emits ``UserWarning(message)`` unless it was already emitted for this ``weight`` object.

    Args:
      weight: the layer's weight leaf (a jax array or tracer); its identity is the key.
      message: the warning text.
      stacklevel: passed to ``warnings.warn``.
    """
    key = id(weight)
    seen = _warned.get(key)
    if seen is not None and seen() is weight:
        return
    warnings.warn(message, UserWarning, stacklevel=stacklevel)
    # The entry disappears with the weight, so a new array reusing the id warns again.
    _warned[key] = weakref.ref(weight, lambda ref, key=key: _forget(key, ref))


def _forget(key: int, ref: weakref.ref) -> None:
    if _warned.get(key) is ref:
        del _warned[key]
