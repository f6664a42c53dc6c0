"""qflax.ops SwitchBack matmuls vs independent numpy formulas of docs/switchback.md (variants, SwitchBackLinearBnb)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import ops
from qflax.quant.switchback import quantize_global, quantize_rowwise

M, K, N = 6, 20, 12


def _rowq(a):
    """numpy row-wise int8: rint(a * (127 / rowmax)) in float32, zero rows -> 0."""
    absmax = np.max(np.abs(a), axis=1).astype(np.float32)
    scale = np.where(absmax == 0, np.float32(0), np.float32(127) / np.where(absmax == 0, 1, absmax))
    return np.rint(a * scale[:, None]).astype(np.int64), absmax


def _globq(a):
    absmax = np.float32(np.max(np.abs(a)))
    return np.rint(a * (np.float32(127) / absmax)).astype(np.int64), absmax


def _colq(a):
    codes, absmax = _rowq(a.T)
    return codes.T, absmax


def numpy_reference(variant, x, w, b, g, threshold=0.0):
    """(out, grad_x, grad_w, grad_b) of x @ w.T + b under cotangent g, from docs/switchback.md's formulas."""
    xq, sx = _rowq(x)
    gq, sg = _rowq(g)
    grad_w = g.T @ x
    if variant in ("global", "global_mem_efficient"):
        wq, sw = _globq(w)
        out = (xq @ wq.T) * sx[:, None] * sw / 127**2
        grad_x = (gq @ wq) * sg[:, None] * sw / 127**2
        if variant == "global_mem_efficient":
            grad_w = g.T @ (xq * sx[:, None] / 127)
    elif variant == "vectorwise":
        wq, sw = _rowq(w)
        out = (xq @ wq.T) * sx[:, None] * sw[None, :] / 127**2
        wcq, scol = _colq(w)
        grad_x = (gq @ wcq) * sg[:, None] * scol[None, :] / 127**2
    elif variant == "bnb":
        # docs/int8.md#quantization: outlier elements leave the row absmax; with several rows whole outlier columns
        # are zeroed in the codes. Those columns then go through the float weight.
        is_outlier = np.abs(x) >= threshold if threshold > 0 else np.zeros(x.shape, bool)
        cols = np.any(is_outlier, axis=0)
        xq, sx = _rowq(np.where(is_outlier, 0, x))
        if x.shape[0] > 1:
            xq[:, cols] = 0
        wq, sw = _rowq(w)
        out = (xq @ wq.T) * sx[:, None] * sw[None, :] / 127**2 + x[:, cols] @ w[:, cols].T
        grad_x = g @ (wq * sw[:, None] / 127)
    elif variant == "standard":
        out, grad_x = x @ w.T, g @ w
    return out + b, grad_x, grad_w, g.sum(0)


def _op(variant, threshold=0.0):
    if variant == "bnb":
        return lambda x, w, b: ops.switchback_bnb_matmul(x, w, b, threshold=threshold)
    if variant == "standard":
        return ops.standard_matmul
    return lambda x, w, b: ops.switchback_matmul(x, w, b, variant=variant)


def _data(seed=0, lead=(M,), dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, K)).astype(np.float32)
    x[..., 3] *= 8  # an outlier feature for the threshold tests
    w = (rng.standard_normal((N, K)) * 0.2).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    g = rng.standard_normal((*lead, N)).astype(np.float32)
    g[0] = 0  # an all-zero gradient row: scale 0, no NaN
    return [jnp.asarray(a).astype(dtype) for a in (x, w, b, g)]


VARIANTS = ["global", "vectorwise", "global_mem_efficient", "bnb", "standard"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_numpy_formulas_fp32(variant):
    x, w, b, g = _data()
    out, vjp = jax.vjp(_op(variant), x, w, b)
    got = (out, *vjp(g))
    want = numpy_reference(variant, *(np.asarray(a, np.float64) for a in (x, w, b, g)))
    for name, a, e in zip(("out", "grad_x", "grad_w", "grad_b"), got, want):
        assert a.dtype == jnp.float32 and not np.any(np.isnan(np.asarray(a))), name
        np.testing.assert_allclose(np.asarray(a), e, rtol=2e-5, atol=2e-5, err_msg=f"{variant} {name}")


@pytest.mark.parametrize("threshold", [2.0, 100.0])
def test_bnb_outlier_columns_go_through_float_weight(threshold):
    x, w, b, g = _data(seed=1)
    out, vjp = jax.vjp(_op("bnb", threshold), x, w, b)
    want = numpy_reference("bnb", *(np.asarray(a, np.float64) for a in (x, w, b, g)), threshold=threshold)
    for a, e in zip((out, *vjp(g)), want):
        np.testing.assert_allclose(np.asarray(a), e, rtol=2e-5, atol=2e-5)


def test_bnb_threshold_single_row_outlier():
    # One row: only the outlier element itself leaves the int8 path (docs/int8.md#quantization), through the float
    # weight.
    x, w, b, _ = _data(seed=2, lead=(1,))
    out = ops.switchback_bnb_matmul(x, w, b, threshold=4.0)
    want = numpy_reference("bnb", *(np.asarray(a, np.float64) for a in (x, w, b, jnp.ones((1, N)))), threshold=4.0)
    np.testing.assert_allclose(np.asarray(out), want[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_low_precision_dtypes_and_3d(variant, dtype):
    x, w, b, g = _data(lead=(2, 3), dtype=dtype)
    w32, b32 = w.astype(jnp.float32), b.astype(jnp.float32)  # float32 params with 16-bit activations
    out, vjp = jax.vjp(_op(variant), x, w32, b32)
    grad_x, grad_w, grad_b = vjp(g)
    assert out.dtype == dtype and out.shape == (2, 3, N)
    assert grad_x.dtype == dtype and grad_x.shape == x.shape
    assert grad_w.dtype == jnp.float32 and grad_b.dtype == jnp.float32
    want = numpy_reference(
        variant, *(np.asarray(a.astype(jnp.float32), np.float64).reshape(-1, a.shape[-1]) for a in (x, w, b, g))
    )
    tol = 2e-2 if dtype == jnp.bfloat16 else 4e-3
    for a, e in zip((out, grad_x, grad_w, grad_b), want):
        a = np.asarray(a.astype(jnp.float32)).reshape(e.shape)
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * np.max(np.abs(e)))


@pytest.mark.parametrize("variant", ["global", "vectorwise", "global_mem_efficient"])
def test_3d_equals_flattened_2d_under_jit(variant):
    x, w, b, _ = _data(lead=(2, 3))
    fn = jax.jit(_op(variant))
    np.testing.assert_array_equal(np.asarray(fn(x, w, b)).reshape(6, N), np.asarray(fn(x.reshape(6, K), w, b)))


def test_no_bias_has_same_gradients():
    x, w, b, g = _data()
    for variant in ["global", "vectorwise", "global_mem_efficient"]:
        out, vjp = jax.vjp(lambda x, w: ops.switchback_matmul(x, w, None, variant=variant), x, w)
        ref_out, ref_vjp = jax.vjp(_op(variant), x, w, b)
        np.testing.assert_allclose(np.asarray(out + b), np.asarray(ref_out), rtol=1e-6, atol=1e-6)
        for a, e in zip(vjp(g), ref_vjp(g)[:2]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize("variant,quantizer", [("global", quantize_global), ("vectorwise", quantize_rowwise)])
def test_prepared_equals_training_forward(variant, quantizer):
    x, w, b, _ = _data(lead=(2, 3), dtype=jnp.bfloat16)
    codes, scale = quantizer(w)
    prepared = ops.switchback_matmul_prepared(x, codes, scale, b, variant=variant)
    training = ops.switchback_matmul(x, w, b, variant=variant)
    assert prepared.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(prepared), np.asarray(training))


def test_standard_matmul_matches_plain_jax_autodiff():
    x, w, b, g = _data()
    out, vjp = jax.vjp(ops.standard_matmul, x, w, b)
    ref_out, ref_vjp = jax.vjp(lambda x, w, b: x @ w.T + b, x, w, b)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
    for a, e in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_dispatch_takes_xla_path_and_refuses_forced_kernel(monkeypatch):
    x, w, b, _ = _data()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no interpreter: a forced kernel needs a GPU
    ops.switchback_matmul(x, w, b, backend="xla")
    assert ops.last_path("switchback_matmul") == "xla"
    ops.switchback_bnb_matmul(x, w, b)
    assert ops.last_path("switchback_bnb_matmul") == "xla"
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="triton"):
            ops.switchback_matmul(x, w, b, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.switchback_matmul(x, w, b, backend="cuda")


def test_bad_inputs():
    x, w, b, _ = _data()
    with pytest.raises(ValueError, match="variant must be one of"):
        ops.switchback_matmul(x, w, b, variant="rowwise")
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.switchback_matmul(x.astype(jnp.int32), w, b)
    with pytest.raises(TypeError, match="weight must have dtype"):
        ops.switchback_bnb_matmul(x, w.astype(jnp.int8), b)
    with pytest.raises(ValueError, match="in_features"):
        ops.switchback_matmul(x, w.T, b)
    with pytest.raises(ValueError, match="in_features"):
        ops.standard_matmul(x[:, :5], w, b)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.switchback_matmul(x, w[None], b)
    with pytest.raises(ValueError, match=r"bias must have shape \(12,\)"):
        ops.switchback_matmul(x, w, b[:3])
    with pytest.raises(ValueError, match="threshold must be"):
        ops.switchback_bnb_matmul(x, w, b, threshold=-1.0)
    codes, scale = quantize_global(w)
    with pytest.raises(ValueError, match="variant must be one of"):
        ops.switchback_matmul_prepared(x, codes, scale, variant="global_mem_efficient")
    with pytest.raises(TypeError, match="w_codes must be a 2-D int8"):
        ops.switchback_matmul_prepared(x, w, scale)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(12,\)"):
        ops.switchback_matmul_prepared(x, codes, scale, variant="vectorwise")
    with pytest.raises(ValueError, match="in_features"):
        ops.switchback_matmul_prepared(x[:, :5], codes, scale)


def _residual_kinds(variant, x, w, b):
    """(shape, dtype name) of the arrays the backward pass keeps (the vjp closure's leaves)."""
    _, vjp = jax.vjp(_op(variant), x, w, b)
    return {(tuple(a.shape), jnp.dtype(a.dtype).name) for a in jax.tree.leaves(vjp)}


def test_mem_efficient_keeps_int8_activations_not_float():
    x, w, b, _ = _data(lead=(2, 3), dtype=jnp.bfloat16)
    saved = _residual_kinds("global_mem_efficient", x, w, b)
    assert ((6, K), "int8") in saved and ((N, K), "int8") in saved
    assert not any(shape in ((6, K), (2, 3, K)) and dtype != "int8" for shape, dtype in saved), saved
    assert ((6, K), "bfloat16") in _residual_kinds("global", x, w, b)  # the plain variant keeps float X
