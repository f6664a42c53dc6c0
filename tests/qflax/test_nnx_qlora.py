"""QLoRA in NNX: nnx.LoRA adapters over frozen DenseNF4 layers, trained with nnx.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qflax import nnx as qn

D, RANK = 64, 4


class QLoRAMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.LoRA(D, RANK, D, base_module=qn.DenseNF4(D, D, rngs=rngs), rngs=rngs)
        self.fc2 = nnx.LoRA(D, RANK, 8, base_module=qn.DenseNF4(D, 8, rngs=rngs), rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


def _frozen_bytes(model):
    return [np.asarray(a).tobytes() for a in jax.tree.leaves(nnx.state(model, qn.QuantizedWeight))]


def test_qlora_training_reduces_loss_and_keeps_packed_weights():
    model = QLoRAMLP(nnx.Rngs(0))
    # Targets: the same frozen base with other (random, non-zero) adapters, so a rank-4 update can fit them.
    teacher = QLoRAMLP(nnx.Rngs(0))
    for layer in (teacher.fc1, teacher.fc2):
        layer.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(7), layer.lora_b.shape))
    x = jax.random.normal(jax.random.key(1), (256, D))
    y = teacher(x)

    frozen_before = _frozen_bytes(model)
    bias_before = np.asarray(model.fc1.base_module.bias[...]).copy()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float and int32
        losses = [float(step(model, optimizer)) for _ in range(300)]
    assert losses[0] > 0 and losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    assert _frozen_bytes(model) == frozen_before
    np.testing.assert_array_equal(model.fc1.base_module.bias[...], bias_before)
