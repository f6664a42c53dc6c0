"""The bitsandbytes-checkpoint names of the previous release, kept for one release as thin aliases.

Use :func:`qflax.nnx.to_bnb_checkpoint` / :func:`qflax.nnx.from_bnb_checkpoint`, the NNX twins of
Linen's pair; the per-tensor ``to_bnb_state_dict`` is :func:`qflax.bnb_format.to_bnb_state_dict`.
"""

import warnings
from typing import Any, Mapping

import numpy as np
from flax import nnx

from qflax.nnx.bnb import from_bnb_checkpoint, to_bnb_checkpoint


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"qflax.nnx.{old} is deprecated and will be removed in the next release; use qflax.nnx.{new}",
        DeprecationWarning,
        stacklevel=3,
    )


def to_bnb_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Deprecated: :func:`qflax.nnx.to_bnb_checkpoint`."""
    _deprecated("to_bnb_state_dict", "to_bnb_checkpoint(model)")
    return to_bnb_checkpoint(model)


def load_bnb_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
    """Deprecated: :func:`qflax.nnx.from_bnb_checkpoint`."""
    _deprecated("load_bnb_state_dict", "from_bnb_checkpoint(model, state_dict)")
    return from_bnb_checkpoint(model, state_dict)
