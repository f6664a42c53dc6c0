"""qflax.ops.matmul_4bit: compute-dtype rules, gradients, dispatch, bad input and JAX transforms.

References are computed independently in numpy float64 from ``dequantize_4bit(q)`` (the
foundation's decoder, itself tested against bitsandbytes).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from qflax.ops import dispatch, last_path, matmul_4bit, use_backend
from qflax.quant import dequantize_4bit, quantize_4bit

OUT, IN = 40, 192
# Jitted once per shape: eager op-by-op dispatch is what makes small tests slow on 2 cores.
quantize = jax.jit(quantize_4bit, static_argnames=("blocksize", "quant_type", "compress_statistics"))
matmul = jax.jit(matmul_4bit, static_argnames=("compute_dtype", "backend"))


def make_layer(seed=0, out=OUT, k=IN, quant_type="nf4", blocksize=64, nested=True):
    kw, kb = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(kw, (out, k), jnp.float32)
    q = quantize(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    bias = jax.random.normal(kb, (out,), jnp.float32)
    return q, bias


def reference(x, q, bias, round_to=None):
    """float64 x @ W.T + b; ``round_to`` first rounds x, W and b to that dtype (the compute dtype)."""
    w = np.asarray(dequantize_4bit(q), np.float32)
    xs, bs = np.asarray(x.astype(jnp.float32)), np.asarray(bias.astype(jnp.float32))
    if round_to is not None:
        w, xs, bs = (np.asarray(jnp.asarray(a).astype(round_to).astype(jnp.float32)) for a in (w, xs, bs))
    return xs.astype(np.float64) @ w.astype(np.float64).T + bs.astype(np.float64)


def inputs(shape, dtype, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def test_compute_dtype_none_computes_in_input_dtype():
    q, bias = make_layer()
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.float16, 4e-3), (jnp.bfloat16, 3e-2)):
        x = inputs((3, IN), dtype)
        y = matmul(x, q, bias)
        assert y.dtype == dtype
        ref = reference(x, q, bias, round_to=dtype)
        np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, atol=tol * np.abs(ref).max())


def test_bfloat16_compute_for_float32_input_returns_float32():
    q, bias = make_layer()
    x = inputs((4, IN), jnp.float32)
    y = matmul(x, q, bias, compute_dtype="bfloat16")
    assert y.dtype == jnp.float32
    ref_bf16 = reference(x, q, bias, round_to=jnp.bfloat16)
    ref_f32 = reference(x, q, bias)
    scale = np.abs(ref_f32).max()
    np.testing.assert_allclose(np.asarray(y), ref_bf16, atol=2e-2 * scale)
    # The product really ran in bfloat16: it is measurably away from the float32 result.
    assert np.abs(np.asarray(y) - ref_f32).max() > 1e-4 * scale


def test_float32_compute_for_float16_input_returns_float16():
    q, bias = make_layer()
    x = inputs((2, 5, IN), jnp.float16)
    y = matmul(x, q, bias, compute_dtype="float32")
    assert y.dtype == jnp.float16
    ref = reference(x, q, bias)  # x is exactly representable in float32; W, b not rounded
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_input_and_bias_gradients_match_finite_differences():
    q, bias = make_layer(out=24, k=64)
    x = inputs((3, 64), jnp.float32)
    cot = np.asarray(inputs((3, 24), jnp.float32, seed=7), np.float64)
    w = np.asarray(dequantize_4bit(q), np.float64)

    def dequantized_layer(xv, bv):  # float64, independent of the op
        return float(np.sum(cot * (xv @ w.T + bv)))

    grad_x, grad_b = jax.jit(
        jax.grad(lambda xx, bb: jnp.sum(jnp.asarray(cot, jnp.float32) * matmul_4bit(xx, q, bb)), (0, 1))
    )(x, bias)
    x64, b64, eps = np.asarray(x, np.float64), np.asarray(bias, np.float64), 1e-3
    fd_x = np.zeros_like(x64)
    for idx in np.ndindex(x64.shape):
        step = np.zeros_like(x64)
        step[idx] = eps
        fd_x[idx] = (dequantized_layer(x64 + step, b64) - dequantized_layer(x64 - step, b64)) / (2 * eps)
    fd_b = np.zeros_like(b64)
    for i in range(b64.size):
        step = np.zeros_like(b64)
        step[i] = eps
        fd_b[i] = (dequantized_layer(x64, b64 + step) - dequantized_layer(x64, b64 - step)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad_x), fd_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grad_b), fd_b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_gradients_keep_dtypes(dtype):
    q, bias = make_layer(out=24, k=64)
    x = inputs((3, 64), dtype)
    b = bias.astype(dtype)
    grad_x, grad_b = jax.jit(jax.grad(lambda xx, bb: jnp.sum(matmul_4bit(xx, q, bb).astype(jnp.float32)), (0, 1)))(x, b)
    assert grad_x.dtype == dtype and grad_b.dtype == dtype
    w = np.asarray(dequantize_4bit(q), np.float64)
    np.testing.assert_allclose(np.asarray(grad_x.astype(jnp.float32)), np.tile(w.sum(0), (3, 1)), rtol=2e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(grad_b.astype(jnp.float32)), np.full(24, 3.0), rtol=0)


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_backward_never_forms_a_weight_gradient():
    q, bias = make_layer(out=40, k=64)
    x = inputs((5, 64), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda xx, bb: jnp.sum(matmul_4bit(xx, q, bb) ** 2), (0, 1)))(x, bias)
    dots = [e for e in _all_eqns(jaxpr.jaxpr) if "dot_general" in str(e.primitive)]
    dot_shapes = [tuple(v.aval.shape) for e in dots for v in e.outvars]
    assert (5, 64) in dot_shapes  # the input gradient G @ W is there
    assert (40, 64) not in dot_shapes and (64, 40) not in dot_shapes  # G^T X never is


def test_quantized_weight_gets_zero_cotangent():
    q, bias = make_layer(out=16, k=64)
    x = inputs((2, 64), jnp.float32)
    grads = jax.jit(jax.grad(lambda qq: jnp.sum(matmul_4bit(x, qq, bias)), allow_int=True))(q)
    for leaf in jax.tree_util.tree_leaves(grads):
        if leaf.dtype != jax.dtypes.float0:
            assert not np.any(np.asarray(leaf))
    # Without a bias the input gradient is still G @ W.
    grad_x = jax.jit(jax.grad(lambda xx: jnp.sum(matmul_4bit(xx, q))))(x)
    w = np.asarray(dequantize_4bit(q))
    np.testing.assert_allclose(np.asarray(grad_x), np.tile(w.sum(0), (2, 1)), rtol=1e-5, atol=1e-5)


def test_dispatch_records_xla_for_forward_and_input_gradient(monkeypatch):
    q, bias = make_layer(out=16, k=64)
    x = inputs((2, 64), jnp.float32)
    with use_backend("xla"):
        jax.grad(lambda xx: jnp.sum(matmul_4bit(xx, q, bias)))(x)
    assert last_path("matmul_4bit") == "xla"
    assert last_path("matmul_4bit_grad_input") == "xla"
    if jax.default_backend() != "gpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no GPU, no interpreter: no kernel runtime
        assert dispatch.kernel_runtime() is None
        with pytest.raises(RuntimeError, match="triton"):
            matmul_4bit(x, q, bias, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        matmul_4bit(x, q, bias, backend="cuda")


def test_bad_inputs_raise_clear_errors():
    q, bias = make_layer(out=16, k=64)
    with pytest.raises(TypeError, match="x must have dtype"):
        matmul_4bit(jnp.ones((2, 64), jnp.int32), q, bias)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
        matmul_4bit(jnp.ones((2, 63)), q, bias)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        matmul_4bit(jnp.ones((2, 64)), q, jnp.ones(15))
    with pytest.raises(TypeError, match="bias must have dtype"):
        matmul_4bit(jnp.ones((2, 64)), q, jnp.ones(16, jnp.int32))
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        matmul_4bit(jnp.ones((2, 64)), q, bias, compute_dtype=jnp.int8)
    with pytest.raises(TypeError, match="Packed4bit"):
        matmul_4bit(jnp.ones((2, 64)), jnp.ones((16, 64)), bias)
    with pytest.raises(ValueError, match="2-D"):
        matmul_4bit(jnp.ones((2, 64)), quantize_4bit(jnp.ones((4, 4, 64))), None)


def test_jit_and_vmap():
    q, bias = make_layer()
    x = inputs((6, IN), jnp.float32)
    eager = matmul_4bit(x, q, bias)
    np.testing.assert_allclose(np.asarray(matmul(x, q, bias)), np.asarray(eager), rtol=1e-6, atol=1e-5)
    per_row = jax.jit(jax.vmap(matmul_4bit, in_axes=(0, None, None)))(x, q, bias)
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(eager), rtol=1e-6, atol=1e-5)
    # vmap over a stack of quantized weights (one per example).
    layers = [make_layer(seed=s, out=16, k=64) for s in range(3)]
    qs = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *[l[0] for l in layers])
    bs = jnp.stack([l[1] for l in layers])
    xs = inputs((3, 2, 64), jnp.float32)
    stacked = jax.jit(jax.vmap(matmul_4bit))(xs, qs, bs)
    for i, (qi, bi) in enumerate(layers):
        np.testing.assert_allclose(np.asarray(stacked[i]), np.asarray(matmul(xs[i], qi, bi)), rtol=1e-6, atol=1e-5)


def test_scan_over_stacked_quantized_layers_with_checkpoint_and_grad():
    layers = [make_layer(seed=s, out=64, k=64) for s in range(3)]
    qs = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *[l[0] for l in layers])
    bs = jnp.stack([l[1] for l in layers]) * 0.1
    x = inputs((3, 64), jnp.float32)

    def body(h, layer):
        q, b = layer
        return jnp.tanh(matmul_4bit(h, q, b) / 8.0), None

    def scanned(xx, bb, remat=False):
        step = jax.checkpoint(body) if remat else body
        return jnp.sum(jax.lax.scan(step, xx, (qs, bb))[0])

    def looped(xx, bb):
        h = xx
        for i, (q, _) in enumerate(layers):
            h = body(h, (q, bb[i]))[0]
        return jnp.sum(h)

    np.testing.assert_allclose(float(jax.jit(scanned)(x, bs)), float(jax.jit(looped)(x, bs)), rtol=1e-5)
    g_loop = jax.jit(jax.grad(looped, (0, 1)))(x, bs)
    for remat in (False, True):
        g_scan = jax.jit(jax.grad(lambda a, b: scanned(a, b, remat), (0, 1)))(x, bs)
        for got, want in zip(g_scan, g_loop):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_checkpoint_gradient_equals_plain_gradient():
    q, bias = make_layer()
    x = inputs((4, IN), jnp.float32)

    def loss(xx, bb):
        return jnp.sum(jnp.sin(matmul_4bit(xx, q, bb)))

    plain = jax.jit(jax.grad(loss, (0, 1)))(x, bias)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), (0, 1)))(x, bias)
    for a, b in zip(plain, remat):  # rematerialization may reorder float32 sums
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_named_sharding_on_eight_devices_gives_identical_outputs():
    assert len(jax.devices()) == 8, "tests/conftest.py must provide 8 host devices"
    # Auto axes (GSPMD propagation): with Explicit axes, the code-table gather inside
    # dequantize_4bit cannot infer its output sharding from row-sharded packed bytes.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    q, bias = make_layer(out=64, k=64, nested=True)  # 64 blocks, 2048 packed rows: divisible by 8
    x = inputs((16, 64), jnp.float32)
    f = jax.jit(matmul_4bit)
    expected = np.asarray(f(x, q, bias))
    replicated = NamedSharding(mesh, PartitionSpec())
    # Data parallel: batch split over the mesh, weight replicated.
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    y = f(x_sharded, jax.device_put(q, replicated), jax.device_put(bias, replicated))
    assert len(y.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(y), expected)
    # Weight split over the mesh: packed bytes and absmax codes by rows, bias by features.
    rows = NamedSharding(mesh, PartitionSpec("data"))
    q_sharded = q.replace(
        packed=jax.device_put(q.packed, NamedSharding(mesh, PartitionSpec("data", None))),
        absmax=jax.device_put(q.absmax, rows),
    )
    y = f(jax.device_put(x, replicated), q_sharded, jax.device_put(bias, rows))
    assert len(y.sharding.device_set) == 8
    # Per-device dots of other shapes may block the float32 sums differently: equal to rounding.
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
