"""Every int8 kernel through Triton's interpreter (TRITON_INTERPRET=1, torch CPU tensors) vs the XLA reference.

The kernels are launched from the same launch objects the JAX launchers run (``int8_specs``),
with Triton's launcher on torch tensors (``torch_launch``, poisoned outputs), on small shapes whose sizes are not multiples of the tiles, with all-zero rows,
columns and tensors, and with values that land exactly on rounding halves.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests run only where TRITON_INTERPRET=1 (CPU machines)", allow_module_level=True)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from qflax.quant import int8 as int8_ref  # noqa: E402
from qflax.quant import switchback as sb_ref  # noqa: E402
from qflax_kernels import int8_gemm, int8_quant, int8_specs, torch_launch  # noqa: E402

# Small tiles so that 3-D grids, tails and several K steps all happen on tiny shapes.
SMALL_GEMM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _t(a):
    """numpy/jax array -> torch CPU tensor (bfloat16 through float32)."""
    a = np.asarray(a)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True, order="C"))


def _n(t):
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _gemm(a, b, a_scale, b_scale, bias=None, out_dtype="float32", x=None, outlier_idx=None, w_float=None,
          config=SMALL_GEMM):
    M, K = a.shape
    N = b.shape[0]
    has_out = x is not None
    spec = int8_specs.gemm_launch(
        M, N, K, out_dtype, has_bias=bias is not None, b_scale_global=b_scale.shape[0] == 1 and N != 1,
        has_outliers=has_out, outlier_w_float=w_float is not None, config=config,
        dot_ieee=has_out and (x.dtype == np.float32 or (w_float is not None and w_float.dtype == np.float32)),
    )
    idx = np.zeros(max(K, 1), np.int32) if outlier_idx is None else np.asarray(outlier_idx, np.int32)
    count = np.array([0 if outlier_idx is None else len(outlier_idx)], np.int32)
    col_mask = np.zeros(max(K, 1), np.int8)
    if outlier_idx is not None:
        col_mask[idx] = 1
        idx = np.concatenate([idx, np.zeros(K - len(idx), np.int32)])
    (out,) = torch_launch.run(spec, [
        _t(a), _t(b), _t(a_scale), _t(b_scale),
        _t(bias) if bias is not None else torch.zeros(1),
        _t(x) if has_out else torch.zeros(1), _t(idx), _t(count), _t(col_mask),
        _t(w_float) if w_float is not None else torch.zeros(1),
    ], poison=True)
    return _n(out)


def _int8(rng, shape, zero_rows=()):
    codes = rng.integers(-127, 128, size=shape).astype(np.int8)
    for r in zero_rows:
        codes[r] = 0
    return codes


@pytest.mark.parametrize("M,N,K", [(37, 45, 70), (16, 32, 64), (1, 33, 17)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_vectorwise_matches_reference(M, N, K, with_bias):
    rng = np.random.default_rng(M * 1000 + N + K)
    a = _int8(rng, (M, K), zero_rows=[0])
    b = _int8(rng, (N, K))
    a_scale = rng.uniform(0.1, 3, M).astype(np.float32)
    a_scale[0] = 0.0
    b_scale = rng.uniform(0.1, 3, N).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32) if with_bias else None
    got = _gemm(a, b, a_scale, b_scale, bias)
    ref = np.asarray(int8_ref.int8_mm_dequant(int8_ref.int8_linear_matmul(jnp.asarray(a), jnp.asarray(b)),
                                              jnp.asarray(a_scale), jnp.asarray(b_scale),
                                              None if bias is None else jnp.asarray(bias)))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert not np.isnan(got).any()


@pytest.mark.parametrize("M,K", [(1, 300), (3, 1024), (16, 300), (17, 300)])
def test_gemm_default_tiles_match_reference(M, K):
    """The tiles gemm_config picks itself (decode: 16x32x512, rows below the tile not loaded), K with
    and without a tail, N not a multiple of 32."""
    from qflax_kernels import int8_gemm

    _, meta = int8_gemm.gemm_meta(M, 70, K, has_bias=False, b_scale_global=False, has_outliers=False)
    assert meta["PAD_ROWS"] == (M != 16) and meta["EVEN_K"] == (K == 1024)  # 17 rows: a 64-row tile
    rng = np.random.default_rng(M)
    N = 70
    a, b = _int8(rng, (M, K)), _int8(rng, (N, K))
    a_scale = rng.uniform(0.1, 3, M).astype(np.float32)
    b_scale = rng.uniform(0.1, 3, N).astype(np.float32)
    got = _gemm(a, b, a_scale, b_scale, config=None)
    ref = np.asarray(int8_ref.int8_mm_dequant(int8_ref.int8_linear_matmul(jnp.asarray(a), jnp.asarray(b)),
                                              jnp.asarray(a_scale), jnp.asarray(b_scale), None))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16"])
def test_gemm_global_scale_and_half_output(out_dtype):
    rng = np.random.default_rng(7)
    M, N, K = 20, 40, 96
    a, b = _int8(rng, (M, K)), _int8(rng, (N, K))
    a_scale = rng.uniform(0.1, 2, M).astype(np.float32)
    w_absmax = np.array([1.7], np.float32)
    bias = rng.normal(size=N).astype(np.float32)
    got = _gemm(a, b, a_scale, w_absmax, bias, out_dtype=out_dtype)
    acc = a.astype(np.int64) @ b.astype(np.int64).T
    ref = (acc * (a_scale[:, None] / 127.0**2) * w_absmax[0] + bias).astype(np.float32)
    ref = np.asarray(jnp.asarray(ref).astype(out_dtype).astype(jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("x_dtype", ["float32", "float16"])
@pytest.mark.parametrize("M,n_planted,block_m", [(19, 3, 32), (19, 40, 32), (19, 3, 16), (4, 40, 16), (1, 33, 16),
                                                 (19, 90, 32), (4, 90, 16), (4, 600, 16)])
def test_gemm_outlier_columns_add_the_float_matmul(x_dtype, M, n_planted, block_m):
    # Tiles of <= 16 rows gather the first BLOCK_O (32) outlier columns before the K loop, larger
    # ones in the loop after it; 33 and 40 outliers also run that loop over the remaining ones;
    # more than GATHER_MAX (64 for larger tiles, 512 for decode tiles) take the second, masked pass
    # over K instead of the gather (90 with 32-row tiles, 600 with 16-row tiles).
    config = dict(SMALL_GEMM, BLOCK_M=block_m)
    meta = int8_gemm.gemm_meta(M, 35, 66, has_bias=False, b_scale_global=False, has_outliers=True, config=config)[1]
    assert meta["PREFETCH_OUTLIERS"] == (block_m <= 16)
    assert (n_planted > meta["GATHER_MAX"]) == ((n_planted, block_m) in ((90, 32), (600, 16)))
    rng = np.random.default_rng(3)
    N, K, threshold = 35, 66 if n_planted < 64 else (150 if n_planted < 100 else 700), 6.0
    x = rng.normal(size=(M, K)).astype(np.float32)
    x = np.clip(x, -5.0, 5.0)  # no accidental outliers: the planted ones are all there are
    planted = [2, 40, 65] if n_planted == 3 else sorted(rng.choice(K, n_planted, replace=False).tolist())
    row = 5 % M
    x[row, planted] = np.resize([9.0, -7.5, 6.0], n_planted)
    x = x.astype(x_dtype)
    w = rng.normal(size=(N, K)).astype(np.float32)
    w_codes, w_scale, _ = int8_ref.int8_vectorwise_quant(jnp.asarray(w))
    a_codes, a_scale, mask = _llm_int8_rows_numpy(x.astype(np.float32), threshold)
    cols = int8_ref.outlier_columns(mask)
    assert list(cols) == planted
    int8_part = np.asarray(int8_ref.int8_mm_dequant(int8_ref.int8_linear_matmul(jnp.asarray(a_codes), w_codes),
                                                    jnp.asarray(a_scale), w_scale))
    tol = dict(rtol=1e-4, atol=1e-3 if x_dtype == "float16" else 1e-4)
    # Outlier columns against the int8 weight dequantized on the fly (LLM.int8) ...
    got = _gemm(a_codes, np.asarray(w_codes), a_scale, np.asarray(w_scale), x=x, outlier_idx=cols, config=config)
    w_deq = np.asarray(int8_ref.int8_vectorwise_dequant(w_codes, w_scale))
    ref = int8_part + x.astype(np.float32)[:, cols] @ w_deq[:, cols].T
    np.testing.assert_allclose(got, ref, **tol)
    # ... or against a float weight (SwitchBackBnb), with a bias.
    w_half = w.astype(x_dtype)
    bias = rng.normal(size=N).astype(np.float32)
    got_f = _gemm(a_codes, np.asarray(w_codes), a_scale, np.asarray(w_scale), bias, x=x, outlier_idx=cols,
                  w_float=w_half, config=config)
    ref_f = int8_part + x.astype(np.float32)[:, cols] @ w_half.astype(np.float32)[:, cols].T + bias
    np.testing.assert_allclose(got_f, ref_f, **tol)
    # Without the outlier loop the planted row would be badly wrong: the test can fail.
    assert np.abs(int8_part - ref)[row].max() > 1.0


def _rows(x, col_mask=None, threshold=0.0, llm_int8_scale=False):
    M, K = x.shape
    spec = int8_specs.rows_launch(M, K, threshold=threshold, llm_int8_scale=llm_int8_scale)
    mask = torch.zeros(1, dtype=torch.int8) if col_mask is None else _t(np.asarray(col_mask).astype(np.int8))
    codes, absmax = torch_launch.run(spec, [_t(x), mask], poison=True)
    return codes.numpy(), absmax.numpy()


def _halves_matrix(M, K):
    """Rows with absmax 127 (scale exactly 1) holding k + 0.5 values: every code is a rounding tie."""
    x = np.tile(np.arange(K, dtype=np.float32) % 20 - 9.5, (M, 1))
    x[:, 0] = 127.0
    return x


@pytest.mark.parametrize("M,K,dtype", [(13, 70, "float32"), (5, 300, "bfloat16"), (3, 33, "float16")])
def test_quantize_rows_matches_reference(M, K, dtype):
    rng = np.random.default_rng(K)
    x = rng.normal(size=(M, K)).astype(np.float32) * 3
    x[1] = 0.0
    x = np.asarray(jnp.asarray(x).astype(dtype))
    codes, absmax = _rows(x)
    ref_codes, ref_absmax = sb_ref.quantize_rowwise(jnp.asarray(x))
    np.testing.assert_array_equal(codes, np.asarray(ref_codes))
    np.testing.assert_array_equal(absmax, np.asarray(ref_absmax))
    assert absmax[1] == 0 and not codes[1].any()


def test_quantize_rows_llm_int8_scale_is_reciprocal_times_127():
    # absmax values whose 127 / a and 127 * (1 / a) differ in the last bit, with x on the halves
    # those scales produce: the two scale rules give different codes, and each kernel mode must
    # match its own reference.
    absmax = np.float32(1) + np.arange(1, 4000, dtype=np.float32) * np.float32(2**-12)
    differs = (np.float32(127) / absmax) != (np.float32(127) * (np.float32(1) / absmax))
    a = absmax[differs][:16]
    x = np.zeros((16, 64), np.float32)
    x[:, 0] = a
    x[:, 1:] = (np.arange(63, dtype=np.float32) - 31.5)[None, :] * (a[:, None] / np.float32(127))
    codes_llm, _ = _rows(x, llm_int8_scale=True)
    codes_sb, _ = _rows(x)
    np.testing.assert_array_equal(codes_llm, _llm_int8_rows_numpy(x, 0.0)[0])
    np.testing.assert_array_equal(codes_sb, np.asarray(sb_ref.quantize_rowwise(jnp.asarray(x))[0]))
    assert (codes_llm != codes_sb).any()


def test_quantize_rows_rounds_half_to_even():
    x = _halves_matrix(3, 40)
    codes, _ = _rows(x)
    np.testing.assert_array_equal(codes, np.asarray(sb_ref.quantize_rowwise(jnp.asarray(x))[0]))
    np.testing.assert_array_equal(codes[0, 1:11], [-8, -8, -6, -6, -4, -4, -2, -2, 0, 0])  # -8.5 ... 0.5


def _llm_int8_rows_numpy(x, threshold):
    """bitsandbytes' int8_vectorwise_quant, in numpy (docs/int8.md#quantization): scale ``127 * (1 / absmax)`` in
    float32; with a threshold, outlier elements leave the row absmax and round to 0, and with more
    than one row, outlier columns' codes are 0."""
    is_out = np.abs(x) >= threshold if threshold > 0 else np.zeros(x.shape, bool)
    kept = np.where(is_out, np.float32(0), x.astype(np.float32))
    absmax = np.abs(kept).max(axis=1)
    safe = np.where(absmax == 0, np.float32(1), absmax)
    scale = np.where(absmax == 0, np.float32(0), np.float32(127) * (np.float32(1) / safe))
    codes = np.clip(np.rint(kept * scale[:, None]), -127, 127).astype(np.int8)
    mask = is_out.any(axis=0)
    if x.shape[0] > 1:
        codes[:, mask] = 0
    return codes, absmax.astype(np.float32), mask


@pytest.mark.parametrize("M", [9, 1])
def test_quantize_rows_with_outliers_matches_llm_int8_semantics(M):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(M, 50)).astype(np.float32)
    x[M // 2, [4, 31]] = [8.0, -6.5]
    x[M - 1, 7] = 5.0  # the largest kept value of its row
    codes_ref, stats_ref, mask = _llm_int8_rows_numpy(x, 6.0)
    np.testing.assert_array_equal(np.asarray(int8_ref.outlier_mask(jnp.asarray(x), 6.0)), mask)
    codes, absmax = _rows(x, mask, threshold=6.0, llm_int8_scale=True)
    np.testing.assert_array_equal(codes, codes_ref)
    np.testing.assert_array_equal(absmax, stats_ref)
    assert not codes[:, [4, 31]].any() and absmax[M - 1] == 5.0


def _rows_outliers(x, threshold, col_mask=None):
    M, K = x.shape
    spec = int8_specs.rows_outliers_launch(M, K, threshold=threshold, find_mask=col_mask is None)
    mask = _t(x) if col_mask is None else _t(np.asarray(col_mask).astype(np.int8))
    codes, absmax, columns, count, out_mask = torch_launch.run(spec, [_t(x), mask], poison=True)
    return codes.numpy(), absmax.numpy(), columns.numpy(), count.numpy(), out_mask.numpy()


@pytest.mark.parametrize("M,K,find_mask", [(1, 300, True), (6, 50, True), (600, 50, False), (1, 40, False)])
def test_outlier_quantizer_gives_codes_and_outlier_columns_first(M, K, find_mask):
    # The kernel that quantizes and lists the outlier columns (found by itself when it holds every
    # row, else from the mask) against the XLA reference and numpy's nonzero.
    # (600, 50): too many rows for one program, so the mask is an input; (1, 40): a mask given anyway.
    assert int8_quant.outliers_fit_one_program(M, K) == (M < 600)
    rng = np.random.default_rng(M * K)
    x = rng.normal(size=(M, K)).astype(np.float32)  # |x| < 6 everywhere but where planted
    x[M // 2, [4, K - 1]] = [8.0, -6.5]
    x[M - 1, 7] = 6.0  # exactly the threshold: an outlier (>=)
    x[0, 9] = np.nan  # NaN is no outlier: its row gets scale NaN, codes 0
    codes_ref, stats_ref, mask = (np.asarray(a) for a in int8_ref.int8_vectorwise_quant(jnp.asarray(x), 6.0))
    codes, absmax, columns, count, out_mask = _rows_outliers(x, 6.0, None if find_mask else mask)
    assert np.isnan(absmax[0]) and not codes[0].any()
    np.testing.assert_array_equal(codes, codes_ref)
    np.testing.assert_array_equal(absmax, stats_ref)
    want = np.nonzero(mask)[0]
    assert list(want) == sorted({4, 7, K - 1}) and count.tolist() == [len(want)]
    np.testing.assert_array_equal(columns[: len(want)], want)
    np.testing.assert_array_equal(out_mask, mask.astype(np.int8))


def test_outlier_quantizer_without_outliers_lists_none():
    x = np.linspace(-1, 1, 3 * 20, dtype=np.float32).reshape(3, 20)
    codes, absmax, columns, count, out_mask = _rows_outliers(x, 6.0)
    np.testing.assert_array_equal(codes, _llm_int8_rows_numpy(x, 6.0)[0])
    assert count.tolist() == [0] and not out_mask.any()


def test_outlier_quantizer_refuses_a_mask_search_over_several_programs():
    with pytest.raises(ValueError, match="find_mask"):
        int8_specs.rows_outliers_launch(64, 4096, threshold=6.0, find_mask=True)
    with pytest.raises(ValueError, match="threshold"):
        int8_specs.rows_outliers_launch(1, 64, threshold=0.0, find_mask=True)


def _scaled(x, per_column, transpose):
    M, N = x.shape
    (absmax,) = torch_launch.run(int8_specs.absmax_launch(M, N, per_column=per_column), [_t(x)], poison=True)
    (codes,) = torch_launch.run(int8_specs.scaled_launch(M, N, per_column=per_column, transpose=transpose),
                                [_t(x), absmax], poison=True)
    return codes.numpy(), absmax.numpy()


@pytest.mark.parametrize("M,N", [(70, 45), (1100, 3)])
def test_quantize_columnwise_transpose_matches_reference(M, N):
    rng = np.random.default_rng(N)
    x = (rng.normal(size=(M, N)) * 2).astype(np.float32)
    x[:, 1] = 0.0
    codes, absmax = _scaled(x, per_column=True, transpose=True)
    ref_codes, ref_absmax = sb_ref.quantize_columnwise_and_transpose(jnp.asarray(x))
    np.testing.assert_array_equal(codes, np.asarray(ref_codes))
    np.testing.assert_array_equal(absmax, np.asarray(ref_absmax))
    assert not codes[1].any()


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_global_matches_reference(transpose, dtype):
    rng = np.random.default_rng(5)
    x = np.asarray(jnp.asarray(rng.normal(size=(75, 41)).astype(np.float32)).astype(dtype))
    codes, absmax = _scaled(x, per_column=False, transpose=transpose)
    ref = sb_ref.quantize_global_transpose if transpose else sb_ref.quantize_global
    ref_codes, ref_absmax = ref(jnp.asarray(x))
    np.testing.assert_array_equal(codes, np.asarray(ref_codes))
    np.testing.assert_array_equal(absmax, np.asarray(ref_absmax))


def test_quantize_global_all_zero_gives_zero_scale_and_codes():
    codes, absmax = _scaled(np.zeros((33, 20), np.float32), per_column=False, transpose=True)
    assert absmax[0] == 0 and not codes.any()


def test_quantize_global_rounds_half_to_even():
    x = _halves_matrix(4, 30)
    codes, _ = _scaled(x, per_column=False, transpose=False)
    np.testing.assert_array_equal(codes, np.asarray(sb_ref.quantize_global(jnp.asarray(x))[0]))


def _non_finite_and_extreme(M, K, seed=3):
    """Rows/columns holding NaN, +Inf, -Inf, huge (1e38) and tiny (1e-30) values next to ordinary ones."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, K)).astype(np.float32)
    x[1, 3], x[2, 0], x[3, K - 1] = np.nan, np.inf, -np.inf
    x[4] *= np.float32(1e38) / np.abs(x[4]).max()
    x[5] *= np.float32(1e-30)
    return x


def test_row_quantizer_follows_the_non_finite_and_extreme_value_rule():
    x = _non_finite_and_extreme(9, 40)
    for llm_int8_scale, ref in ((False, sb_ref.quantize_rowwise), (True, None)):
        codes, absmax = _rows(x, llm_int8_scale=llm_int8_scale)
        if ref is None:
            want_codes, want_absmax, _ = int8_ref.int8_vectorwise_quant(jnp.asarray(x))
        else:
            want_codes, want_absmax = ref(jnp.asarray(x))
        np.testing.assert_array_equal(codes, np.asarray(want_codes))
        np.testing.assert_array_equal(absmax, np.asarray(want_absmax))  # NaN compares equal to NaN here
        assert np.isnan(absmax[1:4]).all() and not codes[1:4].any() and np.abs(codes[4:6]).max() == 127


@pytest.mark.parametrize("per_column", [True, False])
def test_column_and_global_quantizers_follow_the_non_finite_rule(per_column):
    x = _non_finite_and_extreme(70, 6)
    codes, absmax = _scaled(x, per_column=per_column, transpose=per_column)
    ref = sb_ref.quantize_columnwise_and_transpose if per_column else sb_ref.quantize_global
    want_codes, want_absmax = ref(jnp.asarray(x))
    np.testing.assert_array_equal(codes, np.asarray(want_codes))
    np.testing.assert_array_equal(absmax, np.asarray(want_absmax))
    assert np.isnan(absmax).any()
