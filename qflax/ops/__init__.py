"""Differentiable ops (custom_vjp) over quantized data, each with one XLA reference path."""

from qflax.ops.dispatch import last_path, use_backend
from qflax.ops.embedding_4bit import embed_4bit
from qflax.ops.embedding_8bit import embed_8bit
from qflax.ops.fourbit_matmul import matmul_4bit
from qflax.ops.int8_matmul import matmul_8bit, matmul_8bit_trainable
from qflax.ops.switchback_matmul import (
    standard_matmul,
    switchback_bnb_matmul,
    switchback_matmul,
    switchback_matmul_prepared,
)

__all__ = [
    "embed_4bit", "embed_8bit", "last_path", "matmul_4bit", "matmul_8bit", "matmul_8bit_trainable",
    "standard_matmul", "switchback_bnb_matmul", "switchback_matmul", "switchback_matmul_prepared", "use_backend",
]
