"""qflax.linen.Dense4bit / DenseNF4 / DenseFP4: numerics, variables, warnings, memory, transforms, bad input."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax.linen import Dense4bit, DenseFP4, DenseNF4
from qflax.quant import Packed4bit, dequantize_4bit, quantize_4bit
from tests.pairwise import pairwise

quantize = jax.jit(quantize_4bit, static_argnames=("blocksize", "quant_type", "compress_statistics"))
K, FEATURES = 192, 40
SHAPES = ((K,), (3, K), (2, 4, K))
TOLERANCE = {jnp.float32: 1e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


def layer_variables(quant_type="nf4", blocksize=64, nested=True, features=FEATURES, k=K, seed=0):
    kw, kb = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(kw, (features, k), jnp.float32)
    q = quantize(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return {"params": {"bias": jax.random.normal(kb, (features,), jnp.float32)}, "quantized": {"weight": q}}


@pytest.mark.filterwarnings("ignore:Input type into")
# Pairwise (4 of 8 settings), each with all nine (dtype, batch shape) inputs.
@pytest.mark.parametrize("quant_type,blocksize,nested", pairwise(["nf4", "fp4"], [64, 128], [True, False]))
def test_output_equals_x_times_dequantized_weight_plus_bias(quant_type, blocksize, nested):
    model = Dense4bit(FEATURES, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    variables = layer_variables(quant_type, blocksize, nested)
    xs = {
        (np.dtype(dtype).name, shape): jax.random.normal(jax.random.key(len(shape)), shape, jnp.float32).astype(dtype)
        for dtype in TOLERANCE
        for shape in SHAPES
    }
    # One compilation for all nine (dtype, batch shape) cases.
    ys = jax.jit(lambda v, inputs: {key: model.apply(v, x) for key, x in inputs.items()})(variables, xs)
    w = np.asarray(dequantize_4bit(variables["quantized"]["weight"]), np.float64)  # (out, in)
    b = np.asarray(variables["params"]["bias"], np.float64)
    for dtype, tol in TOLERANCE.items():
        for shape in SHAPES:
            key = (np.dtype(dtype).name, shape)
            y = ys[key]
            assert y.shape == shape[:-1] + (FEATURES,) and y.dtype == dtype
            ref = np.asarray(xs[key].astype(jnp.float32), np.float64) @ w.T + b
            got = np.asarray(y.astype(jnp.float32))
            np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max(), err_msg=str(key))


def test_init_quantizes_the_initial_kernel_into_the_quantized_collection():
    model = DenseNF4(16)
    x = jnp.ones((2, 64))
    variables = jax.jit(model.init)(jax.random.key(3), x)
    assert set(variables) == {"params", "quantized"}
    assert set(variables["params"]) == {"bias"}
    q = variables["quantized"]["weight"]
    assert isinstance(q, Packed4bit) and q.shape == (16, 64) and q.quant_type == "nf4" and q.nested
    # The same draw of the float kernel, quantized once in (out, in) layout.
    kernel = nn.initializers.lecun_normal()(_params_rng(3), (64, 16))
    expected = quantize(kernel.T, blocksize=64, quant_type="nf4", compress_statistics=True)
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(expected.packed))
    no_bias = jax.jit(Dense4bit(16, quant_type="fp4", use_bias=False, compress_statistics=False).init)(
        jax.random.key(0), x
    )
    assert "params" not in no_bias or not no_bias["params"]
    assert no_bias["quantized"]["weight"].quant_type == "fp4" and not no_bias["quantized"]["weight"].nested


def _params_rng(seed):
    """The rng Flax hands to the first make_rng('params') of a root module's init."""
    captured = {}

    class Probe(nn.Module):
        @nn.compact
        def __call__(self):
            captured["rng"] = self.make_rng("params")

    Probe().init(jax.random.key(seed))
    return captured["rng"]


def test_grad_over_params_only_with_frozen_quantized_weight():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return DenseFP4(8, name="out")(nn.relu(DenseNF4(32, name="hidden")(x)))

    x = jax.random.normal(jax.random.key(0), (4, 64))
    variables = jax.jit(MLP().init)(jax.random.key(1), x)

    def loss(params):
        return jnp.sum(MLP().apply({"params": params, "quantized": variables["quantized"]}, x) ** 2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(variables["params"])
    assert float(jnp.abs(grads["out"]["bias"]).sum()) > 0


def test_fixed_quant_type_classes():
    assert DenseNF4(4).quant_type == "nf4" and DenseFP4(4).quant_type == "fp4"
    with pytest.raises(ValueError, match="DenseNF4 fixes quant_type='nf4'"):
        DenseNF4(4, quant_type="fp4")
    with pytest.raises(ValueError, match="DenseFP4 fixes quant_type='fp4'"):
        DenseFP4(4, quant_type="nf4")


def test_float16_input_without_compute_dtype_warns_once_per_layer():
    filters_before = list(warnings.filters)
    x_many, x_one = jnp.ones((3, 64), jnp.float16), jnp.ones((1, 64), jnp.float16)
    a, b = layer_variables(k=64, features=8, seed=1), layer_variables(k=64, features=8, seed=2)
    model = Dense4bit(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.apply(a, x_many)
        model.apply(a, x_many)  # same layer: no second warning
        model.apply(b, x_one)  # another layer warns, single-row text
        model.apply(b, x_many)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 2, messages
    assert messages[0].endswith("slow inference or training speed.")
    assert messages[1].endswith("slow inference.")
    assert warnings.filters == filters_before  # no process-wide filter installed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Dense4bit(8, compute_dtype=jnp.float32).apply(layer_variables(k=64, features=8, seed=3), x_many)
        model.apply(layer_variables(k=64, features=8, seed=4), jnp.ones((3, 64), jnp.bfloat16))
    assert not caught


def test_memory_4096x4096_nf4_double_quant_bits_per_weight():
    model = DenseNF4(4096, use_bias=False)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4096)))
    leaves = jax.tree_util.tree_leaves(variables)
    nbytes = sum(leaf.nbytes for leaf in leaves)
    bits_per_weight = 8 * nbytes / (4096 * 4096)
    print(f"DenseNF4 4096x4096 double-quant: {nbytes} bytes, {bits_per_weight:.4f} bits/weight")
    assert variables["quantized"]["weight"].nested
    assert 4.0 < bits_per_weight <= 4.13


def test_scan_over_a_stack_of_dense4bit_layers():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(DenseNF4(64, name="dense")(h)), None

    Stack = nn.scan(Block, variable_axes={"params": 0, "quantized": 0}, split_rngs={"params": True}, length=3)
    x = jax.random.normal(jax.random.key(0), (2, 64))
    variables = jax.jit(Stack().init)(jax.random.key(1), x, None)
    assert variables["quantized"]["dense"]["weight"].packed.shape == (3, 64 * 64 // 2, 1)
    y, _ = jax.jit(Stack().apply)(variables, x, None)
    apply_one = jax.jit(DenseNF4(64).apply)
    h = x
    for i in range(3):
        layer = jax.tree_util.tree_map(lambda leaf: leaf[i], variables)
        h = jnp.tanh(apply_one({"params": layer["params"]["dense"], "quantized": layer["quantized"]["dense"]}, h))
    np.testing.assert_allclose(np.asarray(y), np.asarray(h), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    variables = layer_variables(k=64, features=8)
    model = Dense4bit(8)
    with pytest.raises(TypeError, match=r"Dense4bit\(root\): inputs must have dtype float32, .* got int32"):
        model.apply(variables, jnp.ones((2, 64), jnp.int32))
    with pytest.raises(ValueError, match="inputs have 63 features but the weight"):
        model.apply(variables, jnp.ones((2, 63)))
    with pytest.raises(KeyError, match="no variable 'weight' in collection 'quantized'"):
        model.apply({"params": variables["params"]}, jnp.ones((2, 64)))
    with pytest.raises(ValueError, match="weight has shape \\(8, 64\\), but this layer needs \\(9, 64\\)"):
        Dense4bit(9, use_bias=False).apply(variables, jnp.ones((2, 64)))
    with pytest.raises(ValueError, match="the quantized weight is 'nf4' but the layer's quant_type is 'fp4'"):
        DenseFP4(8).apply(variables, jnp.ones((2, 64)))
    with pytest.raises(ValueError, match="blocksize 64, the layer expects 128"):
        Dense4bit(8, blocksize=128).apply(variables, jnp.ones((2, 64)))
    with pytest.raises(ValueError, match="quant_type must be one of"):
        Dense4bit(8, quant_type="int4").init(jax.random.key(0), jnp.ones((2, 64)))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        Dense4bit(8, blocksize=100).init(jax.random.key(0), jnp.ones((2, 64)))
