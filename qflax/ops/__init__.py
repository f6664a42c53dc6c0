"""Differentiable ops (custom_vjp) over quantized data, each with one XLA reference path."""

from qflax.ops.dispatch import last_path, use_backend

__all__ = ["last_path", "use_backend"]
