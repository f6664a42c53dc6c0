"""The 4-bit Triton kernels through their real JAX launcher, run by Triton's interpreter, vs the XLA reference.

Each test calls ``qflax_kernels.fourbit_jax`` (the launcher the GPU uses: plan, launch, the
``triton_call`` primitive, whose CPU lowering runs the same ``@triton.jit`` function in Triton's
interpreter on poisoned outputs), forces small tiles so N, M and split-K (reduced in the kernel)
have tails, and compares with ``x @ dequantize_4bit(q).T`` computed by XLA in float32.
"""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax.quant import fourbit
from qflax_kernels import fourbit_jax, fourbit_plan

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter tests run where no GPU is present (CI)"
)

DTYPES = ("float16", "bfloat16", "float32")
# Relative Frobenius error allowed per activation dtype (kernel rounds differently from XLA).
TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-5}
COMBOS = list(itertools.product(("nf4", "fp4"), (64, 128), (False, True), tuple(DTYPES)))
ROWS = (1, 3, 17, 64)


def _weight(rng, n, k, blocksize, quant_type, nested):
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = fourbit.quantize_4bit(jnp.asarray(w), blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return q, np.asarray(fourbit.dequantize_4bit(q), np.float32)


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """Rounds float32 data to ``dtype`` and back, so kernel and reference see the same input."""
    return np.asarray(jnp.asarray(array).astype(dtype).astype(jnp.float32))


def _relative_error(out, ref: np.ndarray) -> float:
    got = np.asarray(out, np.float32)
    assert np.isfinite(got).all()  # the primitive poisons outputs with NaN: every element was written
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _weight_kwargs(q):
    return dict(shape=q.shape, blocksize=q.blocksize, nested_absmax=q.nested_absmax,
                nested_quant_map=q.nested_quant_map, nested_offset=q.nested_offset)


def run_matmul(x, q, bias, override):
    """Runs the real JAX launcher (``fourbit_jax`` -> ``triton_call`` -> interpreter); returns (out, plan)."""
    m, k = x.shape
    plan = fourbit_plan.plan_matmul(m, q.shape[0], k, q.blocksize, jnp.dtype(x.dtype).name,
                                    fourbit_jax.sm_count(), override)
    out = jax.jit(lambda x, bias: fourbit_jax.matmul_4bit(x, q.packed, q.absmax, q.quant_map, bias=bias,
                                                          plan_override=override, **_weight_kwargs(q)))(x, bias)
    return out, plan


def run_grad_input(g, q, override):
    return fourbit_jax.grad_input_4bit(g, q.packed, q.absmax, q.quant_map, plan_override=override, **_weight_kwargs(q))


def _check_forward(index, kernel, m, k, override):
    quant_type, blocksize, nested, dtype = COMBOS[index]
    rng = np.random.default_rng(index)
    n = 96 + 8 * (index % 3) + 4  # not a multiple of BN=32
    q, w = _weight(rng, n, k, blocksize, quant_type, nested)
    x = _cast(rng.standard_normal((m, k)).astype(np.float32), dtype)
    bias = _cast(rng.standard_normal(n).astype(np.float32), dtype) if index % 2 else None
    out, plan = run_matmul(jnp.asarray(x, dtype), q, None if bias is None else jnp.asarray(bias, dtype),
                           dict(dict(kernel=kernel, block_n=32), **override))
    assert (plan.kernel, out.shape, out.dtype) == (kernel, (m, n), jnp.dtype(dtype))
    w_rounded = _cast(w, dtype)  # the reference dequantizes into the activation dtype
    ref = np.asarray(jnp.dot(jnp.asarray(x), jnp.asarray(w_rounded).T, precision=jax.lax.Precision.HIGHEST))
    if bias is not None:
        ref = ref + bias
    assert _relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("index", range(len(COMBOS)))
def test_gemv_kernel_matches_xla_reference(index):
    # K = 512: 8 (bs 64) or 4 (bs 128) blocks, walked in groups of 1 or 2, split in 1 or 2.
    _check_forward(index, "gemv", 1, 512, dict(group=1 + index % 2, split_k=1 + (index // 2) % 2))


@pytest.mark.parametrize("index", range(len(COMBOS)))
def test_gemm_kernel_matches_xla_reference(index):
    # M tails against BM=16; K = 256 gives 4 or 2 blocks, split in 2 or not.
    _check_forward(index, "gemm", ROWS[index % len(ROWS)], 256, dict(block_m=16, split_k=2 if index % 4 < 2 else 1))


HALF_COMBOS = [i for i, combo in enumerate(COMBOS) if combo[3] != "float32"]


@pytest.mark.parametrize("index", HALF_COMBOS)
def test_word_gemv_kernel_matches_xla_reference(index):
    # K = 512 is 64 words a row: steps of 32 words (one warp), 2 steps, split in 1 or 2; N
    # is no multiple of 4 or 8 rows. The bfloat16 code table (float16 too) stays within the
    # float16 tolerance.
    _check_forward(index, "word_gemv", 1, 512, dict(block_n=4 << (index % 2), words=32,
                                                    split_k=1 + (index // 2) % 2))


@pytest.mark.parametrize("index", HALF_COMBOS)
def test_mma_kernel_matches_xla_reference(index):
    # M tails against BM=16; K = 512 in steps of one or two blocks, split in 2 or not.
    blocksize = COMBOS[index][1]
    _check_forward(index, "mma", ROWS[index % len(ROWS)], 512,
                   dict(block_m=16, block_k=blocksize * (1 + index % 2), split_k=2 if index % 4 < 2 else 1))


@pytest.mark.parametrize("index", range(len(COMBOS)))
def test_grad_input_kernel_matches_xla_reference(index):
    quant_type, blocksize, nested, dtype = COMBOS[index]
    rng = np.random.default_rng(100 + index)
    m = ROWS[index % len(ROWS)]
    n, k = 80 + 16 * (index % 3) + 2, 256  # N is not a multiple of BN=32: the N loop has a tail
    q, w = _weight(rng, n, k, blocksize, quant_type, nested)
    g = _cast(rng.standard_normal((m, n)).astype(np.float32), dtype)
    out = run_grad_input(jnp.asarray(g, dtype), q, dict(block_n=32))
    assert out.shape == (m, k) and out.dtype == jnp.dtype(dtype)
    ref = np.asarray(jnp.dot(jnp.asarray(g), jnp.asarray(_cast(w, dtype)), precision=jax.lax.Precision.HIGHEST))
    assert _relative_error(out, ref) < TOLERANCE[dtype]


def test_default_plans_cover_small_and_large_batches():
    """The plan table's own choices (no override) run correctly at M = 1, 3, 17, 64."""
    rng = np.random.default_rng(7)
    q, w = _weight(rng, 160, 384, 64, "nf4", True)
    kernels = []
    for m in ROWS:
        x = rng.standard_normal((m, 384)).astype(np.float32)
        out, plan = run_matmul(jnp.asarray(x), q, None, None)
        kernels.append(plan.kernel)
        assert _relative_error(out, x @ w.T) < 1e-5
    assert kernels[0] == "gemv" and kernels[-1] == "gemm"


def test_default_plans_for_16_bit_activations_use_the_register_decode_kernels():
    """bfloat16 x: one row takes the word gemv, more rows the tensor-core kernel (M = 1, 3, 17, 64)."""
    rng = np.random.default_rng(8)
    q, w = _weight(rng, 72, 512, 64, "nf4", True)
    kernels = []
    for m in ROWS:
        x = _cast(rng.standard_normal((m, 512)).astype(np.float32), "bfloat16")
        out, plan = run_matmul(jnp.asarray(x, jnp.bfloat16), q, None, None)
        kernels.append(plan.kernel)
        assert _relative_error(out, x @ _cast(w, "bfloat16").T) < TOLERANCE["bfloat16"]
    assert kernels == ["word_gemv", "mma", "mma", "mma"]


def test_vmap_over_x_folds_into_one_launch_and_matches_per_example():
    """A batch of activations is one launch (rows folded), a batch of weights one launch each."""
    rng = np.random.default_rng(9)
    q, w = _weight(rng, 40, 256, 64, "nf4", False)
    x = jnp.asarray(rng.standard_normal((3, 2, 256)).astype(np.float32), jnp.float16)

    def f(x):
        return fourbit_jax.matmul_4bit(x, q.packed, q.absmax, q.quant_map, **_weight_kwargs(q))

    jaxpr = str(jax.make_jaxpr(jax.vmap(f))(x))
    assert jaxpr.count("qflax_triton_call") == 1 and "scan" not in jaxpr  # folded, not mapped (lax.map)
    got = np.asarray(jax.vmap(f)(x), np.float32)
    want = np.stack([np.asarray(f(x[i]), np.float32) for i in range(3)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("nblocks", [255, 256, 700])
def test_decoding_nested_absmax_before_the_kernel_gives_the_reference_absmax(nblocks):
    """The forward launches decode double-quantized absmax in XLA with the kernels' formula."""
    rng = np.random.default_rng(nblocks)
    q = fourbit.quantize_4bit(jnp.asarray(rng.standard_normal((nblocks, 64)).astype(np.float32) * 3),
                              blocksize=64, compress_statistics=True)
    got = fourbit_jax.decode_nested_absmax(q.absmax, q.nested_quant_map, q.nested_absmax, q.nested_offset)
    want = fourbit.dequantize_absmax(q)
    assert got.dtype == jnp.float32 and got.shape == (nblocks,)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-7, atol=0)
