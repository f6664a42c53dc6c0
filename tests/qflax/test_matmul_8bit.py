"""LLM.int8 ops: quantization vs bitsandbytes 0.49.2, forward vs an int64 numpy reference, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bitsandbytes.functional as bnb_f
from qflax import ops, quant
from qflax.quant.int8 import Int8Rows


def _planted_fp16(rows=12, cols=96, seed=0):
    """fp16 activations with outliers, including an outlier column whose other values are the row max."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float16)
    x[2, 5] = 9.0
    x[7, 40] = -7.5
    x[1, 5] = 5.5  # not an outlier itself, but the largest of row 1: must still count in its absmax
    x[3, 77] = 6.0  # exactly at the threshold: an outlier (|x| >= threshold)
    return x


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("rows", [1, 12])
def test_activation_codes_equal_bitsandbytes(threshold, rows):
    x = _planted_fp16()[:rows] if rows > 1 else _planted_fp16()[2:3]
    ca, row_stats, outlier_cols = bnb_f.int8_vectorwise_quant(torch.from_numpy(x.copy()), threshold=threshold)
    codes, stats, mask = quant.int8_vectorwise_quant(jnp.asarray(x), threshold)
    np.testing.assert_array_equal(np.asarray(codes), ca.numpy())
    np.testing.assert_array_equal(np.asarray(stats), row_stats.numpy())
    expected_cols = np.zeros(0, np.int64) if outlier_cols is None else outlier_cols.numpy()
    np.testing.assert_array_equal(quant.outlier_columns(mask), expected_cols)


def test_outlier_columns_follow_spec():
    x = _planted_fp16()
    _, _, mask = quant.int8_vectorwise_quant(jnp.asarray(x), 6.0)
    # docs/int8.md#quantization: sorted columns holding any |x| >= threshold; 6.0 itself counts.
    independent = sorted({c for r, c in zip(*np.nonzero(np.abs(x.astype(np.float32)) >= 6.0))})
    assert quant.outlier_columns(mask).tolist() == independent == [5, 40, 77]
    codes, _, _ = quant.int8_vectorwise_quant(jnp.asarray(x), 6.0)
    assert not np.any(np.asarray(codes)[:, [5, 40, 77]])


def _reference_forward(x, w_float, bias, threshold):
    """int64 numpy LLM.int8 from bitsandbytes' own quantizer (CPU), the outlier part in float64."""
    ca, sca, cols = bnb_f.int8_vectorwise_quant(torch.from_numpy(x.astype(np.float16)), threshold=threshold)
    cb, scb, _ = bnb_f.int8_vectorwise_quant(torch.from_numpy(w_float.astype(np.float16)))
    ca, sca, cb, scb = (t.numpy().astype(np.float64) for t in (ca, sca, cb, scb))
    out = (ca @ cb.T) * sca[:, None] * scb[None, :] / 127.0**2 + bias
    if cols is not None and len(cols):
        w_deq = cb * scb[:, None] / 127.0
        out += x.astype(np.float64)[:, cols.numpy()] @ w_deq[:, cols.numpy()].T
    return out


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_forward_equals_int8_reference(threshold):
    rng = np.random.default_rng(1)
    x = _planted_fp16(seed=1).astype(np.float32)  # fp16-representable values, computed in float32
    w = rng.standard_normal((40, 96)).astype(np.float16).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    q = quant.quantize_rows(jnp.asarray(w))
    y = ops.matmul_8bit(jnp.asarray(x), q, jnp.asarray(bias), threshold=threshold)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), _reference_forward(x, w, bias, threshold), rtol=1e-5, atol=1e-5)
    assert ops.last_path("matmul_8bit") == "xla"


def test_outlier_decomposition_reduces_error():
    x = _planted_fp16(seed=2).astype(np.float32)
    x[:, 11] *= 40.0  # a whole outlier feature, as in LLMs
    w = np.random.default_rng(2).standard_normal((32, 96)).astype(np.float32)
    q = quant.quantize_rows(jnp.asarray(w))
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    err0 = np.abs(np.asarray(ops.matmul_8bit(jnp.asarray(x), q)) - exact).mean()
    err6 = np.abs(np.asarray(ops.matmul_8bit(jnp.asarray(x), q, threshold=6.0)) - exact).mean()
    # The outlier columns still meet the int8-dequantized weight (as bitsandbytes), so the
    # weight's rounding error remains; the activation quantization error of the rest is gone.
    assert err6 < err0 / 2


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_output_dtype_and_leading_dims(dtype):
    x = jax.random.normal(jax.random.key(0), (2, 3, 16), dtype)
    q = quant.quantize_rows(jax.random.normal(jax.random.key(1), (8, 16)))
    y = jax.jit(lambda x: ops.matmul_8bit(x, q, threshold=6.0))(x)
    assert y.shape == (2, 3, 8) and y.dtype == dtype
    flat = ops.matmul_8bit(x.reshape(6, 16), q, threshold=6.0)
    np.testing.assert_array_equal(np.asarray(y.reshape(6, 8)), np.asarray(flat))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_input_and_bias_gradients_use_dequantized_weight(threshold, dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(_planted_fp16(seed=3)).astype(dtype)
    q = quant.quantize_rows(jnp.asarray(rng.standard_normal((20, 96)), jnp.float32))
    bias = jnp.asarray(rng.standard_normal(20), jnp.float32)
    proj = rng.standard_normal((12, 20)).astype(np.float32)

    def loss(x, bias):
        return jnp.sum(ops.matmul_8bit(x, q, bias, threshold=threshold).astype(jnp.float32) * proj)

    gx, gb = jax.grad(loss, argnums=(0, 1))(x, bias)
    w_deq = np.asarray(q.codes, np.float64) * np.asarray(q.scale, np.float64)[:, None] / 127.0
    assert gx.dtype == dtype and gb.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(gx, np.float64), proj.astype(np.float64) @ w_deq, rtol=tol, atol=tol)
    # The output cotangent arrives in the output dtype (x's), so the bias sums proj rounded to it.
    proj_in_out_dtype = np.asarray(jnp.asarray(proj).astype(dtype), np.float64)
    np.testing.assert_allclose(np.asarray(gb), proj_in_out_dtype.sum(0), rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_trainable_weight_gradient_is_exact_gt_x(threshold, dtype):
    rng = np.random.default_rng(4)
    x = jnp.asarray(_planted_fp16(seed=4)).astype(dtype)
    weight = jnp.asarray(rng.standard_normal((16, 96)) * 0.1, dtype)
    proj = jnp.asarray(rng.standard_normal((12, 16)), jnp.float32)  # non-uniform output gradient

    def loss(weight):
        return jnp.sum(ops.matmul_8bit_trainable(x, weight, threshold=threshold).astype(jnp.float32) * proj)

    gw = jax.jit(jax.grad(loss))(weight)
    assert gw.dtype == dtype
    exact = np.asarray(proj, np.float64).T @ np.asarray(x, np.float64)
    rel = np.linalg.norm(np.asarray(gw, np.float64) - exact) / np.linalg.norm(exact)
    assert rel < 0.01


def test_trainable_forward_equals_frozen_forward():
    x = jax.random.normal(jax.random.key(5), (5, 32))
    weight = jax.random.normal(jax.random.key(6), (12, 32))
    frozen = ops.matmul_8bit(x, quant.quantize_rows(weight), threshold=1.5)
    np.testing.assert_array_equal(np.asarray(ops.matmul_8bit_trainable(x, weight, threshold=1.5)), np.asarray(frozen))


def test_bad_inputs_raise_clear_errors(monkeypatch):
    q = quant.quantize_rows(jnp.ones((4, 8)))
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="threshold must be"):
        ops.matmul_8bit(x, q, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold must be"):
        ops.matmul_8bit_trainable(x, jnp.ones((4, 8)), threshold=-0.5)
    with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16, got int32"):
        ops.matmul_8bit(jnp.ones((2, 8), jnp.int32), q)
    with pytest.raises(TypeError, match="weight must have dtype"):
        ops.matmul_8bit_trainable(x, jnp.ones((4, 8), jnp.int8))
    with pytest.raises(ValueError, match=r"w.scale \(SCB\) must be float32 of shape \(4,\)"):
        ops.matmul_8bit(x, Int8Rows(codes=q.codes, scale=jnp.ones(3, jnp.float32)))
    with pytest.raises(ValueError, match="in_features"):
        ops.matmul_8bit(jnp.ones((2, 7)), q)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        ops.matmul_8bit(x, q, jnp.ones(5))
    with pytest.raises(TypeError, match="w must be an Int8Rows"):
        ops.matmul_8bit(x, jnp.ones((4, 8), jnp.int8))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.matmul_8bit(x, q, backend="cuda")
    if jax.default_backend() != "gpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no GPU, no interpreter: no kernel runtime
        with pytest.raises(RuntimeError, match="needs a GPU"):
            ops.matmul_8bit(x, q, backend="triton")
