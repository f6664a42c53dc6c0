"""The JAX launchers (qflax_kernels.int8_launch, qflax.ops.int8_kernels) on CPU, kernels in Triton's interpreter.

The real launchers run: their ``triton_call`` primitive lowers on CPU to the same kernel in the
interpreter, so argument order, grids, metaparameters, output shapes, zero-initialised
outputs and the custom_vmap rules are all exercised without a GPU.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("interpreter tests run only where TRITON_INTERPRET=1 (CPU machines)", allow_module_level=True)
pytest.importorskip("torch")
pytest.importorskip("triton")

from qflax.ops import int8_kernels  # noqa: E402
from qflax.quant import int8 as int8_ref  # noqa: E402
from qflax.quant import switchback as sb_ref  # noqa: E402


def _x(shape, dtype="float32", seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_run_int8_matmul_matches_reference_with_batch_dims(dtype):
    x = _x((2, 37, 70), dtype)
    w = _x((45, 70), seed=1)
    wq = int8_ref.quantize_rows(w)
    bias = _x((45,), dtype, seed=2)
    got = jax.jit(int8_kernels.run_int8_matmul)(x, wq.codes, wq.scale, bias)
    assert got.shape == (2, 37, 45) and got.dtype == x.dtype
    codes, absmax = sb_ref.quantize_rowwise(x.reshape(-1, 70))
    ref = int8_ref.int8_mm_dequant(int8_ref.int8_linear_matmul(codes, wq.codes), absmax, wq.scale, bias)
    np.testing.assert_allclose(np.asarray(got, np.float32).reshape(-1, 45), np.asarray(ref.astype(dtype), np.float32),
                               rtol=2e-3, atol=2e-2)


def test_weight_quantizers_match_reference():
    w = _x((45, 70), seed=3).at[:, 4].set(0.0)
    for ours, ref in [(int8_kernels.quantize_global, sb_ref.quantize_global),
                      (int8_kernels.quantize_global_transpose, sb_ref.quantize_global_transpose),
                      (int8_kernels.quantize_columnwise_and_transpose, sb_ref.quantize_columnwise_and_transpose),
                      (int8_kernels.quantize_rowwise, sb_ref.quantize_rowwise)]:
        (codes, scale), (ref_codes, ref_scale) = ours(w), ref(w)
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(ref_codes))
        np.testing.assert_array_equal(np.asarray(scale), np.asarray(ref_scale))


def test_custom_vmap_folds_activations_and_maps_weights():
    x = _x((3, 20, 70), "float16", seed=4)
    w = _x((2, 45, 70), seed=5)
    q = [int8_ref.quantize_rows(w[i]) for i in range(2)]
    direct = int8_kernels.run_int8_matmul(x, q[0].codes, q[0].scale)
    folded = jax.vmap(lambda xi: int8_kernels.run_int8_matmul(xi, q[0].codes, q[0].scale))(x)
    np.testing.assert_array_equal(np.asarray(folded), np.asarray(direct))
    codes = jnp.stack([qi.codes for qi in q])
    scales = jnp.stack([qi.scale for qi in q])
    mapped = jax.vmap(lambda c, s: int8_kernels.run_int8_matmul(x[0], c, s))(codes, scales)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(mapped[i]),
                                      np.asarray(int8_kernels.run_int8_matmul(x[0], q[i].codes, q[i].scale)))
    glob = jax.vmap(int8_kernels.quantize_global_transpose)(w)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(glob[0][i]), np.asarray(sb_ref.quantize_global_transpose(w[i])[0]))


def test_run_llm_int8_outliers_under_jit():
    x = _x((40, 70), seed=6).at[3, 5].set(9.0).at[30, 66].set(-7.0)
    w = _x((45, 70), seed=7)
    wq = int8_ref.quantize_rows(w)
    got = jax.jit(lambda x: int8_kernels.run_llm_int8(x, wq.codes, wq.scale, None, 6.0))(x)
    mask = np.asarray(int8_ref.outlier_mask(x, 6.0))
    assert list(np.nonzero(mask)[0]) == [5, 66]
    # Independent float64 reference of the decomposition: int8 part (bitsandbytes' rules) + float outliers.
    xn = np.asarray(x, np.float64)
    kept = np.where(np.abs(xn) >= 6.0, 0.0, xn).astype(np.float32)
    absmax = np.abs(kept).max(axis=1)
    codes = np.rint(kept * (np.float32(127) * (np.float32(1) / absmax))[:, None]).astype(np.float64)
    codes[:, mask] = 0
    w_deq = np.asarray(wq.codes, np.float64) * np.asarray(wq.scale, np.float64)[:, None] / 127
    ref = (codes * absmax[:, None] / 127) @ w_deq.T + xn[:, mask] @ w_deq[:, mask].T
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("M,n_outliers", [(1, 600), (20, 90)])
def test_run_llm_int8_many_outlier_columns_take_the_masked_pass(dtype, M, n_outliers):
    # More outlier columns than the tile gathers (512 in decode tiles, 64 in larger ones): the GEMM
    # streams x and B again under the column mask, a half-precision dot for half inputs.
    from qflax_kernels import int8_gemm

    assert n_outliers > (int8_gemm.GATHER_MAX_DECODE if M == 1 else int8_gemm.GATHER_MAX_OUTLIERS)
    K, N = 1024, 48
    x = jnp.clip(_x((M, K), seed=8), -5, 5)
    cols = np.arange(n_outliers) * (K // n_outliers) + 1
    x = x.at[(np.arange(n_outliers) * 7) % M, cols].set(jnp.asarray(np.resize([8.0, -7.0, 6.5, 9.0], n_outliers)))
    x = x.astype(dtype)
    wq = int8_ref.quantize_rows(_x((N, K), seed=9))
    got = jax.jit(lambda x: int8_kernels.run_llm_int8(x, wq.codes, wq.scale, None, 6.0))(x)
    mask = np.asarray(int8_ref.outlier_mask(x, 6.0))
    assert np.flatnonzero(mask).tolist() == cols.tolist()
    codes, stats, _ = int8_ref.int8_vectorwise_quant(x, 6.0)
    int8_part = int8_ref.int8_mm_dequant(int8_ref.int8_linear_matmul(codes, wq.codes), stats, wq.scale)
    w_deq = np.asarray(wq.codes, np.float64) * np.asarray(wq.scale, np.float64)[:, None] / 127
    ref = np.asarray(int8_part, np.float64) + np.asarray(x, np.float64)[:, mask] @ w_deq[:, mask].T
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all()
    # One rounding to the half output dtype: relative error of its epsilon order.
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < (1e-2 if dtype == "bfloat16" else 2e-3)


# ------------------------------------------------------------------------------------------
# The ops' "triton" path (kernels in the interpreter) vs their XLA path, forward and backward.


def _op_cases():
    import qflax.ops as ops

    cases = []
    if hasattr(ops, "switchback_matmul"):
        for variant in ("global", "vectorwise", "global_mem_efficient"):
            cases.append((f"switchback_{variant}", "switchback_matmul", (0, 1, 2),
                          lambda x, w, b, backend, v=variant: ops.switchback_matmul(x, w, b, variant=v, backend=backend)))
        # Inference only (the kernels have no autodiff rules): forward compared.
        cases.append(("switchback_prepared", "switchback_matmul_prepared", (),
                      lambda x, w, b, backend: ops.switchback_matmul_prepared(
                          x, *sb_ref.quantize_rowwise(w), b, variant="vectorwise", backend=backend)))
    if hasattr(ops, "switchback_bnb_matmul"):
        cases.append(("switchback_bnb_6", "switchback_bnb_matmul", (0, 1, 2),
                      lambda x, w, b, backend: ops.switchback_bnb_matmul(x, w, b, threshold=6.0, backend=backend)))
    if hasattr(ops, "matmul_8bit_trainable"):
        cases.append(("matmul_8bit_trainable_6", "matmul_8bit", (0, 1, 2),
                      lambda x, w, b, backend: ops.matmul_8bit_trainable(x, w, b, threshold=6.0, backend=backend)))
    if hasattr(ops, "matmul_8bit"):
        cases.append(("matmul_8bit_6", "matmul_8bit", (0, 2),
                      lambda x, w, b, backend: ops.matmul_8bit(x, int8_ref.quantize_rows(w), b, threshold=6.0,
                                                               backend=backend)))
    return cases


@pytest.mark.parametrize("name,op_name,argnums,fn", _op_cases())
def test_op_triton_path_matches_xla_path(monkeypatch, name, op_name, argnums, fn):
    import qflax.ops as ops
    from qflax.ops import dispatch

    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    x = _x((2, 9, 70), "float16", seed=8).at[1, 3, 12].set(8.0)
    w = _x((40, 70), "float16", seed=9) * 0.1
    b = _x((40,), "float16", seed=10)
    g = _x((2, 9, 40), "float16", seed=11)
    results = {}
    for backend in ("xla", "triton"):
        y = fn(x, w, b, backend)
        assert ops.last_path(op_name) == backend
        grads = ()
        if argnums:
            grads = jax.grad(lambda *a: jnp.sum((fn(*a, backend) * g).astype(jnp.float32)), argnums=argnums)(x, w, b)
        results[backend] = (y,) + tuple(grads)
    for got, ref in zip(results["triton"], results["xla"]):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        assert np.linalg.norm(got - ref) <= 5e-3 * np.linalg.norm(ref), name
