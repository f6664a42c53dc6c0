"""Differentiable ops (custom_vjp) over quantized data, each with one XLA reference path."""

from qflax.ops.dispatch import last_path, use_backend
from qflax.ops.switchback_matmul import (
    standard_matmul,
    switchback_bnb_matmul,
    switchback_matmul,
    switchback_matmul_prepared,
)

__all__ = [
    "last_path",
    "standard_matmul",
    "switchback_bnb_matmul",
    "switchback_matmul",
    "switchback_matmul_prepared",
    "use_backend",
]
