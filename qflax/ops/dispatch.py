"""Choosing between the XLA reference path and a GPU kernel, observably.

Every op in qflax.ops asks :func:`choose` which path to take. The answer follows, in order:
the op's ``backend=`` argument, the innermost :func:`use_backend` context, the
``QFLAX_BACKEND`` environment variable, then "auto" (the Triton kernel when a GPU and
jax-triton are present and the kernel supports the arguments, else XLA). The choice is made
at trace time and recorded, so ``last_path(op)`` tells tests and benchmarks what ran.
"""

import contextlib
import importlib.util
import os
from typing import Iterator, Optional

BACKENDS = ("auto", "xla", "triton")
ENV_VAR = "QFLAX_BACKEND"

_context_stack: list[str] = []
_last_path: dict[str, str] = {}


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for by argument, context or environment ("auto" if none)."""
    if backend is not None:
        return _check_backend(backend, "backend")
    if _context_stack:
        return _context_stack[-1]
    return _check_backend(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def triton_available() -> bool:
    """True when JAX runs on a GPU and jax-triton and triton can be imported."""
    import jax

    if jax.default_backend() != "gpu":
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("jax_triton", "triton"))


def choose(op: str, backend: Optional[str] = None, kernel_supports: bool = True) -> str:
    """Picks "xla" or "triton" for one call of ``op`` and records it.

    Args:
      op: the op's name, e.g. "matmul_4bit".
      backend: "auto", "xla", "triton" or None (use context/environment).
      kernel_supports: whether a kernel exists for these arguments (dtype, blocksize...).

    Returns:
      "xla" or "triton".

    Raises:
      RuntimeError: "triton" was forced but no GPU/jax-triton is available.
      ValueError: "triton" was forced for arguments the kernel does not support.
    """
    wanted = requested_backend(backend)
    if wanted == "xla":
        path = "xla"
    elif wanted == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' needs a GPU with jax-triton installed")
        if not kernel_supports:
            raise ValueError(f"{op}: no Triton kernel for these arguments; use backend='xla' or 'auto'")
        path = "triton"
    else:
        path = "triton" if kernel_supports and triton_available() else "xla"
    _last_path[op] = path
    return path


def last_path(op: str) -> Optional[str]:
    """The path ("xla" or "triton") chosen the last time ``op`` was traced, or None."""
    return _last_path.get(op)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ops choose ``name`` unless their ``backend=`` argument says otherwise.

    Example:
      >>> with use_backend("xla"):
      ...     y = matmul_4bit(x, q)
    """
    _context_stack.append(_check_backend(name, "name"))
    try:
        yield
    finally:
        _context_stack.pop()
