"""qflax.linen SwitchBack layers: parameters, variants, inference mode (prepare_for_eval), bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import ops
from qflax.linen import (
    StandardDense,
    SwitchBackDense,
    SwitchBackDenseBnb,
    SwitchBackDenseGlobal,
    SwitchBackDenseGlobalMemEfficient,
    SwitchBackDenseVectorwise,
    prepare_for_eval,
)
from qflax.quant.switchback import quantize_global, quantize_rowwise

FEATURES = 24


def _x(shape=(2, 5, 16), dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


LAYER_VARIANTS = [
    (SwitchBackDense(FEATURES), "global"),
    (SwitchBackDense(FEATURES, vector_wise_quantization=True), "vectorwise"),
    (SwitchBackDense(FEATURES, mem_efficient=True), "global_mem_efficient"),
    (SwitchBackDenseGlobal(FEATURES), "global"),
    (SwitchBackDenseVectorwise(FEATURES), "vectorwise"),
    (SwitchBackDenseGlobalMemEfficient(FEATURES), "global_mem_efficient"),
]


@pytest.mark.parametrize(
    "layer,variant",
    LAYER_VARIANTS,
    ids=["flag-global", "flag-vectorwise", "flag-mem-efficient", "Global", "Vectorwise", "GlobalMemEfficient"],
)
def test_layer_is_the_op_on_flax_params(layer, variant):
    x = _x()
    variables = layer.init(jax.random.key(1), x)
    assert set(variables) == {"params"}  # init never creates the inference-mode int8 copy
    params = variables["params"]
    assert params["kernel"].shape == (16, FEATURES) and params["bias"].shape == (FEATURES,)
    assert layer.variant == variant

    def via_layer(p, x):
        return layer.apply({"params": p}, x)

    def via_op(p, x):
        return ops.switchback_matmul(x, p["kernel"].T, p["bias"], variant=variant)

    g = jax.random.normal(jax.random.key(2), (2, 5, FEATURES))
    results = [jax.jit(lambda p, x: (lambda o, vjp: (o, vjp(g)))(*jax.vjp(f, p, x)))(params, x) for f in (via_layer, via_op)]
    for a, e in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_standard_dense_equals_flax_dense():
    x = _x()
    params = nn.Dense(FEATURES).init(jax.random.key(1), x)["params"]
    g = jax.random.normal(jax.random.key(2), (2, 5, FEATURES))
    outs = []
    for layer in (StandardDense(FEATURES), nn.Dense(FEATURES)):
        out, vjp = jax.vjp(lambda p, x: layer.apply({"params": p}, x), params, x)
        outs.append((out, vjp(g)))
    for a, e in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_bnb_layer_passes_threshold():
    x = _x().at[..., 2].multiply(10.0)
    layer = SwitchBackDenseBnb(FEATURES, threshold=3.0)
    params = layer.init(jax.random.key(1), x)["params"]
    out = layer.apply({"params": params}, x)
    want = ops.switchback_bnb_matmul(x, params["kernel"].T, params["bias"], threshold=3.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert not np.array_equal(np.asarray(out), np.asarray(SwitchBackDenseBnb(FEATURES).apply({"params": params}, x)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_output_dtype_is_input_dtype_or_dtype_attribute(dtype):
    x = _x(dtype=dtype)
    for layer in (SwitchBackDense(FEATURES), StandardDense(FEATURES), SwitchBackDenseBnb(FEATURES)):
        variables = layer.init(jax.random.key(1), x)
        assert layer.apply(variables, x).dtype == dtype
    layer = SwitchBackDense(FEATURES, dtype=jnp.bfloat16)
    assert layer.apply(layer.init(jax.random.key(1), x), x).dtype == jnp.bfloat16


@pytest.mark.parametrize("vector_wise", [False, True])
def test_prepare_for_eval_keeps_params_and_matches_training(vector_wise):
    x = _x(dtype=jnp.bfloat16)
    layer = SwitchBackDense(FEATURES, vector_wise_quantization=vector_wise)
    variables = layer.init(jax.random.key(1), x)
    eval_vars = prepare_for_eval(layer, variables, x[:1, :1])
    kernel = variables["params"]["kernel"]
    assert eval_vars["params"] is variables["params"]  # nothing the user still needs is dropped
    want_codes, want_scale = (quantize_rowwise if vector_wise else quantize_global)(kernel.T)
    np.testing.assert_array_equal(np.asarray(eval_vars["quantized"]["weight"]), np.asarray(want_codes))
    np.testing.assert_array_equal(np.asarray(eval_vars["quantized"]["weight_scale"]), np.asarray(want_scale))
    assert eval_vars["quantized"]["weight_scale"].shape == ((FEATURES,) if vector_wise else (1,))

    inference = jax.jit(layer.apply)(eval_vars, x)
    training = layer.apply({"params": variables["params"]}, x)
    assert inference.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(inference.astype(jnp.float32)), np.asarray(training.astype(jnp.float32)), rtol=1e-2, atol=1e-2
    )
    # And both are int8-accurate versions of the float layer.
    dense = StandardDense(FEATURES).apply(variables, x.astype(jnp.float32))
    assert float(jnp.max(jnp.abs(inference.astype(jnp.float32) - dense))) < 0.05 * float(jnp.max(jnp.abs(dense)))


def test_prepared_weights_are_used_not_recomputed():
    x = _x()
    layer = SwitchBackDense(FEATURES)
    variables = layer.init(jax.random.key(1), x)
    eval_vars = prepare_for_eval(layer, variables, x)
    zeroed = {**eval_vars, "quantized": {**eval_vars["quantized"], "weight": jnp.zeros_like(eval_vars["quantized"]["weight"])}}
    np.testing.assert_allclose(
        np.asarray(layer.apply(zeroed, x)), np.broadcast_to(np.asarray(variables["params"]["bias"]), (2, 5, FEATURES))
    )


def test_prepare_for_eval_in_a_nested_model():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(SwitchBackDenseVectorwise(32)(x))
            return SwitchBackDense(8)(h) + StandardDense(8)(x)

    model = Block()
    x = _x((3, 16))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    eval_vars = jax.jit(lambda v, x: prepare_for_eval(model, v, x))(variables, x)
    assert set(eval_vars["quantized"]) == {"SwitchBackDenseVectorwise_0", "SwitchBackDense_0"}
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(np.asarray(apply(eval_vars, x)), np.asarray(apply(variables, x)), rtol=1e-5, atol=1e-5)
    # Training from the same variables still works: gradients reach every kernel.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(eval_vars["params"])
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_vector_wise_with_mem_efficient_raises():
    with pytest.raises(ValueError, match="vector_wise_quantization=True.*mem_efficient=True"):
        SwitchBackDense(FEATURES, vector_wise_quantization=True, mem_efficient=True)
    with pytest.raises(ValueError, match="vector_wise_quantization=True.*mem_efficient=True"):
        SwitchBackDenseVectorwise(FEATURES, mem_efficient=True)
    with pytest.raises(ValueError, match="SwitchBackDenseGlobal fixes vector_wise_quantization=False"):
        SwitchBackDenseGlobal(FEATURES, vector_wise_quantization=True)


def test_integer_input_raises():
    x = jnp.ones((2, 16), jnp.int32)
    for layer in (SwitchBackDense(FEATURES), StandardDense(FEATURES), SwitchBackDenseBnb(FEATURES)):
        with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16"):
            layer.init(jax.random.key(0), x)


def test_shape_mismatch_raises():
    layer = SwitchBackDense(FEATURES)
    variables = layer.init(jax.random.key(0), _x((2, 16)))
    with pytest.raises(Exception, match="kernel"):  # flax's ScopeParamShapeError names the parameter
        layer.apply(variables, _x((2, 9)))
    eval_vars = prepare_for_eval(layer, variables, _x((2, 16)))
    with pytest.raises(Exception, match="kernel|in_features"):
        layer.apply(eval_vars, _x((2, 9)))
