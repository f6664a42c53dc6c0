"""4-bit quantization: error bounds, properties (hypothesis), jit equivalence, odd counts, zero blocks."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qflax import quant
from qflax.quant import codebooks
from tests.qflax import cuda_rules
from tests.pairwise import pairwise

# bitsandbytes' own test thresholds (tests/test_functional.py at 0.49.2) for randn(1024, 1024).
NF4_MAE = {32: 0.067745, 64: 0.072792, 128: 0.076835, 256: 0.080326, 4096: 0.092537}
FP4_MAE = {32: 0.088918, 64: 0.096545, 128: 0.102947, 4096: 0.129573}


def _randn(shape, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _mae(quant_type, blocksize, nested=False):
    x = _randn((1024, 1024))
    q = quant.quantize_4bit(x, blocksize, quant_type, compress_statistics=nested)
    return float(jnp.mean(jnp.abs(quant.dequantize_4bit(q) - x)))


@pytest.mark.parametrize("blocksize", sorted(NF4_MAE))
def test_nf4_error_within_bitsandbytes_threshold(blocksize):
    assert _mae("nf4", blocksize) < NF4_MAE[blocksize] + 1e-3


@pytest.mark.parametrize("blocksize", sorted(FP4_MAE))
def test_fp4_error_within_bitsandbytes_threshold(blocksize):
    assert _mae("fp4", blocksize) < FP4_MAE[blocksize] + 1e-3


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_double_quantization_costs_under_one_percent(quant_type, blocksize):
    plain, nested = _mae(quant_type, blocksize), _mae(quant_type, blocksize, nested=True)
    assert abs(nested - plain) <= 0.01 * plain


@given(st.lists(st.integers(0, 15), min_size=2, max_size=200).filter(lambda v: len(v) % 2 == 0))
@settings(max_examples=30, deadline=None)
def test_pack_unpack_are_inverse(codes):
    codes = np.array(codes, np.uint8)
    packed = quant.pack_nibbles(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(packed).reshape(-1, 1), cuda_rules.pack(codes))
    np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(packed)), codes)


def _max_half_gap(table):
    return float(np.max(np.diff(np.sort(table))) / 2)


@given(
    x=hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e4, 1e4, width=32)),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    blocksize=st.sampled_from([32, 64, 128]),
)
@settings(max_examples=25, deadline=None)
def test_round_trip_error_bounded_by_half_the_widest_gap(x, quant_type, blocksize):
    q = quant.quantize_4bit(jnp.asarray(x), blocksize, quant_type)
    restored = np.asarray(quant.dequantize_4bit(q))
    absmax = np.repeat(np.asarray(q.absmax), blocksize)[: x.size]
    bound = absmax * _max_half_gap(codebooks.table_4bit(quant_type)) * (1 + 1e-6) + 1e-30
    assert np.all(np.abs(restored - x) <= bound)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_all_zero_blocks_give_zeros_never_nan(quant_type, nested):
    x = jnp.zeros((4, 64), jnp.float16).at[0, :3].set(jnp.array([1, -2, 3], jnp.float16))
    q = quant.quantize_4bit(x, 64, quant_type, compress_statistics=nested)
    restored = np.asarray(quant.dequantize_4bit(q).astype(jnp.float32))
    assert not np.isnan(restored).any()
    np.testing.assert_array_equal(restored[1:], 0)
    # The code of 0.0 (NF4 7, FP4 0), so the block stays zero even with double quantization.
    zero_code = 7 if quant_type == "nf4" else 0
    assert np.all(np.asarray(quant.unpack_codes(q)).reshape(4, 64)[1:] == zero_code)


# Pairwise (6 of 12 cases): each one compiles the quantizer twice.
@pytest.mark.parametrize(
    "quant_type,nested,dtype", pairwise(["nf4", "fp4"], [False, True], [jnp.float32, jnp.float16, jnp.bfloat16])
)
def test_identical_under_jit(quant_type, nested, dtype):
    x = _randn((37, 96), dtype, seed=2)
    eager = quant.quantize_4bit(x, 64, quant_type, compress_statistics=nested)
    jitted = jax.jit(lambda v: quant.quantize_4bit(v, 64, quant_type, compress_statistics=nested))(x)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize_4bit(eager)), np.asarray(jax.jit(quant.dequantize_4bit)(jitted))
    )


@pytest.mark.parametrize("quant_type,pad_code", [("nf4", 7), ("fp4", 0)])
def test_odd_element_count_is_padded_with_the_code_of_zero(quant_type, pad_code):
    x = _randn((3, 11), seed=4)  # 33 elements
    q = quant.quantize_4bit(x, 32, quant_type)
    assert q.packed.shape == (17, 1) and q.absmax.shape == (2,)
    assert int(np.asarray(q.packed)[-1, 0]) & 0x0F == pad_code
    ref_codes, _ = cuda_rules.quantize(np.asarray(x), 32, quant_type)
    np.testing.assert_array_equal(np.asarray(q.packed), cuda_rules.pack(ref_codes))
    assert quant.dequantize_4bit(q).shape == (3, 11)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_dequantize_restores_shape_and_dtype(dtype):
    x = _randn((2, 3, 64), dtype)
    restored = quant.dequantize_4bit(quant.quantize_4bit(x, compress_statistics=True))
    assert restored.shape == x.shape and restored.dtype == x.dtype


def test_nested_statistics_layout():
    q = quant.quantize_4bit(_randn((300, 256)), 64, "nf4", compress_statistics=True)
    assert q.absmax.dtype == jnp.uint8 and q.absmax.shape == (1200,)
    assert q.nested_absmax.dtype == jnp.float32 and q.nested_absmax.shape == (5,)
    assert q.nested_quant_map.shape == (256,) and q.nested_offset.shape == ()
    np.testing.assert_allclose(
        np.asarray(quant.dequantize_absmax(q)),
        np.abs(np.asarray(_randn((300, 256)))).reshape(-1, 64).max(1),
        rtol=0.02,
    )
