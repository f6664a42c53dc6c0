"""Out-of-range ids (every embedding, integer dtype, eager and jit) and zero-size batches (every dense op and layer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_compat as bnb
from qflax import linen as qnn
from qflax import nnx as qnnx
from qflax import ops, quant

N, D = 10, 64
TABLE = jax.random.normal(jax.random.key(0), (N, D), jnp.float32)


def _linen(module):
    variables = module.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
    return lambda ids: module.apply(variables, ids)


EMBEDDINGS = {
    "ops.embed_4bit": lambda: (lambda ids: ops.embed_4bit(ids, quant.quantize_4bit(TABLE))),
    "ops.embed_4bit straddling": lambda: (lambda ids: ops.embed_4bit(ids, quant.quantize_4bit(TABLE[:, :48], 32))),
    "ops.embed_8bit": lambda: (lambda ids: ops.embed_8bit(ids, quant.quantize_rows(TABLE))),
    "linen.Embed": lambda: _linen(qnn.Embed(N, D)),
    "linen.Embed padding": lambda: _linen(qnn.Embed(N, D, padding_idx=0)),
    "linen.StableEmbed": lambda: _linen(qnn.StableEmbed(N, D)),
    "linen.Embed8bit": lambda: _linen(qnn.Embed8bit(N, D)),
    "linen.EmbedNF4": lambda: _linen(qnn.EmbedNF4(N, D)),
    "nnx.Embed": lambda: qnnx.Embed(N, D, rngs=nnx.Rngs(0)),
    "nnx.StableEmbed": lambda: qnnx.StableEmbed(N, D, rngs=nnx.Rngs(0)),
    "nnx.Embed8bit": lambda: qnnx.Embed8bit(N, D, rngs=nnx.Rngs(0)),
    "nnx.EmbedNF4": lambda: qnnx.EmbedNF4(N, D, rngs=nnx.Rngs(0)),
}
SIGNED = [np.int8, np.int16, np.int32, np.int64]
UNSIGNED = [np.uint8, np.uint16, np.uint32, np.uint64]


def _bad_ids(dtype):
    """(ids, which are out of range) for one dtype: negative, = N, far above, and beyond 32 bits."""
    values = [3, N, N + 100, 0]
    bad = [False, True, True, False]
    if np.issubdtype(dtype, np.signedinteger):
        values += [-1, -N]
        bad += [True, True]
    if np.iinfo(dtype).bits == 64:
        values += [2**32 + 1, 2**32]  # would wrap to the valid ids 1 and 0 when narrowed to int32
        bad += [True, True]
    return np.asarray(values, dtype), np.asarray(bad)


@pytest.mark.filterwarnings("ignore:Embedding size")
@pytest.mark.parametrize("name", EMBEDDINGS)
@pytest.mark.parametrize("dtype", SIGNED + UNSIGNED, ids=lambda d: np.dtype(d).name)
def test_out_of_range_ids_give_nan_rows_eager_and_jit(name, dtype):
    lookup = EMBEDDINGS[name]()
    ids, bad = _bad_ids(dtype)
    eager = np.asarray(lookup(ids), np.float32)  # numpy ids, any width
    assert np.isnan(eager[bad]).all() and np.isfinite(eager[~bad]).all()
    if np.iinfo(dtype).bits <= 32:  # JAX arrays without x64 hold at most 32 bits
        jax_ids = jnp.asarray(ids)
        np.testing.assert_array_equal(np.asarray(jax.jit(lookup)(jax_ids), np.float32), eager)
        np.testing.assert_array_equal(np.asarray(lookup(jax_ids), np.float32), eager)


@pytest.mark.parametrize("make", [bnb.nn.EmbeddingNF4, bnb.nn.Embedding8bit, bnb.nn.Embedding, bnb.nn.StableEmbedding])
def test_torch_compat_embeddings_raise_index_error_like_torch(make):
    layer = make(N, D).to("cpu")
    for ids in ([N], [-1], [2**32 + 1]):
        with pytest.raises(IndexError):
            layer(torch.tensor(ids, dtype=torch.int64))


X0 = jnp.zeros((0, 3, D), jnp.float32)  # zero rows in a leading dimension
W = jax.random.normal(jax.random.key(1), (8, D), jnp.float32)
B = jnp.ones((8,), jnp.float32)

DENSE_OPS = {
    "matmul_4bit": lambda x, w, b: ops.matmul_4bit(x, quant.quantize_4bit(w), b),
    "matmul_8bit": lambda x, w, b: ops.matmul_8bit(x, quant.quantize_rows(w), b, threshold=3.0),
    "matmul_8bit_trainable": lambda x, w, b: ops.matmul_8bit_trainable(x, w, b, threshold=3.0),
    "switchback global": lambda x, w, b: ops.switchback_matmul(x, w, b),
    "switchback vectorwise": lambda x, w, b: ops.switchback_matmul(x, w, b, variant="vectorwise"),
    "switchback mem efficient": lambda x, w, b: ops.switchback_matmul(x, w, b, variant="global_mem_efficient"),
    "switchback_matmul_prepared": lambda x, w, b: ops.switchback_matmul_prepared(x, *quant.quantize_global(w), b),
    "standard_matmul": lambda x, w, b: ops.standard_matmul(x, w, b),
    "switchback_bnb_matmul": lambda x, w, b: ops.switchback_bnb_matmul(x, w, b, threshold=3.0),
}


@pytest.mark.parametrize("name", DENSE_OPS)
def test_zero_size_batch_ops_forward_and_backward(name):
    fn = DENSE_OPS[name]
    out = fn(X0, W, B)
    assert out.shape == (0, 3, 8) and out.dtype == X0.dtype
    gx, gw, gb = jax.grad(lambda x, w, b: fn(x, w, b).sum(), argnums=(0, 1, 2))(X0, W, B)
    assert gx.shape == X0.shape
    assert not np.asarray(gw).any() and not np.asarray(gb).any()  # sums over zero rows
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(X0, W, B)), np.asarray(out))


def _init_apply(module):
    variables = module.init(jax.random.key(0), jnp.ones((1, D)))
    return module.apply(variables, X0)


ZERO_LAYERS = {
    "linen.DenseNF4": lambda: _init_apply(qnn.DenseNF4(8)),
    "linen.Dense8bitLt": lambda: _init_apply(qnn.Dense8bitLt(8, threshold=6.0)),
    "linen.Dense8bitLt trainable": lambda: _init_apply(qnn.Dense8bitLt(8, has_fp16_weights=True)),
    "linen.OutlierAwareDense": lambda: _init_apply(qnn.OutlierAwareDense(8)),
    "linen.SwitchBackDense": lambda: _init_apply(qnn.SwitchBackDense(8)),
    "linen.SwitchBackDenseBnb": lambda: _init_apply(qnn.SwitchBackDenseBnb(8)),
    "linen.StandardDense": lambda: _init_apply(qnn.StandardDense(8)),
    "nnx.DenseNF4": lambda: qnnx.DenseNF4(D, 8, rngs=nnx.Rngs(0))(X0),
    "nnx.Dense8bitLt": lambda: qnnx.Dense8bitLt(D, 8, rngs=nnx.Rngs(0))(X0),
    "nnx.OutlierAwareDense": lambda: qnnx.OutlierAwareDense(D, 8, rngs=nnx.Rngs(0))(X0),
    "nnx.SwitchBackDense": lambda: qnnx.SwitchBackDense(D, 8, rngs=nnx.Rngs(0))(X0),
}


@pytest.mark.parametrize("name", ZERO_LAYERS)
def test_zero_size_batch_layers(name):
    out = ZERO_LAYERS[name]()
    assert out.shape == (0, 3, 8)


TORCH_LAYERS = {
    "Linear8bitLt frozen": lambda: bnb.nn.Linear8bitLt(D, 8, has_fp16_weights=False, threshold=6.0).to("cpu"),
    "Linear8bitLt trainable": lambda: bnb.nn.Linear8bitLt(D, 8),
    "SwitchBackLinearGlobal": lambda: bnb.nn.SwitchBackLinearGlobal(D, 8),
    "SwitchBackLinearVectorwise": lambda: bnb.nn.SwitchBackLinearVectorwise(D, 8),
    "SwitchBackLinear mem_efficient": lambda: bnb.nn.SwitchBackLinear(D, 8, mem_efficient=True),
    "StandardLinear": lambda: bnb.nn.StandardLinear(D, 8),
    "SwitchBackLinearBnb": lambda: bnb.nn.SwitchBackLinearBnb(D, 8, threshold=3.0),
    "LinearNF4": lambda: bnb.nn.LinearNF4(D, 8).to("cpu"),
}


@pytest.mark.parametrize("name", TORCH_LAYERS)
def test_zero_size_batch_torch_layers_match_torch_linear(name):
    layer = TORCH_LAYERS[name]()
    x = torch.zeros(0, 3, D, requires_grad=True)
    out = layer(x)
    reference = torch.nn.Linear(D, 8)(x)
    assert out.shape == reference.shape == (0, 3, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape
    if layer.weight.requires_grad:
        assert not layer.weight.grad.any()
