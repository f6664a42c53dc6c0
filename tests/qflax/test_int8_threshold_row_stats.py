"""int8_vectorwise_quant with a threshold vs bitsandbytes 0.49.2 (docs/int8.md#quantization): the row absmax
leaves out only the outlier elements, not the whole outlier columns."""

import bitsandbytes.functional as F
import pytest
import jax.numpy as jnp
import numpy as np
import torch

from qflax.quant.int8 import int8_vectorwise_quant


def test_hand_computed_outlier_column_still_counts_in_row_absmax():
    x = np.asarray([[1.0, 3.0, 0.5], [0.2, 0.9, 0.1]], np.float32)
    codes, row_stats, mask = int8_vectorwise_quant(jnp.asarray(x), threshold=2.0)
    # Row 1: the 3.0 is an outlier (absmax 1.0); row 2 keeps 0.9 of the outlier column in its absmax.
    np.testing.assert_allclose(np.asarray(row_stats), [1.0, 0.9], rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(codes), [[127, 0, 64], [28, 0, 14]])  # 0.2*127/0.9=28.2, 0.1->14.1
    np.testing.assert_array_equal(np.asarray(mask), [False, True, False])


@pytest.mark.parametrize("rows", [1, 13])
def test_matches_bitsandbytes_cpu(rows):
    x = (torch.randn(rows, 83, generator=torch.Generator().manual_seed(rows)) * 2).half()
    want_codes, want_stats, want_cols = F.int8_vectorwise_quant(x, threshold=2.5)
    codes, row_stats, mask = int8_vectorwise_quant(jnp.asarray(x.numpy()), threshold=2.5)
    np.testing.assert_array_equal(np.asarray(codes), want_codes.numpy())
    np.testing.assert_array_equal(np.asarray(row_stats), want_stats.numpy())
    np.testing.assert_array_equal(np.nonzero(np.asarray(mask))[0], want_cols.numpy())
