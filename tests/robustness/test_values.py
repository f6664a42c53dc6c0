"""NaN/Inf and extreme values: one rule, the same eagerly and under jit, checked against numpy references.

Rule (README "Robustness rules"): a non-finite element gives its unit (block, row, column,
tensor) a NaN scale and the code of zero; every other unit is what it is without the bad value.
Scaling is exact up to float32's maximum: power-of-two scaling of the input (exact) scales the
statistics by the same power and leaves every code unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflax import ops, quant

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
ROWS, COLS = 4, 64

# name -> (function of a (4, 64) array returning (codes, scales), axis of x a scale unit spans, zero code)
QUANTIZERS = {
    "quantize_4bit nf4": (lambda x: _fourbit(x, "nf4", False), "row", 7),
    "quantize_4bit fp4": (lambda x: _fourbit(x, "fp4", False), "row", 0),
    "quantize_blockwise": (lambda x: _blockwise(x), "row", 0),
    "int8_vectorwise_quant": (lambda x: quant.int8_vectorwise_quant(x)[:2], "row", 0),
    "int8_vectorwise_quant threshold": (lambda x: quant.int8_vectorwise_quant(x, 1e30)[:2], "row", 0),
    "int8_columnwise_quant": (lambda x: quant.int8_columnwise_quant(x), "col", 0),
    "quantize_rowwise": (lambda x: quant.quantize_rowwise(x), "row", 0),
    "quantize_columnwise_and_transpose": (lambda x: _untranspose(quant.quantize_columnwise_and_transpose(x)), "col", 0),
    "quantize_global": (lambda x: quant.quantize_global(x), "all", 0),
    "quantize_global_transpose": (lambda x: _untranspose(quant.quantize_global_transpose(x)), "all", 0),
    "quantize_rows": (lambda x: (quant.quantize_rows(x).codes, quant.quantize_rows(x).scale), "row", 0),
}


def _fourbit(x, quant_type, nested):
    q = quant.quantize_4bit(x, 64, quant_type, compress_statistics=nested)  # one block per row of 64
    return quant.unpack_codes(q).reshape(x.shape), quant.dequantize_absmax(q)


def _blockwise(x):
    q = quant.quantize_blockwise(x, blocksize=64)
    return q.codes.reshape(x.shape), q.absmax


def _untranspose(pair):
    return pair[0].T, pair[1]


def _data(dtype, seed=0):
    return jax.random.normal(jax.random.key(seed), (ROWS, COLS), jnp.float32).astype(dtype)


def _units(axis, row, col):
    """Boolean (4, 64) mask of the unit holding (row, col)."""
    mask = np.zeros((ROWS, COLS), bool)
    if axis == "row":
        mask[row] = True
    elif axis == "col":
        mask[:, col] = True
    else:
        mask[:] = True
    return mask


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_non_finite_poisons_its_unit_only_eager_equals_jit(name, bad, dtype):
    fn, axis, zero_code = QUANTIZERS[name]
    clean = _data(dtype)
    x = clean.at[1, 5].set(bad)
    eager = fn(x)
    jitted = jax.jit(fn)(x)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaNs in the same places
    codes, scales = (np.asarray(v) for v in eager)
    if name == "int8_vectorwise_quant threshold" and np.isinf(bad):
        # LLM.int8's documented exception: +-Inf is an outlier (|x| >= threshold) for the float path.
        _, _, mask = quant.int8_vectorwise_quant(x, 1e30)
        assert np.asarray(mask)[5] and np.asarray(mask).sum() == 1 and np.isfinite(scales).all()
        assert (codes[:, 5] == 0).all()
        return
    unit = _units(axis, 1, 5)
    assert (codes[unit] == zero_code).all()
    assert np.isnan(scales).sum() == (1 if axis != "all" else scales.size)
    if axis == "all":
        return
    # Every other unit equals the quantization of the clean data (units are independent).
    clean_codes = np.asarray(fn(clean)[0])
    np.testing.assert_array_equal(codes[~unit], clean_codes[~unit])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_non_finite_under_jit_reaches_the_dequantized_values(bad, dtype):
    """The user's case: under jit a float16/bfloat16 NaN must not vanish (XLA's max may drop it)."""
    x = _data(dtype).at[2, 7].set(bad)
    for nested in (False, True):
        q = jax.jit(lambda v: quant.quantize_4bit(v, 64, "nf4", compress_statistics=nested))(x)
        decoded = np.asarray(quant.dequantize_4bit(q), np.float32)
        assert np.isnan(decoded[2]).all()
        if not nested:
            assert np.isfinite(np.delete(decoded, 2, axis=0)).all()


def test_matmul_ops_propagate_non_finite_rows_like_float():
    w = jax.random.normal(jax.random.key(1), (8, COLS), jnp.float32)
    x = _data(jnp.float32).at[1, 3].set(jnp.inf)
    outs = {
        "matmul_4bit": ops.matmul_4bit(x, quant.quantize_4bit(w)),
        "matmul_8bit": ops.matmul_8bit(x, quant.quantize_rows(w)),
        "matmul_8bit_trainable": ops.matmul_8bit_trainable(x, w),
        "switchback global": ops.switchback_matmul(x, w),
        "switchback vectorwise": ops.switchback_matmul(x, w, variant="vectorwise"),
        "switchback_bnb_matmul": ops.switchback_bnb_matmul(x, w),
    }
    for name, out in outs.items():
        out = np.asarray(out)
        assert not np.isfinite(out[1]).any(), name
        assert np.isfinite(np.delete(out, 1, axis=0)).all(), name
    # A weight row with Inf makes its output channel non-finite, and only that channel.
    out = np.asarray(ops.matmul_8bit(_data(jnp.float32), quant.quantize_rows(w.at[2, 0].set(jnp.inf))))
    assert np.isnan(out[:, 2]).all() and np.isfinite(np.delete(out, 2, axis=1)).all()


@given(exponent=st.integers(min_value=-117, max_value=125), name=st.sampled_from(sorted(QUANTIZERS)))
def test_power_of_two_scaling_is_exact_up_to_float32_limits(exponent, name):
    """Codes of x * 2**e equal the codes of x, and scales scale by 2**e (no flush to zero, no overflow)."""
    fn, _, _ = QUANTIZERS[name]
    base = np.asarray(_data(jnp.float32, seed=2))
    base = np.where(np.abs(base) < 2.0**-7, 2.0**-7, base).astype(np.float32)  # keeps x * 2**e normal
    scaled = (base * np.float32(2.0) ** exponent).astype(np.float32)
    codes, scales = (np.asarray(v) for v in fn(jnp.asarray(scaled)))
    ref_codes, ref_scales = (np.asarray(v) for v in fn(jnp.asarray(base)))
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales, (ref_scales * np.float32(2.0) ** exponent).astype(np.float32))


@pytest.mark.parametrize("value", [np.float32(3.4e38), np.float32(8.6e37), np.float32(1.2e-38)])
def test_extreme_blocks_decode_to_themselves(value):
    x = jnp.full((64,), value, jnp.float32).at[1].set(-value)
    for nested in (False, True):
        decoded = np.asarray(quant.dequantize_4bit(quant.quantize_4bit(x, 64, "nf4", compress_statistics=nested)))
        np.testing.assert_allclose(decoded, np.asarray(x), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(quant.dequantize_blockwise(quant.quantize_blockwise(x, blocksize=64))),
                               np.asarray(x), rtol=1e-2)
    rows = quant.quantize_rows(x.reshape(1, -1))
    np.testing.assert_array_equal(np.asarray(quant.int8_vectorwise_dequant(rows.codes, rows.scale)).reshape(-1),
                                  np.asarray(x))


@given(row_exp=st.integers(-120, 120), col_exp=st.integers(-120, 120))
def test_int8_epilogue_matches_float64(row_exp, col_exp):
    """acc * row * col / 127**2 never over- or underflows in between when the result is representable."""
    acc = jnp.asarray([[16129, -5000], [1, 0]], jnp.int32)
    row = np.float32([2.0**row_exp, 3.0 * 2.0**row_exp])
    col = np.float32([2.0**col_exp, 0.7 * 2.0**col_exp])
    got = np.asarray(quant.int8_mm_dequant(acc, jnp.asarray(row), jnp.asarray(col)))
    want = np.asarray(acc, np.float64) * row.astype(np.float64)[:, None] * col.astype(np.float64)[None, :] / 16129
    representable = (np.abs(want) < 3.0e38) & ((np.abs(want) > 2.0**-120) | (want == 0))
    np.testing.assert_allclose(got[representable], want[representable], rtol=1e-6)
