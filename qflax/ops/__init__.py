"""Differentiable ops (custom_vjp) over quantized data, each with one XLA reference path."""

from qflax.ops.dispatch import last_path, use_backend
from qflax.ops.embedding_8bit import embed_8bit
from qflax.ops.int8_matmul import matmul_8bit, matmul_8bit_trainable

__all__ = ["embed_8bit", "last_path", "matmul_8bit", "matmul_8bit_trainable", "use_backend"]
