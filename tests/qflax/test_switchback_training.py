"""Training with SwitchBack layers reaches the float layers' loss (same seed, same data, same init).

A 16 -> 64 -> 64 -> 4 GELU MLP regresses a noisy tanh teacher with fresh batches every step
(300 steps of SGD with momentum). The final held-out loss of each SwitchBack variant must be
within 2% of the same MLP built from StandardDense. A broken gradient fails this by far: the
loss starts near 0.57 and the float model ends near 0.058 (noise floor 0.04).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from qflax.linen import (
    StandardDense,
    SwitchBackDense,
    SwitchBackDenseBnb,
    SwitchBackDenseGlobalMemEfficient,
    SwitchBackDenseVectorwise,
)

STEPS, BATCH, NOISE, LR, MOMENTUM = 300, 128, 0.2, 0.05, 0.9


class MLP(nn.Module):
    dense: type

    @nn.compact
    def __call__(self, x):
        # Fixed names: every variant starts from the very same parameters.
        x = nn.gelu(self.dense(64, name="hidden0")(x))
        x = nn.gelu(self.dense(64, name="hidden1")(x))
        return self.dense(4, name="out")(x)


def _batch(key, teacher_params, n):
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n, 16))
    y = jnp.tanh(x @ teacher_params["kernel"] + teacher_params["bias"])
    return x, y + NOISE * jax.random.normal(kn, y.shape)


def final_loss(dense, seed=0):
    """Held-out MSE after training MLP(dense) (hand-written SGD+momentum keeps strict promotion happy)."""
    k_teacher, k_init, k_data, k_eval = jax.random.split(jax.random.key(seed), 4)
    teacher = nn.Dense(4).init(k_teacher, jnp.zeros((1, 16)))["params"]
    params = MLP(StandardDense).init(k_init, jnp.zeros((1, 16)))["params"]
    model = MLP(dense)

    def loss_fn(p, x, y):
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    def step(carry, key):
        p, velocity = carry
        grads = jax.grad(loss_fn)(p, *_batch(key, teacher, BATCH))
        velocity = jax.tree.map(lambda v, g: MOMENTUM * v + g, velocity, grads)
        return (jax.tree.map(lambda w, v: w - LR * v, p, velocity), velocity), None

    train = jax.jit(lambda p: jax.lax.scan(step, (p, jax.tree.map(jnp.zeros_like, p)), jax.random.split(k_data, STEPS)))
    (params, _), _ = train(params)
    return float(loss_fn(params, *_batch(k_eval, teacher, 2048)))


@pytest.fixture(scope="module")
def standard_loss():
    loss = final_loss(StandardDense)
    assert loss < 0.1, loss  # it learned (initial loss ~0.57)
    return loss


@pytest.mark.parametrize(
    "dense", [SwitchBackDense, SwitchBackDenseVectorwise, SwitchBackDenseGlobalMemEfficient, SwitchBackDenseBnb]
)
def test_switchback_training_matches_standard(dense, standard_loss):
    loss = final_loss(dense)
    assert abs(loss - standard_loss) <= 0.02 * standard_loss, (dense.__name__, loss, standard_loss)


if __name__ == "__main__":
    for dense in (StandardDense, SwitchBackDense, SwitchBackDenseVectorwise, SwitchBackDenseGlobalMemEfficient, SwitchBackDenseBnb):
        print(dense.__name__, final_loss(dense))
