"""LLM.int8 primitives and 8-bit blockwise quantization against bitsandbytes 0.49.2 (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import quant
from qflax.quant import codebooks
from tests.qflax.bnb_oracle import bnb_functional as F, torch, torch_to_jax


@pytest.mark.parametrize("threshold", [0.0, 1.5, 3.0])
@pytest.mark.parametrize("shape", [(16, 64), (1, 33), (5, 128)])
def test_int8_vectorwise_quant_matches_bitsandbytes(threshold, shape):
    torch.manual_seed(0)
    a = (torch.randn(*shape) * 1.2).half()
    codes_bnb, stats_bnb, cols_bnb = F.int8_vectorwise_quant(a, threshold=threshold)
    codes, stats, mask = quant.int8_vectorwise_quant(torch_to_jax(a), threshold=threshold)
    np.testing.assert_array_equal(np.asarray(codes), codes_bnb.numpy())
    np.testing.assert_array_equal(np.asarray(stats), stats_bnb.numpy())
    expected_cols = np.array([], np.int64) if cols_bnb is None else cols_bnb.numpy()
    np.testing.assert_array_equal(quant.outlier_columns(mask), expected_cols)


def test_outlier_columns_hand_computed():
    x = jnp.array([[0.1, 7.0, 0.2, -0.3], [0.4, 0.5, -6.0, 0.6]], jnp.float16)
    codes, stats, mask = quant.int8_vectorwise_quant(x, threshold=6.0)
    np.testing.assert_array_equal(quant.outlier_columns(mask), [1, 2])
    np.testing.assert_array_equal(np.asarray(codes)[:, 1:3], 0)  # whole outlier columns zeroed (rows > 1)
    # Outlier elements (not whole columns) are left out of the row absmax.
    np.testing.assert_allclose(np.asarray(stats), [0.3, 0.6], rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(codes)[0], [np.round(0.1 / 0.3 * 127), 0, 0, -127])


def test_round_half_to_even_and_zero_rows():
    x = jnp.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5], [0, 0, 0, 0, 0, 0]], jnp.float32)
    codes, stats, _ = quant.int8_vectorwise_quant(x)
    np.testing.assert_array_equal(np.asarray(codes), [[127, 0, 2, 2, 0, -2], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(stats), [127.0, 0.0])


def test_int8_matmul_and_dequant_match_independent_math():
    rng = np.random.default_rng(0)
    a = rng.integers(-127, 128, (5, 70)).astype(np.int8)
    b = rng.integers(-127, 128, (9, 70)).astype(np.int8)
    acc = quant.int8_linear_matmul(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_array_equal(np.asarray(acc), a.astype(np.int64) @ b.T.astype(np.int64))
    row, col, bias = rng.random(5).astype(np.float32), rng.random(9).astype(np.float32), rng.random(9).astype(np.float32)
    out = quant.int8_mm_dequant(acc, jnp.asarray(row), jnp.asarray(col), jnp.asarray(bias))
    expected = (a.astype(np.float64) @ b.T) * row[:, None] * col[None, :] / 127**2 + bias
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)
    # bitsandbytes' own (fp32 matmul + 6.200124e-05 literal) agrees within its constant's 2e-5 error.
    theirs = F.int8_mm_dequant(torch.from_numpy(np.array(acc)), torch.from_numpy(row), torch.from_numpy(col))
    np.testing.assert_allclose(theirs.float().numpy(), expected - bias, rtol=2e-3, atol=1e-3)


def test_int8_vectorwise_dequant_matches_bitsandbytes():
    torch.manual_seed(1)
    a = torch.randn(6, 40).half()
    codes, stats, _ = F.int8_vectorwise_quant(a)
    theirs = F.int8_vectorwise_dequant(codes, stats).numpy()
    ours = np.asarray(quant.int8_vectorwise_dequant(jnp.asarray(codes.numpy()), jnp.asarray(stats.numpy())))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_columnwise_quant_hand_computed():
    x = jnp.array([[1.0, -4.0], [-2.0, 2.0], [0.5, 0.0]], jnp.float32)
    codes, col_stats = quant.int8_columnwise_quant(x)
    np.testing.assert_array_equal(np.asarray(col_stats), [2.0, 4.0])
    np.testing.assert_array_equal(np.asarray(codes), [[64, -127], [-127, 64], [32, 0]])


def test_dynamic_map_matches_bitsandbytes():
    np.testing.assert_array_equal(codebooks.DYNAMIC_MAP, F.create_dynamic_map().numpy())
    np.testing.assert_array_equal(codebooks.NF4_TABLE, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(codebooks.FP4_TABLE, F.get_4bit_type("fp4", device="cpu").numpy())


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise_float32_matches_bitsandbytes(blocksize):
    torch.manual_seed(blocksize)
    a = torch.randn(3, 3000)
    codes_bnb, state = F.quantize_blockwise(a, blocksize=blocksize)
    # bitsandbytes' CPU routine first writes -1.0 into entry 0 of the map (docs/blockwise.md#dynamic-map); given
    # that same map, every code matches.
    cpu_map = jnp.asarray(codebooks.DYNAMIC_MAP).at[0].set(-1.0)
    q = quant.quantize_blockwise(torch_to_jax(a), code=cpu_map, blocksize=blocksize)
    np.testing.assert_array_equal(np.asarray(q.codes), codes_bnb.numpy())
    # With our (CUDA) map, only values in the sliver between the two first midpoints move.
    default = np.asarray(quant.quantize_blockwise(torch_to_jax(a), blocksize=blocksize).codes)
    moved = default != codes_bnb.numpy()
    assert set(default[moved]) <= {0} and set(codes_bnb.numpy()[moved]) <= {1} and moved.mean() < 1e-3
    np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
    restored = np.asarray(quant.dequantize_blockwise(q))
    np.testing.assert_allclose(restored, F.dequantize_blockwise(codes_bnb, state).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_blockwise_half_precision_round_trip(dtype):
    x = jax.random.normal(jax.random.key(3), (2, 1000), jnp.float32).astype(dtype)
    q = quant.quantize_blockwise(x, blocksize=256)
    restored = quant.dequantize_blockwise(q)
    assert restored.dtype == dtype and restored.shape == x.shape
    err = np.abs(np.asarray(restored, np.float32) - np.asarray(x, np.float32))
    assert err.max() <= 0.02 * np.abs(np.asarray(x, np.float32)).max()
