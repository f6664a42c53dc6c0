"""QLoRA: a frozen 4-bit Dense layer plus a trainable low-rank update.

``y = x @ W.T + bias + (alpha / rank) * (x @ A) @ B`` where ``W`` is the frozen 4-bit weight
("quantized" collection) and ``A (in, rank)``, ``B (rank, features)`` are trainable ("params").
``B`` starts at zero, so a fresh adapter leaves the base layer's output unchanged; ``A`` starts
like PEFT's (uniform in ``±1/sqrt(in)``). The base layer's variable names are those of
:class:`~qflax.linen.Dense4bit`, so weights from ``quantize_params`` or ``from_bnb_checkpoint`` fit
as they are; the adapters are created by ``init`` (or added to an existing params tree).

Train only the adapters with ``optax.masked`` / ``optax.multi_transform``, or everything in
"params" (adapters and biases): the 4-bit weight is never in "params".
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qflax.linen.dense_4bit import Dense4bit, owner_name
from qflax.linen.dense_params import Initializer

# PEFT's kaiming_uniform(a=sqrt(5)) on A: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
default_lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRADense4bit(Dense4bit):
    """:class:`Dense4bit` with a LoRA adapter (QLoRA).

    Attributes (besides those of Dense4bit):
      lora_rank: rank of the update (> 0).
      lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / lora_rank``.
      lora_a_init: initializer of ``lora_a`` ``(in_features, lora_rank)``.
      lora_b_init: initializer of ``lora_b`` ``(lora_rank, features)`` (zeros).
    """

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_a_init: Initializer = default_lora_a_init
    lora_b_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Frozen 4-bit output plus the scaled low-rank update, in the dtype of ``inputs``.

        Raises:
          ValueError: ``lora_rank`` is not a positive integer (besides Dense4bit's errors).
        """
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank <= 0:
            raise ValueError(f"{owner_name(self)}: lora_rank must be a positive integer, got {self.lora_rank!r}")
        frozen = self.frozen_output(inputs)
        in_features = inputs.shape[-1]
        lora_a = self.param("lora_a", self.lora_a_init, (in_features, self.lora_rank), self.param_dtype)
        lora_b = self.param("lora_b", self.lora_b_init, (self.lora_rank, self.features), self.param_dtype)
        compute: Any = inputs.dtype if self.compute_dtype is None else self.compute_dtype
        x = inputs.astype(compute)
        update = (x @ lora_a.astype(compute)) @ lora_b.astype(compute)
        scale = jnp.asarray(self.lora_alpha / self.lora_rank, dtype=compute)
        return frozen + (update * scale).astype(inputs.dtype)
