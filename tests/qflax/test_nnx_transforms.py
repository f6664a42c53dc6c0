"""NNX transforms over qflax.nnx layers: grad/Optimizer leave quantized weights alone; jit, split/merge, vmap, scan."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qflax import nnx as qn
from qflax import ops, quant

K = 64


class Mixed(nnx.Module):
    """One layer of each frozen kind, so every quantized container goes through the transforms."""

    def __init__(self, rngs):
        self.embed = qn.Embed4bit(12, K, rngs=rngs)
        self.nf4 = qn.DenseNF4(K, K, rngs=rngs)
        self.int8 = qn.Dense8bitLt(K, 16, threshold=6.0, rngs=rngs)

    def __call__(self, ids):
        return self.int8(jax.nn.relu(self.nf4(self.embed(ids))))


IDS = jnp.array([[1, 4, 7], [0, 11, 3]], jnp.int32)


def _bytes(state):
    return [(np.asarray(leaf).dtype, np.asarray(leaf).tobytes()) for leaf in jax.tree.leaves(state)]


def _loss(model, ids):
    return jnp.mean((model(ids) - 1.0) ** 2)


def test_grad_and_optimizer_train_params_only():
    model = Mixed(nnx.Rngs(0))
    frozen_before = _bytes(nnx.state(model, qn.QuantizedWeight))
    grads = nnx.grad(_loss)(model, IDS)
    assert {tuple(p) for p, _ in nnx.to_flat_state(grads)} == {("nf4", "bias"), ("int8", "bias")}
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    # Optimizer state exists for the two biases only (besides adam's step count).
    moments = [a for a in jax.tree.leaves(nnx.state(optimizer)) if np.ndim(a) > 0]
    assert sorted(a.shape for a in moments) == [(16,), (16,), (K,), (K,)]

    @nnx.jit
    def step(model, optimizer, ids):
        loss, grads = nnx.value_and_grad(_loss)(model, ids)
        optimizer.update(model, grads)
        return loss

    bias_before = np.asarray(model.nf4.bias[...]).copy()
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float and int32
        losses = [float(step(model, optimizer, IDS)) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert not np.array_equal(bias_before, np.asarray(model.nf4.bias[...]))
    assert _bytes(nnx.state(model, qn.QuantizedWeight)) == frozen_before


def test_split_merge_and_state_filters():
    model = Mixed(nnx.Rngs(1))
    graphdef, quantized, params = nnx.split(model, qn.QuantizedWeight, nnx.Param)
    quantized_leaves = jax.tree.leaves(quantized)
    assert {np.asarray(a).dtype.name for a in quantized_leaves} <= {"uint8", "int8", "float32"}
    assert {type(v.get_value()).__name__ for _, v in nnx.to_flat_state(quantized)} == {"Packed4bit", "Int8Rows"}
    assert {a.dtype.name for a in jax.tree.leaves(params)} == {"float32"}
    rebuilt = nnx.merge(graphdef, quantized, params)
    np.testing.assert_array_equal(rebuilt(IDS), model(IDS))
    # Eager and nnx.jit give the same result; the jitted call sees the state as traced leaves.
    np.testing.assert_allclose(nnx.jit(lambda m, i: m(i))(model, IDS), model(IDS), rtol=1e-6, atol=1e-6)


def test_vmap_over_inputs():
    layer = qn.DenseNF4(K, 8, rngs=nnx.Rngs(2))
    xs = jax.random.normal(jax.random.key(0), (5, 3, K))
    batched = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(layer, xs)
    np.testing.assert_allclose(batched, layer(xs.reshape(15, K)).reshape(5, 3, 8), rtol=1e-6, atol=1e-6)


def test_vmap_built_stack_and_scan():
    depth = 3

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_stack(rngs):
        return qn.DenseNF4(K, K, rngs=rngs)

    stack = make_stack(nnx.Rngs(3))
    packed = stack.weight.get_value()
    assert packed.packed.shape == (depth, K * K // 2, 1) and packed.shape == (K, K)

    @nnx.jit
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, layer):
        return jnp.tanh(layer(x))

    x = jax.random.normal(jax.random.key(1), (4, K))
    got = forward(x, stack)
    # Independent reference: each layer's slice dequantized by qflax.quant and applied in turn.
    want = x
    for i in range(depth):
        q_i = jax.tree.map(lambda a: a[i], packed)
        want = jnp.tanh(want @ quant.dequantize_4bit(q_i).T + stack.bias[...][i])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The same through the op with the first layer's slice, eagerly.
    q0 = jax.tree.map(lambda a: a[0], packed)
    b0 = stack.bias[...][0]
    np.testing.assert_allclose(ops.matmul_4bit(x, q0, b0), x @ quant.dequantize_4bit(q0).T + b0, rtol=1e-5, atol=1e-5)
