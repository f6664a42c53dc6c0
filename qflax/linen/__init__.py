"""Flax Linen modules: thin shells over qflax.ops."""

from qflax.linen.switchback import (
    StandardDense,
    SwitchBackDense,
    SwitchBackDenseBnb,
    SwitchBackDenseGlobal,
    SwitchBackDenseGlobalMemEfficient,
    SwitchBackDenseVectorwise,
    prepare_for_eval,
)

__all__ = [
    "StandardDense",
    "SwitchBackDense",
    "SwitchBackDenseBnb",
    "SwitchBackDenseGlobal",
    "SwitchBackDenseGlobalMemEfficient",
    "SwitchBackDenseVectorwise",
    "prepare_for_eval",
]
