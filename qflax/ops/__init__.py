"""Differentiable ops (custom_vjp) over quantized data, each with one XLA reference path."""

from qflax.ops.dispatch import last_path, use_backend
from qflax.ops.embedding_4bit import embed_4bit
from qflax.ops.fourbit_matmul import matmul_4bit

__all__ = ["embed_4bit", "last_path", "matmul_4bit", "use_backend"]
