"""The 4-bit kernels launched through qflax_kernels.triton_call on the GPU, vs the XLA reference (marker ``gpu``)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import bnb_format
from qflax.quant import fourbit

pytestmark = pytest.mark.gpu

DTYPES = ("float16", "bfloat16", "float32")
TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-5}
COMBOS = list(itertools.product(("nf4", "fp4"), (64, 128), (False, True), DTYPES))
N, K = 1000, 768  # N is no multiple of any tile; K is 12 (bs 64) or 6 (bs 128) blocks


def _weight(key, n, k, blocksize=64, quant_type="nf4", nested=False):
    w = jax.random.normal(key, (n, k), jnp.float32)
    return fourbit.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _kernel_args(q):
    return dict(packed=q.packed, absmax=q.absmax, quant_map=q.quant_map, shape=q.shape, blocksize=q.blocksize,
                nested_absmax=q.nested_absmax, nested_quant_map=q.nested_quant_map, nested_offset=q.nested_offset)


def _reference(x, q, bias=None):
    """XLA reference: the weight dequantized into x's dtype, product in float32."""
    w = fourbit.dequantize_4bit(q).astype(x.dtype).astype(jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
    return y if bias is None else y + bias.astype(jnp.float32)


def _relative_error(out, ref):
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    ref = np.asarray(ref)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("index", range(len(COMBOS)))
def test_forward_matches_reference_under_jit(index, small):
    from qflax_kernels import fourbit_jax

    quant_type, blocksize, nested, dtype = COMBOS[index]
    rows = (1, 3)[index % 2] if small else (17, 200)[index % 2]  # gemv and gemm plans, with M tails
    keys = jax.random.split(jax.random.key(index * 10 + rows), 3)
    q = _weight(keys[0], N, K, blocksize, quant_type, nested)
    x = jax.random.normal(keys[1], (rows, K), jnp.float32).astype(dtype)
    bias = jax.random.normal(keys[2], (N,), jnp.float32).astype(dtype) if index % 2 else None
    out = jax.jit(lambda x, q, b: fourbit_jax.matmul_4bit(x, bias=b, **_kernel_args(q)))(x, q, bias)
    assert out.shape == (rows, N) and out.dtype == jnp.dtype(dtype)
    assert _relative_error(out, _reference(x, q, bias)) < TOLERANCE[dtype]


REGISTER_DECODE_PLANS = [
    dict(kernel="word_gemv"),  # 4 warps, 128 words a step
    dict(kernel="word_gemv", block_n=8, split_k=2),
    dict(kernel="word_gemv", words=64, block_n=4),
    dict(kernel="mma", block_m=16, block_k=128, split_k=4),
    dict(kernel="mma", block_m=64, block_n=64, block_k=256),
    dict(kernel="mma", block_m=256, block_n=128, block_k=64, split_k=2),
]


@pytest.mark.parametrize("plan", REGISTER_DECODE_PLANS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
@pytest.mark.parametrize("dtype", ("bfloat16", "float16"))
def test_register_decode_assembly_matches_portable_decode_and_reference(plan, dtype):
    """The prmt decode in inline PTX gives the portable path's weights (bit-identical products
    for the tensor-core kernel), and both match the XLA reference; N has a tail, K = 2048."""
    from qflax_kernels import fourbit_jax

    n, k = 1000, 2048
    rows = 1 if plan["kernel"] == "word_gemv" else 37
    keys = jax.random.split(jax.random.key(11), 3)
    q = _weight(keys[0], n, k, 64, "nf4", True)
    x = jax.random.normal(keys[1], (rows, k), jnp.float32).astype(dtype)
    bias = jax.random.normal(keys[2], (n,), jnp.float32).astype(dtype)

    def run(use_asm):
        fn = jax.jit(lambda x, q, b: fourbit_jax.matmul_4bit(
            x, bias=b, plan_override=dict(plan, use_asm=use_asm), **_kernel_args(q)))
        return np.asarray(fn(x, q, bias).astype(jnp.float32))

    asm, portable = run(True), run(False)
    if plan["kernel"] == "mma":
        np.testing.assert_array_equal(asm, portable)
    else:  # same values, different FMA association: a few outputs round to the neighbouring value
        assert float(np.linalg.norm(asm - portable) / np.linalg.norm(portable)) < TOLERANCE[dtype] / 8
    assert _relative_error(jnp.asarray(asm), _reference(x, q, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("index", range(len(COMBOS)))
def test_grad_input_matches_reference(index):
    from qflax_kernels import fourbit_jax

    quant_type, blocksize, nested, dtype = COMBOS[index]
    rows = (1, 40)[index % 2]
    keys = jax.random.split(jax.random.key(1000 + index), 2)
    q = _weight(keys[0], N, K, blocksize, quant_type, nested)
    g = jax.random.normal(keys[1], (rows, N), jnp.float32).astype(dtype)
    out = jax.jit(lambda g, q: fourbit_jax.grad_input_4bit(g, **_kernel_args(q)))(g, q)
    w = fourbit.dequantize_4bit(q).astype(dtype).astype(jnp.float32)
    ref = jnp.dot(g.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    assert out.shape == (rows, K) and out.dtype == jnp.dtype(dtype)
    assert _relative_error(out, ref) < TOLERANCE[dtype]


def _kernel_matmul():
    """x @ W.T + b with the fused kernels forward and backward (what matmul_4bit's triton branch does)."""
    from qflax.ops import fourbit_kernels

    @jax.custom_vjp
    def matmul(x, q, b):
        return fourbit_kernels.forward(x, q, b, np.dtype(x.dtype).name)

    def fwd(x, q, b):
        return matmul(x, q, b), q

    def bwd(q, g):
        grad_x = fourbit_kernels.grad_input(g, q, np.dtype(g.dtype).name)
        return grad_x, None, jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1))).astype(g.dtype)

    matmul.defvjp(fwd, bwd)
    return matmul


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_through_kernels_matches_reference_grad(dtype):
    keys = jax.random.split(jax.random.key(3), 4)
    q = _weight(keys[0], N, K, 64, "nf4", True)
    x = jax.random.normal(keys[1], (2, 9, K), jnp.float32).astype(dtype)
    bias = jax.random.normal(keys[2], (N,), jnp.float32).astype(dtype)
    target = jax.random.normal(keys[3], (2, 9, N), jnp.float32)
    matmul = _kernel_matmul()

    def loss(fn, x, b):
        return jnp.sum(fn(x, b).astype(jnp.float32) * target)

    got = jax.jit(jax.grad(lambda x, b: loss(lambda x, b: matmul(x, q, b), x, b), argnums=(0, 1)))(x, bias)
    want = jax.grad(lambda x, b: loss(lambda x, b: _reference(x, q, b), x, b), argnums=(0, 1))(x, bias)
    for g, w in zip(got, want):
        assert g.dtype == jnp.dtype(dtype)
        assert _relative_error(g, w) < TOLERANCE[dtype]


def test_vmap_over_x_folds_into_one_launch_and_matches():
    from qflax_kernels import fourbit_jax

    keys = jax.random.split(jax.random.key(4), 2)
    q = _weight(keys[0], N, K, 128, "fp4", False)
    x = jax.random.normal(keys[1], (3, 5, K), jnp.float32).astype(jnp.bfloat16)
    fn = jax.jit(jax.vmap(lambda x: fourbit_jax.matmul_4bit(x, **_kernel_args(q))))
    assert str(fn.lower(x).as_text()).count("triton_kernel_call") == 1
    assert _relative_error(fn(x), _reference(x.reshape(15, K), q).reshape(3, 5, N)) < TOLERANCE["bfloat16"]
    grad_fn = jax.jit(jax.vmap(lambda g: fourbit_jax.grad_input_4bit(g, **_kernel_args(q))))
    g = jax.random.normal(keys[1], (3, 5, N), jnp.float32).astype(jnp.bfloat16)
    w = fourbit.dequantize_4bit(q).astype(jnp.bfloat16).astype(jnp.float32)
    ref = jnp.dot(g.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    assert _relative_error(grad_fn(g), ref) < TOLERANCE["bfloat16"]


def test_vmap_over_stacked_weights_matches():
    from qflax_kernels import fourbit_jax

    keys = jax.random.split(jax.random.key(5), 4)
    qs = [_weight(k, N, K, 64, "nf4", True) for k in keys[:3]]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *qs)
    x = jax.random.normal(keys[3], (4, K), jnp.float32).astype(jnp.float16)
    out = jax.jit(jax.vmap(lambda q: fourbit_jax.matmul_4bit(x, **_kernel_args(q))))(stacked)
    for i, q in enumerate(qs):
        assert _relative_error(out[i], _reference(x, q)) < TOLERANCE["float16"]


def test_bnb_format_round_trip_gives_the_same_kernel_output():
    from qflax_kernels import fourbit_jax

    keys = jax.random.split(jax.random.key(6), 2)
    q = _weight(keys[0], N, K, 64, "nf4", True)
    restored = jax.tree.map(jnp.asarray, bnb_format.from_bnb_state_dict(bnb_format.to_bnb_state_dict(q)))
    x = jax.random.normal(keys[1], (2, K), jnp.float32).astype(jnp.bfloat16)
    a = fourbit_jax.matmul_4bit(x, **_kernel_args(q))
    b = fourbit_jax.matmul_4bit(x, **_kernel_args(restored))
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(fourbit.dequantize_4bit(restored)), np.asarray(fourbit.dequantize_4bit(q)))


@pytest.mark.backend("auto")  # the unforced call is auto's choice
def test_forced_kernel_runs_where_auto_would_not_pick_it():
    """"triton" at 600 rows runs the kernel (auto takes XLA above 512) and agrees with XLA."""
    from qflax.ops import last_path, matmul_4bit

    q = _weight(jax.random.key(7), 128, 256, 64)
    x = jax.random.normal(jax.random.key(17), (600, 256), jnp.float32).astype(jnp.bfloat16)
    y_xla = matmul_4bit(x, q)
    assert last_path("matmul_4bit") == "xla"
    y = matmul_4bit(x, q, backend="triton")
    assert last_path("matmul_4bit") == "triton"
    assert _relative_error(y, y_xla.astype(jnp.float32)) < TOLERANCE["bfloat16"]


@pytest.mark.backend("auto")  # what auto picks on the GPU is under test
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_4bit_op_dispatches_to_the_kernels(dtype):
    """qflax.ops.matmul_4bit picks "triton" on the GPU, agrees with its XLA path, forward and grad."""
    from qflax.ops import last_path, matmul_4bit

    keys = jax.random.split(jax.random.key(8), 3)
    q = _weight(keys[0], N, K, 128, "fp4", True)
    x = jax.random.normal(keys[1], (2, 5, K), jnp.float32).astype(dtype)
    bias = jax.random.normal(keys[2], (N,), jnp.float32).astype(dtype)

    def loss(x, b, backend):
        return jnp.sum(matmul_4bit(x, q, b, backend=backend).astype(jnp.float32) ** 2)

    # The XLA path's float32 dot may use TF32 on the GPU; the kernels compute float32 exactly.
    tolerance = max(TOLERANCE[dtype], 1e-3)
    y = jax.jit(lambda x, b: matmul_4bit(x, q, b))(x, bias)
    assert last_path("matmul_4bit") == "triton"
    y_xla = matmul_4bit(x, q, bias, backend="xla")
    assert y.dtype == jnp.dtype(dtype)
    assert _relative_error(y, y_xla.astype(jnp.float32)) < tolerance
    grads = jax.jit(jax.grad(lambda x, b: loss(x, b, None), argnums=(0, 1)))(x, bias)
    assert last_path("matmul_4bit_grad_input") == "triton"
    grads_xla = jax.grad(lambda x, b: loss(x, b, "xla"), argnums=(0, 1))(x, bias)
    for got, want in zip(grads, grads_xla):
        assert _relative_error(got, want.astype(jnp.float32)) < 2 * tolerance
    y_vmap = jax.jit(jax.vmap(lambda x: matmul_4bit(x, q, bias)))(x)
    assert _relative_error(y_vmap, y_xla.astype(jnp.float32)) < tolerance


@pytest.mark.backend("auto")
def test_matmul_4bit_op_falls_back_to_xla_for_other_blocksizes():
    from qflax.ops import last_path, matmul_4bit

    q = _weight(jax.random.key(9), 64, 512, 256)
    x = jnp.ones((1, 512), jnp.bfloat16)
    matmul_4bit(x, q)
    assert last_path("matmul_4bit") == "xla"
    with pytest.raises(ValueError, match="cannot run these arguments: blocksize"):
        matmul_4bit(x, q, backend="triton")
