"""Embed, StableEmbed and Embed8bit vs torch / bitsandbytes 0.49.2 and independent numpy math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bitsandbytes as bnb
from qflax import linen as qnn
from qflax import ops, quant

INDEX_SHAPES = [(10,), (10, 10), (10, 10, 10)]


def _ids(shape, num, seed=0):
    return np.random.default_rng(seed).integers(0, num, size=shape).astype(np.int32)


@pytest.mark.parametrize("features", [64, 65])
@pytest.mark.parametrize("shape", INDEX_SHAPES)
def test_embed8bit_pm1_exact_uniform_close_and_matches_bitsandbytes(features, shape):
    num = 32
    rng = np.random.default_rng(features)
    pm1 = np.where(rng.random((num, features)) < 0.5, -1.0, 1.0).astype(np.float32)
    uniform = rng.random((num, features)).astype(np.float16).astype(np.float32)  # fp16-exact, as bnb quantizes fp16
    ids = _ids(shape, num)
    layer = qnn.Embed8bit(num, features)
    for table, atol in ((pm1, 0.0), (uniform, 0.05)):
        out = layer.apply({"quantized": {"weight": quant.quantize_rows(jnp.asarray(table))}}, jnp.asarray(ids))
        assert out.shape == (*shape, features) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), table[ids], atol=atol, rtol=0)

        bnb_layer = bnb.nn.Embedding8bit(num, features)
        bnb_layer.load_state_dict({"weight": torch.from_numpy(table)})
        bnb_layer = bnb_layer.to("cpu")
        with torch.no_grad():
            expected = bnb_layer(torch.from_numpy(ids.astype(np.int64))).numpy()
        # Same codes and scales; bitsandbytes divides by 127 where XLA multiplies by 1/127 (1 ulp).
        np.testing.assert_allclose(np.asarray(out), expected, rtol=2.5e-7, atol=0)


def test_embed8bit_init_output_dtype_and_errors():
    layer = qnn.Embed8bit(20, 8, dtype=jnp.bfloat16)
    ids = jnp.asarray(_ids((4, 3), 20))
    variables = layer.init(jax.random.key(0), ids)
    assert set(variables) == {"quantized"}
    weight = variables["quantized"]["weight"]
    assert weight.codes.dtype == jnp.int8 and weight.codes.shape == (20, 8) and weight.scale.shape == (20,)
    assert layer.apply(variables, ids).dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="ids must be an integer array"):
        layer.apply(variables, jnp.ones((3,), jnp.float32))
    bad_row = np.asarray(layer.apply(variables, jnp.asarray([0, 20, -1])), np.float32)  # README: NaN rows
    assert np.isfinite(bad_row[0]).all() and np.isnan(bad_row[1:]).all()
    with pytest.raises(ValueError, match="quantized table must have shape"):
        qnn.Embed8bit(21, 8).apply(variables, ids)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ops.embed_8bit(ids, weight, dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"SCB\) must be float32 of shape \(20,\)"):
        ops.embed_8bit(ids, quant.Int8Rows(codes=weight.codes, scale=jnp.ones(19, jnp.float32)))
    # Under jit the same: an out-of-range id gives a NaN row, never another row.
    out = jax.jit(lambda i: ops.embed_8bit(i, weight))(jnp.asarray([1, 25, -1]))
    assert np.all(np.isfinite(np.asarray(out[0]))) and np.all(np.isnan(np.asarray(out[1:])))


def test_embed_init_is_xavier_uniform_with_zero_padding_row():
    num, features = 300, 100
    variables = qnn.Embed(num, features, padding_idx=-1).init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    table = np.asarray(variables["params"]["embedding"])
    bound = np.sqrt(6.0 / (num + features))
    np.testing.assert_array_equal(table[num - 1], 0.0)
    body = table[: num - 1]
    assert np.abs(body).max() <= bound and np.abs(body).max() > 0.98 * bound
    assert abs(body.std() - bound / np.sqrt(3)) < 0.03 * bound


@pytest.mark.parametrize("shape", INDEX_SHAPES)
def test_embed_matches_torch_embedding_with_padding_gradient(shape):
    num, features, pad = 16, 12, 3
    rng = np.random.default_rng(1)
    table = rng.standard_normal((num, features)).astype(np.float32)
    ids = _ids(shape, num, seed=2)
    ids.reshape(-1)[:2] = pad
    proj = rng.standard_normal((*shape, features)).astype(np.float32)
    layer = qnn.Embed(num, features, padding_idx=pad)

    def loss(table):
        return jnp.sum(layer.apply({"params": {"embedding": table}}, jnp.asarray(ids)) * proj)

    out = layer.apply({"params": {"embedding": jnp.asarray(table)}}, jnp.asarray(ids))
    grad = jax.grad(loss)(jnp.asarray(table))

    weight = torch.from_numpy(table.copy()).requires_grad_(True)
    expected = torch.nn.functional.embedding(torch.from_numpy(ids.astype(np.int64)), weight, padding_idx=pad)
    (expected * torch.from_numpy(proj)).sum().backward()
    np.testing.assert_array_equal(np.asarray(out), expected.detach().numpy())
    np.testing.assert_allclose(np.asarray(grad), weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(grad)[pad], 0.0)


def test_embed_max_norm_matches_torch():
    num, features = 10, 6
    table = (np.random.default_rng(3).standard_normal((num, features)) * 2).astype(np.float32)
    ids = _ids((4, 5), num, seed=4)
    out = qnn.Embed(num, features, max_norm=1.5).apply({"params": {"embedding": jnp.asarray(table)}}, jnp.asarray(ids))
    expected = torch.nn.functional.embedding(
        torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(table.copy()), max_norm=1.5
    ).numpy()
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)
    assert np.all(np.linalg.norm(np.asarray(out), axis=-1) <= 1.5 + 1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_stable_embed_output_dtype_is_table_dtype(dtype):
    layer = qnn.StableEmbed(12, 16, param_dtype=dtype)
    ids = jnp.asarray(_ids((3, 4), 12))
    variables = layer.init(jax.random.key(0), ids)
    assert variables["params"]["embedding"].dtype == dtype
    assert variables["params"]["norm"]["scale"].dtype == jnp.float32
    out = layer.apply(variables, ids)
    assert out.dtype == dtype and out.shape == (3, 4, 16)


@pytest.mark.parametrize("half", [False, True])
def test_stable_embed_matches_bitsandbytes(half):
    num, features, pad = 12, 16, 0
    rng = np.random.default_rng(5)
    table = rng.standard_normal((num, features)).astype(np.float32)
    scale = rng.random(features).astype(np.float32) + 0.5
    bias = rng.standard_normal(features).astype(np.float32)
    ids = _ids((5, 3), num, seed=6)
    bnb_layer = bnb.nn.StableEmbedding(num, features, padding_idx=pad)
    bnb_layer.load_state_dict(
        {"weight": torch.from_numpy(table), "norm.weight": torch.from_numpy(scale), "norm.bias": torch.from_numpy(bias)}
    )
    if half:  # casting only the table works in bitsandbytes (docs/embeddings.md#stableembedding)
        bnb_layer.weight.data = bnb_layer.weight.data.half()
    with torch.no_grad():
        expected = bnb_layer(torch.from_numpy(ids.astype(np.int64))).float().numpy()
    dtype = jnp.float16 if half else jnp.float32
    params = {
        "embedding": jnp.asarray(table).astype(dtype),
        "norm": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
    }
    out = qnn.StableEmbed(num, features, padding_idx=pad, param_dtype=dtype).apply({"params": params}, jnp.asarray(ids))
    assert out.dtype == dtype
    tol = 2e-3 if half else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=tol, atol=tol)


def test_embed_bad_arguments_raise_clear_errors():
    ids = jnp.asarray([0, 1])
    with pytest.raises(ValueError, match=r"padding_idx must lie in \[-4, 4\), got 4"):
        qnn.Embed(4, 3, padding_idx=4).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        qnn.Embed(4, 3, max_norm=0.0).init(jax.random.key(0), ids)
    variables = qnn.StableEmbed(4, 3).init(jax.random.key(0), ids)
    with pytest.raises(TypeError, match="ids must be an integer array"):
        qnn.StableEmbed(4, 3).apply(variables, jnp.asarray([0.0, 1.0]))
    out = np.asarray(qnn.StableEmbed(4, 3).apply(variables, jnp.asarray([-1, 1])))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
