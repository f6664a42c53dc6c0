"""Each qflax.nnx module against its qflax.linen twin: same weights and inputs -> identical outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors as flax_errors
from flax import nnx

from qflax import linen as ql
from qflax import nnx as qn

K, N = 128, 24


def _floats(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _with_outliers(shape):
    return _floats(shape).at[..., 3].mul(8.0)


IDS = jnp.array([[0, 3, 7], [1, 2, 9]], jnp.int32)

# (id, Linen module, NNX module factory (rngs -> module), input, differentiable in x)
CASES = [
    ("Dense4bit", ql.Dense4bit(N), lambda r: qn.Dense4bit(K, N, rngs=r), _floats((2, 3, K)), True),
    (
        "Dense4bit-fp4-bs128-plain-bf16compute",
        ql.Dense4bit(N, quant_type="fp4", blocksize=128, compress_statistics=False, compute_dtype=jnp.bfloat16),
        lambda r: qn.Dense4bit(
            K, N, quant_type="fp4", blocksize=128, compress_statistics=False, compute_dtype=jnp.bfloat16, rngs=r
        ),
        _floats((5, K)),
        True,
    ),
    ("DenseNF4-bf16", ql.DenseNF4(N), lambda r: qn.DenseNF4(K, N, rngs=r), _floats((4, K), dtype=jnp.bfloat16), True),
    (
        "DenseFP4-nobias",
        ql.DenseFP4(N, use_bias=False),
        lambda r: qn.DenseFP4(K, N, use_bias=False, rngs=r),
        _floats((K,)),
        True,
    ),
    ("Dense8bitLt", ql.Dense8bitLt(N), lambda r: qn.Dense8bitLt(K, N, rngs=r), _floats((2, 3, K)), True),
    (
        "Dense8bitLt-threshold",
        ql.Dense8bitLt(N, threshold=6.0),
        lambda r: qn.Dense8bitLt(K, N, threshold=6.0, rngs=r),
        _with_outliers((6, K)),
        True,
    ),
    (
        "Dense8bitLt-fp16-weights",
        ql.Dense8bitLt(N, threshold=6.0, has_fp16_weights=True),
        lambda r: qn.Dense8bitLt(K, N, threshold=6.0, has_fp16_weights=True, rngs=r),
        _with_outliers((6, K)),
        True,
    ),
    (
        "OutlierAwareDense-float",
        ql.OutlierAwareDense(N),
        lambda r: qn.OutlierAwareDense(K, N, rngs=r),
        _floats((6, K)),
        True,
    ),
    ("SwitchBackDense", ql.SwitchBackDense(N), lambda r: qn.SwitchBackDense(K, N, rngs=r), _floats((2, 3, K)), True),
    (
        "SwitchBackDenseGlobal-fp16",
        ql.SwitchBackDenseGlobal(N),
        lambda r: qn.SwitchBackDenseGlobal(K, N, rngs=r),
        _floats((6, K), dtype=jnp.float16),
        True,
    ),
    (
        "SwitchBackDenseVectorwise",
        ql.SwitchBackDenseVectorwise(N),
        lambda r: qn.SwitchBackDenseVectorwise(K, N, rngs=r),
        _floats((6, K)),
        True,
    ),
    (
        "SwitchBackDenseGlobalMemEfficient",
        ql.SwitchBackDenseGlobalMemEfficient(N),
        lambda r: qn.SwitchBackDenseGlobalMemEfficient(K, N, rngs=r),
        _floats((6, K)),
        True,
    ),
    ("StandardDense", ql.StandardDense(N), lambda r: qn.StandardDense(K, N, rngs=r), _floats((2, 3, K)), True),
    (
        "SwitchBackDenseBnb",
        ql.SwitchBackDenseBnb(N, threshold=6.0),
        lambda r: qn.SwitchBackDenseBnb(K, N, threshold=6.0, rngs=r),
        _with_outliers((6, K)),
        True,
    ),
    (
        "Embed-padding-maxnorm",
        ql.Embed(10, 16, padding_idx=2, max_norm=0.5),
        lambda r: qn.Embed(10, 16, padding_idx=2, max_norm=0.5, rngs=r),
        IDS,
        False,
    ),
    (
        "StableEmbed",
        ql.StableEmbed(10, 16, padding_idx=-1),
        lambda r: qn.StableEmbed(10, 16, padding_idx=-1, rngs=r),
        IDS,
        False,
    ),
    ("Embed4bit", ql.Embed4bit(10, 64), lambda r: qn.Embed4bit(10, 64, rngs=r), IDS, False),
    ("EmbedNF4-rows-straddle-blocks", ql.EmbedNF4(10, 40), lambda r: qn.EmbedNF4(10, 40, rngs=r), IDS, False),
    ("EmbedFP4", ql.EmbedFP4(10, 64, blocksize=32), lambda r: qn.EmbedFP4(10, 64, blocksize=32, rngs=r), IDS, False),
    ("Embed8bit", ql.Embed8bit(10, 16), lambda r: qn.Embed8bit(10, 16, rngs=r), IDS, False),
]


def _assert_identical(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.filterwarnings("ignore:Embedding size:UserWarning")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_output_both_ways(case):
    _, linen_module, make_nnx, x, _ = case
    # Linen weights -> NNX.
    variables = linen_module.init(jax.random.key(3), x)
    model = qn.from_linen_variables(make_nnx(nnx.Rngs(7)), variables)
    _assert_identical(linen_module.apply(variables, x), model(x))
    # NNX weights (other seed) -> Linen.
    other = make_nnx(nnx.Rngs(11))
    out = other(x)
    assert not np.array_equal(np.asarray(out, np.float32), np.asarray(model(x), np.float32))
    _assert_identical(linen_module.apply(qn.to_linen_variables(other), x), out)


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]])
def test_same_gradients(case):
    _, linen_module, make_nnx, x, _ = case
    model = make_nnx(nnx.Rngs(5))
    variables = qn.to_linen_variables(model)
    frozen = {k: v for k, v in variables.items() if k != "params"}
    cotangent = _floats(model(x).shape, seed=9, dtype=x.dtype)

    def linen_loss(params, x):
        return jnp.sum((linen_module.apply({"params": params, **frozen}, x) * cotangent).astype(jnp.float32))

    def nnx_loss(model, x):
        return jnp.sum((model(x) * cotangent).astype(jnp.float32))

    linen_params, linen_x = jax.grad(linen_loss, argnums=(0, 1))(variables.get("params", {}), x)
    nnx_params, nnx_x = nnx.grad(nnx_loss, argnums=(0, 1))(model, x)
    _assert_identical(linen_x, nnx_x)
    nnx_params = nnx.to_pure_dict(nnx_params)
    assert jax.tree.structure(nnx_params) == jax.tree.structure(linen_params)
    jax.tree.map(_assert_identical, linen_params, nnx_params)


def test_outlier_aware_quantized_twin():
    x = _floats((16, K)).at[:, 5].mul(20.0).at[:, 77].mul(12.0)
    linen_module = ql.OutlierAwareDense(N)
    variables = linen_module.init(jax.random.key(0), x)
    model = qn.from_linen_variables(qn.OutlierAwareDense(K, N, rngs=nnx.Rngs(1)), variables)
    linen_dims = ql.find_outlier_dims(linen_module, variables, x, threshold=6.0)
    nnx_dims = qn.find_outlier_dims(model, x, threshold=6.0)
    np.testing.assert_array_equal(nnx_dims[""], [5, 77])
    np.testing.assert_array_equal(nnx_dims[""], linen_dims[()])
    quantized = ql.quantize_outlier_aware(linen_module, variables, linen_dims, x)
    qn.quantize_outlier_aware(model, nnx_dims)
    assert model.kernel is None and isinstance(model.weight, qn.QuantizedWeight)
    _assert_identical(linen_module.apply(quantized, x), model(x))
    # Quantized Linen variables load into a fresh (float) NNX layer, which drops its kernel.
    fresh = qn.from_linen_variables(qn.OutlierAwareDense(K, N, rngs=nnx.Rngs(2)), quantized)
    assert fresh.kernel is None
    _assert_identical(linen_module.apply(quantized, x), fresh(x))


def test_switchback_prepared_twin():
    x = _floats((6, K))
    for vector_wise in (False, True):
        linen_module = ql.SwitchBackDense(N, vector_wise_quantization=vector_wise)
        variables = linen_module.init(jax.random.key(0), x)
        prepared = ql.prepare_for_eval(linen_module, variables, x)
        model = qn.from_linen_variables(
            qn.SwitchBackDense(K, N, vector_wise_quantization=vector_wise, rngs=nnx.Rngs(1)), variables
        )
        qn.prepare_for_eval(model)
        assert isinstance(model.weight, qn.QuantizedWeight) and model.kernel is not None
        _assert_identical(linen_module.apply(prepared, x), model(x))
        linen_vars = qn.to_linen_variables(model)
        jax.tree.map(_assert_identical, linen_vars["quantized"], prepared["quantized"])


def _raised(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the type is what is compared
        return type(err)
    return None


DENSE_CASES = [c for c in CASES if c[4]]


@pytest.mark.parametrize("case", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_bad_dense_input_same_exception_types(case):
    _, linen_module, make_nnx, x, _ = case
    model = make_nnx(nnx.Rngs(0))
    variables = qn.to_linen_variables(model)
    integer_x = jnp.ones(x.shape, jnp.int32)
    assert _raised(lambda: model(integer_x)) is TypeError
    assert _raised(lambda: linen_module.apply(variables, integer_x)) is TypeError
    narrow_x = x[..., : K - 1]
    assert _raised(lambda: model(narrow_x)) is ValueError
    linen_error = _raised(lambda: linen_module.apply(variables, narrow_x))
    # Linen layers that declare the kernel from the input's shape get flax's own shape error.
    assert linen_error is ValueError or issubclass(linen_error, flax_errors.ScopeParamShapeError)


EMBED_CASES = [c for c in CASES if not c[4]]


@pytest.mark.filterwarnings("ignore:Embedding size:UserWarning")
@pytest.mark.parametrize("case", EMBED_CASES, ids=[c[0] for c in EMBED_CASES])
def test_bad_embed_input_same_behaviour(case):
    _, linen_module, make_nnx, ids, _ = case
    model = make_nnx(nnx.Rngs(0))
    variables = qn.to_linen_variables(model)
    float_ids = ids.astype(jnp.float32)
    assert _raised(lambda: model(float_ids)) is TypeError
    assert _raised(lambda: linen_module.apply(variables, float_ids)) is TypeError
    out_of_range = ids.at[0, 0].set(10)
    # Every embedding: documented NaN rows instead of an error.
    out = np.asarray(model(out_of_range), np.float32)
    assert np.isnan(out[0, 0]).all() and not np.isnan(out[0, 1:]).any()
    np.testing.assert_array_equal(out, np.asarray(linen_module.apply(variables, out_of_range), np.float32))


x_small = _floats((2, K))


def _linen_init(make_module, x):
    return lambda: make_module().init(jax.random.key(0), x)


def _nnx_build(cls, *args, call_with=None, **kwargs):
    def build():
        module = cls(*args, rngs=nnx.Rngs(0), **kwargs)
        return module if call_with is None else module(call_with)

    return build


# (id, Linen init that must fail, NNX construction (or call) that must fail the same way)
BAD_SETTINGS = [
    (
        "vectorwise+mem_efficient",
        _linen_init(lambda: ql.SwitchBackDense(N, vector_wise_quantization=True, mem_efficient=True), x_small),
        _nnx_build(qn.SwitchBackDense, K, N, vector_wise_quantization=True, mem_efficient=True),
    ),
    (
        "DenseNF4 quant_type",
        _linen_init(lambda: ql.DenseNF4(N, quant_type="fp4"), x_small),
        _nnx_build(qn.DenseNF4, K, N, quant_type="fp4"),
    ),
    (
        "Dense4bit blocksize",
        _linen_init(lambda: ql.Dense4bit(N, blocksize=100), x_small),
        _nnx_build(qn.Dense4bit, K, N, blocksize=100),
    ),
    (
        "Dense4bit quant_type",
        _linen_init(lambda: ql.Dense4bit(N, quant_type="int4"), x_small),
        _nnx_build(qn.Dense4bit, K, N, quant_type="int4"),
    ),
    (
        "Embed4bit blocksize",
        _linen_init(lambda: ql.Embed4bit(10, 64, blocksize=3), IDS),
        _nnx_build(qn.Embed4bit, 10, 64, blocksize=3),
    ),
    (
        "Dense8bitLt threshold",
        _linen_init(lambda: ql.Dense8bitLt(N, threshold=-1.0), x_small),
        _nnx_build(qn.Dense8bitLt, K, N, threshold=-1.0, call_with=x_small),
    ),
    (
        "SwitchBackDenseBnb threshold",
        _linen_init(lambda: ql.SwitchBackDenseBnb(N, threshold=-1.0), x_small),
        _nnx_build(qn.SwitchBackDenseBnb, K, N, threshold=-1.0, call_with=x_small),
    ),
    (
        "Embed padding_idx range",
        _linen_init(lambda: ql.Embed(10, 16, padding_idx=10), IDS),
        _nnx_build(qn.Embed, 10, 16, padding_idx=10),
    ),
    (
        "Embed padding_idx type",
        _linen_init(lambda: ql.Embed(10, 16, padding_idx=1.5), IDS),
        _nnx_build(qn.Embed, 10, 16, padding_idx=1.5),
    ),
    (
        "StableEmbed max_norm",
        _linen_init(lambda: ql.StableEmbed(10, 16, max_norm=0.0), IDS),
        _nnx_build(qn.StableEmbed, 10, 16, max_norm=0.0),
    ),
]


@pytest.mark.parametrize("case", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_settings_same_exception_types(case):
    _, linen_fn, nnx_fn = case
    linen_error = _raised(linen_fn)
    assert linen_error in (TypeError, ValueError)
    assert _raised(nnx_fn) is linen_error
