"""QLoRA end to end: frozen DenseNF4 base layers + LoRA adapters trained with optax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qflax.linen import LoRADense4bit
from qflax.quant import dequantize_4bit


class QLoRAMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(LoRADense4bit(64, lora_rank=4, lora_alpha=4.0, name="hidden")(x))
        return LoRADense4bit(8, lora_rank=4, lora_alpha=4.0, name="out")(h)


def teacher(x, quantized, deltas):
    """The frozen base weights plus planted rank-2 changes: a target the adapters can reach exactly."""
    w1 = dequantize_4bit(quantized["hidden"]["weight"]) + deltas[0]
    w2 = dequantize_4bit(quantized["out"]["weight"]) + deltas[1]
    return nn.relu(x @ w1.T) @ w2.T


def test_qlora_training_reduces_loss_tenfold_and_leaves_packed_weights_bit_identical():
    kx, kinit, ku = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (256, 32))
    model = QLoRAMLP()
    variables = jax.jit(model.init)(kinit, x)
    assert variables["quantized"]["hidden"]["weight"].quant_type == "nf4"
    assert set(variables["params"]["hidden"]) == {"bias", "lora_a", "lora_b"}
    frozen_before = [np.array(leaf) for leaf in jax.tree_util.tree_leaves(variables["quantized"])]

    k1, k2, k3, k4 = jax.random.split(ku, 4)
    deltas = (  # (out, in) rank-2 changes of each base weight
        0.3 * jax.random.normal(k1, (64, 2)) @ jax.random.normal(k2, (2, 32)),
        0.3 * jax.random.normal(k3, (8, 2)) @ jax.random.normal(k4, (2, 64)),
    )
    y = teacher(x, variables["quantized"], deltas)

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(variables["params"])

    @jax.jit
    def step(variables, opt_state):
        def loss_fn(params):
            pred = model.apply({"params": params, "quantized": variables["quantized"]}, x)
            return jnp.mean((pred - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
        # optax's Adam bias correction mixes a Python float and an int32 count: not strict-promotion clean.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
        return {**variables, "params": optax.apply_updates(variables["params"], updates)}, opt_state, loss

    losses = []
    for _ in range(300):
        variables, opt_state, loss = step(variables, opt_state)
        losses.append(float(loss))
    print(f"QLoRA loss: start {losses[0]:.5f}, end {losses[-1]:.6f}, ratio {losses[0] / losses[-1]:.1f}x")
    assert losses[-1] * 10 <= losses[0]
    for before, after in zip(frozen_before, jax.tree_util.tree_leaves(variables["quantized"])):
        assert before.dtype == np.asarray(after).dtype
        np.testing.assert_array_equal(np.asarray(after), before)


def test_readme_recipe_adds_fresh_adapters_to_converted_weights():
    from flax import traverse_util as tu

    from qflax.linen import DenseNF4, quantize_params

    class Net(nn.Module):
        dense: type = nn.Dense

        @nn.compact
        def __call__(self, x):
            return self.dense(8, name="out")(nn.relu(self.dense(64, name="hidden")(x)))

    x = jax.random.normal(jax.random.key(0), (4, 32))
    loaded = quantize_params(jax.jit(Net().init)(jax.random.key(1), x)["params"])
    lora_model = Net(dense=lambda features, name: LoRADense4bit(features, lora_rank=4, name=name))
    fresh = jax.jit(lora_model.init)(jax.random.key(2), x)
    params = tu.unflatten_dict({**tu.flatten_dict(fresh["params"]), **tu.flatten_dict(loaded["params"])})
    variables = {"params": params, "quantized": loaded["quantized"]}
    assert set(params["hidden"]) == {"bias", "lora_a", "lora_b"}
    # lora_b starts at zero: the adapted model equals the plain 4-bit model until trained.
    y_lora = jax.jit(lora_model.apply)(variables, x)
    y_base = jax.jit(Net(dense=DenseNF4).apply)(loaded, x)
    np.testing.assert_allclose(np.asarray(y_lora), np.asarray(y_base), rtol=1e-6, atol=1e-6)
