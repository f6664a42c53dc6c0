"""qflax.quant.switchback quantizers vs hand-computed codes (docs/switchback.md; zero rows: scale 0, codes 0)."""

import jax.numpy as jnp
import numpy as np
import pytest

from qflax.quant.switchback import (
    dequantize_rowwise,
    quantize_columnwise_and_transpose,
    quantize_global,
    quantize_global_transpose,
    quantize_rowwise,
)

# Row absmax 127 makes the scale exactly 1, so the codes are the values rounded half to even:
# 63.5 -> 64, -0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2, 3.5 -> 4.
HALVES = [127.0, 63.5, -0.5, 1.5, 2.5, -2.5, 3.5]
HALVES_CODES = [127, 64, 0, 2, 2, -2, 4]
# Absmax 2: scale 63.5, so 1 -> 63.5 -> 64 (even), -0.5 -> -31.75 -> -32, 0.25 -> 15.875 -> 16.
SCALED = [2.0, 1.0, -0.5, 0.25, 0.0, -2.0, 0.0]
SCALED_CODES = [127, 64, -32, 16, 0, -127, 0]
ZEROS = [0.0] * 7


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_quantize_rowwise_hand_computed(dtype):
    x = jnp.asarray([HALVES, SCALED, ZEROS], dtype)
    codes, absmax = quantize_rowwise(x)
    assert codes.dtype == jnp.int8 and absmax.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(codes), [HALVES_CODES, SCALED_CODES, [0] * 7])
    np.testing.assert_array_equal(np.asarray(absmax), [127.0, 2.0, 0.0])


def test_quantize_columnwise_and_transpose_hand_computed():
    x = jnp.asarray([HALVES, SCALED, ZEROS], jnp.float32).T  # (7, 3): the rows above are now columns
    codes, absmax = quantize_columnwise_and_transpose(x)
    assert codes.shape == (3, 7)
    np.testing.assert_array_equal(np.asarray(codes), [HALVES_CODES, SCALED_CODES, [0] * 7])
    np.testing.assert_array_equal(np.asarray(absmax), [127.0, 2.0, 0.0])


def test_quantize_global_uses_one_absmax():
    # Global absmax 127 (from the first row): scale 1, so the second row rounds as plain values.
    x = jnp.asarray([HALVES, SCALED], jnp.float32)
    codes, absmax = quantize_global(x)
    np.testing.assert_array_equal(np.asarray(absmax), [127.0])
    np.testing.assert_array_equal(np.asarray(codes), [HALVES_CODES, [2, 1, 0, 0, 0, -2, 0]])
    codes_t, absmax_t = quantize_global_transpose(x)
    np.testing.assert_array_equal(np.asarray(codes_t), np.asarray(codes).T)
    np.testing.assert_array_equal(np.asarray(absmax_t), [127.0])


def test_quantize_global_non_unit_scale():
    x = jnp.asarray([[0.5, -0.25], [0.125, 0.0]], jnp.float32)  # absmax 0.5: scale 254
    codes, absmax = quantize_global(x)
    np.testing.assert_array_equal(np.asarray(codes), [[127, -64], [32, 0]])  # -63.5 -> -64, 31.75 -> 32
    np.testing.assert_array_equal(np.asarray(absmax), [0.5])


@pytest.mark.parametrize(
    "quantizer", [quantize_rowwise, quantize_columnwise_and_transpose, quantize_global, quantize_global_transpose]
)
def test_all_zero_input_gives_zero_scale_and_codes(quantizer):
    codes, absmax = quantizer(jnp.zeros((3, 4), jnp.float16))
    assert not np.any(np.isnan(np.asarray(absmax)))
    np.testing.assert_array_equal(np.asarray(absmax), 0)
    np.testing.assert_array_equal(np.asarray(codes), 0)


def test_dequantize_rowwise_hand_computed_and_zero_row():
    codes = jnp.asarray([[127, -64, 0], [5, 5, 5]], jnp.int8)
    out = dequantize_rowwise(codes, jnp.asarray([2.0, 0.0], jnp.float32))
    np.testing.assert_allclose(np.asarray(out), [[2.0, -128 / 127, 0.0], [0.0, 0.0, 0.0]], rtol=1e-6)


def test_round_trip_error_at_most_half_a_step():
    x = np.random.default_rng(0).standard_normal((16, 33)).astype(np.float32)
    codes, absmax = quantize_rowwise(jnp.asarray(x))
    err = np.abs(np.asarray(dequantize_rowwise(codes, absmax)) - x)
    assert np.all(err <= np.asarray(absmax)[:, None] / 254 * (1 + 1e-5))


@pytest.mark.parametrize("quantizer", [quantize_rowwise, quantize_columnwise_and_transpose, quantize_global_transpose])
def test_bad_inputs(quantizer):
    with pytest.raises(TypeError, match="x must have dtype"):
        quantizer(jnp.ones((2, 2), jnp.int32))
    with pytest.raises(ValueError, match="x must be 2-D"):
        quantizer(jnp.ones((2, 2, 2), jnp.float32))
