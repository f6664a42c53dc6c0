"""The backend choice is scoped to its caller (thread, asyncio task) and is part of jit's cache key.

Runs where the kernels run in Triton's interpreter (CPU, TRITON_INTERPRET=1 set by this folder's
conftest), so "triton" really launches the kernels and every path below can be observed.
"""

import asyncio
import concurrent.futures
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import ops
from qflax.ops import dispatch
from qflax.quant import fourbit

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="observes the interpreter path (CPU runs)")


def _layer():
    w = jax.random.normal(jax.random.key(0), (32, 64), jnp.float32)
    return fourbit.quantize_4bit(w, 64, "nf4", False)


def test_a_context_in_one_thread_does_not_change_another_threads_choice(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def holder():
        with ops.use_backend("xla"):
            seen["holder"] = dispatch.requested_backend()
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert entered.wait(10)
    try:
        seen["main"] = dispatch.requested_backend()
        with ops.use_backend("triton"):
            seen["main_inner"] = dispatch.requested_backend()
    finally:
        release.set()
        thread.join()
    assert seen == {"holder": "xla", "main": "auto", "main_inner": "triton"}


def test_asyncio_tasks_keep_their_own_context(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)

    async def task(name, backend, log, turns):
        with ops.use_backend(backend):
            for _ in range(turns):
                log.append((name, dispatch.requested_backend()))
                await asyncio.sleep(0)  # the other task runs here, inside its own context

    async def main():
        log = []
        await asyncio.gather(task("a", "xla", log, 3), task("b", "triton", log, 3))
        return log

    log = asyncio.run(main())
    assert {name for name, _ in log} == {"a", "b"} and len(log) == 6
    assert all(choice == {"a": "xla", "b": "triton"}[name] for name, choice in log)
    # The two tasks really interleaved (otherwise the test could not fail).
    assert [name for name, _ in log][:2] == ["a", "b"]
    # Closed out of order, the contexts left nothing behind: a new trace keys on "auto" again.
    assert dispatch._JIT_KEY is None or dispatch._JIT_KEY.value == "auto"


def test_a_trace_that_would_be_cached_under_another_backend_raises():
    """A context copied into a new thread disagrees with that thread's jit key: a clear error, not a wrong cache."""
    import contextvars

    q = _layer()
    x = jnp.ones((1, 64), jnp.float16)
    with ops.use_backend("xla"):
        copied = contextvars.copy_context()
    result = {}

    def in_thread():
        try:
            copied.run(lambda: ops.matmul_4bit(x, q))
        except RuntimeError as err:
            result["error"] = str(err)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    if dispatch._JIT_KEY is None:
        pytest.skip("this JAX has no configuration state for the jit key")
    assert "jit cache key" in result.get("error", "") and "backend=" in result["error"]


def test_a_function_jitted_once_is_traced_again_under_another_backend():
    q = _layer()
    x = jax.random.normal(jax.random.key(1), (2, 64), jnp.float32).astype(jnp.float16)
    f = jax.jit(lambda x: ops.matmul_4bit(x, q))
    y_auto = f(x)
    assert ops.last_path("matmul_4bit") == "xla"  # auto never picks the interpreter
    with ops.use_backend("triton"):
        y_kernel = f(x)
        assert ops.last_path("matmul_4bit") == "triton"
    f(x)  # back outside: the cached XLA trace, not the kernel one
    assert ops.last_path("matmul_4bit") == "triton"  # a cache hit records nothing...
    with ops.use_backend("xla"):
        f(x)
    assert ops.last_path("matmul_4bit") == "xla"  # ...a new context traces again
    # Both paths computed the same product (within fp16 rounding): the kernel really ran.
    np.testing.assert_allclose(np.asarray(y_kernel, np.float32), np.asarray(y_auto, np.float32), rtol=2e-2, atol=2e-2)


def test_last_path_answers_for_the_calling_thread():
    q = _layer()
    x = jnp.ones((1, 64), jnp.float16)
    barrier = threading.Barrier(2)
    seen = {}

    def run(name, backend):
        with ops.use_backend(backend):
            ops.matmul_4bit(x, q)
        barrier.wait(30)  # both have traced before either reads
        seen[name] = ops.last_path("matmul_4bit")

    threads = [threading.Thread(target=run, args=("x", "xla")), threading.Thread(target=run, args=("t", "triton"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"x": "xla", "t": "triton"}


def test_environment_variable_is_read_when_the_op_is_traced(monkeypatch):
    q = _layer()
    x = jnp.ones((1, 64), jnp.float16)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    ops.matmul_4bit(x, q)
    assert ops.last_path("matmul_4bit") == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "xla")
    ops.matmul_4bit(x, q)
    assert ops.last_path("matmul_4bit") == "xla"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="QFLAX_BACKEND must be one of"):
        ops.matmul_4bit(x, q)


def test_torch_compat_layers_from_a_thread_pool_match_sequential_calls():
    torch = pytest.importorskip("torch")
    import torch_compat as bnb

    torch.manual_seed(0)
    layer = bnb.nn.LinearNF4(64, 32, compute_dtype=torch.float32).to("cpu")  # quantizes, as in bitsandbytes
    inputs = [torch.randn(3, 64) for _ in range(8)]
    sequential = [layer(x).detach() for x in inputs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda x: layer(x).detach(), inputs))
    for a, b in zip(sequential, threaded):
        assert torch.equal(a, b)


def test_a_torch_backward_on_another_thread_keeps_the_forwards_backend(monkeypatch):
    """torch's autograd engine runs CUDA backwards on its own thread; the forward's choice must hold there."""
    torch = pytest.importorskip("torch")
    import torch_compat as bnb
    from torch_compat import bridge

    seen = []
    original = bridge.JaxOp.backward

    def spy(self, *args):
        seen.append(dispatch.requested_backend())
        return original(self, *args)

    monkeypatch.setattr(bridge.JaxOp, "backward", spy)
    torch.manual_seed(0)
    layer = bnb.nn.LinearNF4(64, 32, compute_dtype=torch.float32).to("cpu")  # quantizes
    x = torch.randn(3, 64, requires_grad=True)
    with ops.use_backend("xla"):
        y = layer(x)
    # As the autograd thread would: no `use_backend` context of the caller there.
    worker = threading.Thread(target=lambda: y.backward(torch.ones_like(y)))
    worker.start()
    worker.join()
    assert seen == ["xla"]
    assert x.grad is not None and torch.isfinite(x.grad).all()
