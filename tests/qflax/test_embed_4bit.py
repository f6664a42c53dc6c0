"""qflax.ops.embed_4bit and qflax.linen.Embed4bit / EmbedNF4 / EmbedFP4."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax.linen import Embed4bit, EmbedFP4, EmbedNF4, from_bnb_checkpoint, to_bnb_checkpoint
from qflax.ops import embed_4bit
from qflax.quant import dequantize_4bit, quantize_4bit
from tests.pairwise import pairwise

quantize = jax.jit(quantize_4bit, static_argnames=("blocksize", "quant_type", "compress_statistics"))
ID_SHAPES = ((10,), (10, 10), (10, 10, 10))


def table(rows, features, quant_type="nf4", nested=False, dtype=jnp.float32, seed=0):
    w = jax.random.uniform(jax.random.key(seed), (rows, features), jnp.float32, -1, 1).astype(dtype)
    return quantize(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)


def random_ids(shape, rows, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, rows)


# features 128: whole blocks per row (partial decode); 65: blocks straddle rows. Pairwise: 4 of 8 cases.
@pytest.mark.parametrize("quant_type,features,nested", pairwise(["nf4", "fp4"], [128, 65], [False, True]))
def test_lookup_equals_rows_of_the_dequantized_table(quant_type, features, nested):
    q = table(50, features, quant_type, nested)
    full = np.asarray(dequantize_4bit(q))
    lookup = jax.jit(embed_4bit)
    for shape in ID_SHAPES:
        ids = random_ids(shape, 50)
        out = lookup(ids, q)
        assert out.shape == shape + (features,) and out.dtype == jnp.float32
        # Jitted and eager decoding of double-quantized absmax may fuse differently: 1 ulp.
        np.testing.assert_allclose(np.asarray(out), full[np.asarray(ids)], rtol=3e-7, atol=0)


def test_partial_path_decodes_only_the_gathered_rows():
    rows = 1000

    def float_intermediate_sizes(features):
        jaxpr = jax.make_jaxpr(embed_4bit)(jnp.arange(3), table(rows, features))
        return [
            int(np.prod(v.aval.shape))
            for e in jaxpr.jaxpr.eqns
            for v in e.outvars
            if jnp.issubdtype(v.aval.dtype, jnp.floating)
        ]

    assert max(float_intermediate_sizes(128)) < rows * 128 // 8  # rows of 3 ids plus the absmax vector
    assert max(float_intermediate_sizes(65)) >= rows * 65  # the other path decodes the whole table


def test_table_dtype_is_kept():
    q = table(20, 64, dtype=jnp.bfloat16)
    out = embed_4bit(jnp.array([1, 2]), q)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize_4bit(q))[[1, 2]])


@pytest.mark.parametrize("features", [64, 65])
def test_out_of_range_ids_give_nan_rows(features):
    q = table(8, features)
    ids = jnp.array([[0, 7, 8], [-1, 3, 1000]])
    full = np.asarray(dequantize_4bit(q))
    for out in (embed_4bit(ids, q), jax.jit(embed_4bit)(ids, q)):
        out = np.asarray(out)
        assert np.isnan(out[0, 2]).all() and np.isnan(out[1, 0]).all() and np.isnan(out[1, 2]).all()
        np.testing.assert_array_equal(out[0, :2], full[[0, 7]])
        np.testing.assert_array_equal(out[1, 1], full[3])


@pytest.mark.parametrize("module", [EmbedNF4, EmbedFP4])
def test_plus_minus_one_tables_are_reproduced_exactly(module):
    def signs(key, shape, dtype):
        return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0).astype(dtype)

    model = module(30, 64, embedding_init=signs)
    ids = random_ids((10, 10), 30)
    variables = jax.jit(model.init)(jax.random.key(0), ids)
    assert variables["quantized"]["weight"].quant_type == module.quant_type
    table_values = np.asarray(signs(_params_rng(0), (30, 64), jnp.float32))
    np.testing.assert_array_equal(np.asarray(model.apply(variables, ids)), table_values[np.asarray(ids)])


def _params_rng(seed):
    import flax.linen as nn

    captured = {}

    class Probe(nn.Module):
        @nn.compact
        def __call__(self):
            captured["rng"] = self.make_rng("params")

    Probe().init(jax.random.key(seed))
    return captured["rng"]


def test_width_not_divisible_by_blocksize_warns_once_per_table():
    model = Embed4bit(16, 65)
    ids = jnp.array([1, 2])
    variables = {"quantized": {"weight": table(16, 65)}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.apply(variables, ids)
        model.apply(variables, ids)
        Embed4bit(16, 64).apply({"quantized": {"weight": table(16, 64)}}, ids)
    messages = [str(w.message) for w in caught]
    assert messages == ["Embedding size 65 is not divisible by block size 64. This will lead to slow inference."]


def test_attend_is_the_tied_output_projection():
    q = table(12, 64)
    model = Embed4bit(12, 64)
    query = jax.random.normal(jax.random.key(5), (3, 64))
    logits = model.apply({"quantized": {"weight": q}}, query, method="attend")
    ref = np.asarray(query, np.float64) @ np.asarray(dequantize_4bit(q), np.float64).T
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)


def test_embed_tables_export_and_load_like_dense_weights():
    model = EmbedNF4(40, 64)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.arange(4))
    state = to_bnb_checkpoint(variables)
    assert "weight.quant_state.bitsandbytes__nf4" in state
    reloaded = from_bnb_checkpoint(state)
    ids = jnp.arange(40)
    np.testing.assert_array_equal(np.asarray(model.apply(reloaded, ids)), np.asarray(model.apply(variables, ids)))


def test_bad_inputs_raise_clear_errors():
    q = table(16, 64)
    model = Embed4bit(16, 64)
    with pytest.raises(TypeError, match="ids must be an integer array.*got dtype float32"):
        model.apply({"quantized": {"weight": q}}, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"weight has shape \(16, 64\), but this layer needs \(17, 64\)"):
        Embed4bit(17, 64).apply({"quantized": {"weight": q}}, jnp.array([1]))
    with pytest.raises(ValueError, match="the quantized weight is 'nf4' but the layer's quant_type is 'fp4'"):
        EmbedFP4(16, 64).apply({"quantized": {"weight": q}}, jnp.array([1]))
    with pytest.raises(KeyError, match="no variable 'weight'"):
        model.apply({}, jnp.array([1]))
    with pytest.raises(ValueError, match="EmbedNF4 fixes quant_type='nf4'"):
        EmbedNF4(4, 64, quant_type="fp4")
    with pytest.raises(ValueError, match="features must be a positive integer"):
        Embed4bit(4, 0).init(jax.random.key(0), jnp.array([1]))
