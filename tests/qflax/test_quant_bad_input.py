"""Bad input to the quantizers: each error names the argument and what is allowed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import quant


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_and_bool_inputs_rejected(dtype):
    with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16"):
        quant.quantize_4bit(jnp.ones((64,), dtype))
    with pytest.raises(TypeError, match="x must have dtype"):
        quant.quantize_blockwise(jnp.ones((64,), dtype))
    with pytest.raises(TypeError, match="x must have dtype"):
        quant.int8_vectorwise_quant(jnp.ones((2, 64), dtype))


@pytest.mark.parametrize("blocksize", [16, 48, 100, 8192, 0, -64, True])
def test_unsupported_blocksize(blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64"):
        quant.quantize_4bit(jnp.ones((64,)), blocksize=blocksize)


@pytest.mark.parametrize("quant_type", ["int4", "NF4", "", None])
def test_unsupported_quant_type(quant_type):
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4'\)"):
        quant.quantize_4bit(jnp.ones((64,)), quant_type=quant_type)


def test_empty_input():
    with pytest.raises(ValueError, match="x must not be empty"):
        quant.quantize_4bit(jnp.zeros((0, 64)))
    with pytest.raises(ValueError, match="x must not be empty"):
        quant.quantize_blockwise(jnp.zeros((0,)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("nested", [False, True])
def test_non_finite_block_decodes_to_nan_eager_and_jit(bad, nested):
    """README rule: a non-finite value poisons its unit (NaN), never raises, eager == jit."""
    x = jax.random.normal(jax.random.key(0), (512,), jnp.float32)
    poisoned = x.at[70].set(bad)
    eager = quant.quantize_4bit(poisoned, 64, compress_statistics=nested)
    jitted = jax.jit(lambda v: quant.quantize_4bit(v, 64, compress_statistics=nested))(poisoned)
    restored = np.asarray(quant.dequantize_4bit(eager))
    np.testing.assert_array_equal(restored, np.asarray(quant.dequantize_4bit(jitted)))
    # Without double quantization only block 1 is NaN; with it, the whole group of 256 blocks.
    bad_part = slice(64, 128) if not nested else slice(0, 512)
    assert np.isnan(restored[bad_part]).all()
    if not nested:
        other = np.r_[0:64, 128:512]
        clean = quant.dequantize_4bit(quant.quantize_4bit(x, 64))
        np.testing.assert_array_equal(restored[other], np.asarray(clean)[other])
    blockwise = quant.quantize_blockwise(poisoned, blocksize=64)
    decoded = np.asarray(quant.dequantize_blockwise(blockwise))
    assert np.isnan(decoded[64:128]).all() and np.isfinite(decoded[np.r_[0:64, 128:512]]).all()


def test_negative_threshold_rejected():
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        quant.int8_vectorwise_quant(jnp.ones((2, 4)), threshold=-1.0)


def test_blockwise_code_shape_checked():
    with pytest.raises(ValueError, match=r"code must have shape \(256,\)"):
        quant.quantize_blockwise(jnp.ones((64,)), code=jnp.zeros((16,)), blocksize=64)
