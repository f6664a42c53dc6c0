"""Choosing between the XLA reference path and a GPU kernel, observably and per caller.

Every op in qflax.ops asks :func:`choose` which path to take. The answer follows, in order:
the op's ``backend=`` argument, the innermost :func:`use_backend` context, the
``QFLAX_BACKEND`` environment variable (read when the op is traced), then "auto".

Two questions are kept apart: whether the kernel *can* run the arguments (the op passes the
reason it cannot, or None) and whether it is *faster* there (the op's measured policy).
"triton" runs the kernel wherever it can run, even where auto would not pick it; "auto" takes
it only on a GPU where it can run and is faster; "xla" never does.

Scope: the context lives in a :class:`contextvars.ContextVar`, so it belongs to the calling
thread and, under asyncio, to the calling task; it never leaks into another request. It is also
entered into a JAX configuration state that is part of ``jax.jit``'s cache key, so a function
jitted once is traced again when called under a different backend. That state is per thread,
like JAX's own contexts (``jax.default_matmul_precision``); where the two could disagree (asyncio
tasks that await inside ``use_backend`` while another task traces, or a context copied into a
new thread) tracing raises a RuntimeError instead of caching one backend's program under the
other's key: there, pass ``backend=``.

Where the kernels run: on a GPU with Triton and jaxlib's CUDA Triton bindings, and on CPU in
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were imported (the
CI tests: there only an explicit "triton" runs them; "auto" stays on XLA).
"""

import contextlib
import contextvars
import importlib.util
import os
from typing import Iterator, Optional

BACKENDS = ("auto", "xla", "triton")
ENV_VAR = "QFLAX_BACKEND"

_context: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("qflax_backend", default=None)
_last_paths: contextvars.ContextVar[dict] = contextvars.ContextVar("qflax_last_paths", default={})


def _jit_key_state():
    """A JAX config state included in jit's cache key, and its "unset" marker (private JAX API)."""
    try:
        from jax._src import config

        state = config.enum_state("qflax_backend", list(BACKENDS), "auto", help="qflax backend context (cache key)",
                                  include_in_jit_key=True, include_in_trace_context=True)
        return state, config.config_ext.unset
    except Exception:  # noqa: BLE001 - a JAX without this API still dispatches correctly per trace
        return None, None


_JIT_KEY, _UNSET = _jit_key_state()


def _sync_jit_key() -> None:
    """Makes this thread's jit cache key say what the current context says.

    Set explicitly (not as a nested context manager) so contexts closed out of order, as
    asyncio tasks do, can never leave a stale value behind.
    """
    if _JIT_KEY is not None:
        context = _context.get()
        _JIT_KEY.set_local(_UNSET if context is None else context)


def _check_jit_key(op: str) -> None:
    """Raises if this trace would be cached under another backend than the one it runs.

    The cache key is per thread; the context per thread or task. They differ only when a
    context reached this thread by copying (``asyncio.to_thread``, ``copy_context().run``) or
    when asyncio tasks interleave inside ``use_backend`` blocks: tracing then would store one
    backend's program under the other's key.
    """
    if _JIT_KEY is None:
        return
    context = _context.get() or "auto"
    if _JIT_KEY.value != context:
        raise RuntimeError(
            f"{op}: this thread's jit cache key says backend {_JIT_KEY.value!r} but the current context says "
            f"{context!r} (a use_backend context copied into this thread, or asyncio tasks interleaving inside "
            "use_backend blocks). Enter use_backend in this thread or task without awaiting inside it, or pass "
            "backend= to the op.")


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for by argument, context or environment ("auto" if none)."""
    if backend is not None:
        return _check_backend(backend, "backend")
    context = _context.get()
    if context is not None:
        return context
    return _check_backend(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


def kernel_runtime() -> Optional[str]:
    """Where the Triton kernels can run in this process: "gpu", "interpreter" or None."""
    if not _importable("triton"):
        return None
    import jax

    if jax.default_backend() == "gpu":
        from jax._src.lib import gpu_triton

        return "gpu" if getattr(gpu_triton, "TritonKernel", None) is not None else None
    if os.environ.get("TRITON_INTERPRET") == "1" and _importable("torch"):
        return "interpreter"
    return None


def triton_available() -> bool:
    """True when JAX runs on a GPU where the Triton kernels can be launched."""
    return kernel_runtime() == "gpu"


def choose(op: str, backend: Optional[str] = None, unsupported: Optional[str] = None, faster: bool = True) -> str:
    """Picks "xla" or "triton" for one call of ``op`` and records it (see :func:`last_path`).

    Args:
      op: the op's name, e.g. "matmul_4bit".
      backend: "auto", "xla", "triton" or None (use context/environment).
      unsupported: why the kernel cannot run these arguments, or None when it can.
      faster: whether the kernel is measured faster than XLA here (auto's policy).

    Returns:
      "xla" or "triton".

    Raises:
      RuntimeError: "triton" was asked for but no kernel runtime (GPU, or the interpreter) exists.
      ValueError: "triton" was asked for arguments the kernel cannot run.
    """
    _check_jit_key(op)
    wanted = requested_backend(backend)
    if wanted == "xla":
        path = "xla"
    elif wanted == "triton":
        if kernel_runtime() is None:
            raise RuntimeError(f"{op}: backend 'triton' needs a GPU with triton installed (or TRITON_INTERPRET=1 "
                               "on CPU, for tests)")
        if unsupported is not None:
            raise ValueError(f"{op}: the Triton kernel cannot run these arguments: {unsupported}; "
                             "use backend='xla' or 'auto'")
        path = "triton"
    else:
        path = "triton" if unsupported is None and faster and triton_available() else "xla"
    _last_paths.set({**_last_paths.get(), op: path})
    return path


def last_path(op: str) -> Optional[str]:
    """The path ("xla" or "triton") chosen the last time ``op`` was traced in this thread or task.

    A debugging aid: a jitted function that is not traced again (cache hit) records nothing.
    """
    return _last_paths.get().get(op)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block (this thread or task only), ops choose ``name`` unless their ``backend=`` says otherwise.

    Example:
      >>> with use_backend("xla"):
      ...     y = matmul_4bit(x, q)
    """
    token = _context.set(_check_backend(name, "name"))
    _sync_jit_key()
    try:
        yield
    finally:
        _context.reset(token)
        _sync_jit_key()
