"""The three ways a torch_compat layer can compute, for comparing them in tests.

- :func:`direct`: the ``qflax::`` custom ops launch the Triton kernels on the torch tensors
  (here, CPU tensors in Triton's interpreter);
- :func:`jax_kernel`: DLPack to JAX, whose op runs the same kernel through its ``triton_call``
  primitive (same launch, so the results must be bit-identical);
- :func:`jax_xla`: DLPack to JAX, XLA reference path (the semantics; rounding may differ). Its
  float32 dots run at full precision: XLA's default on a GPU is TF32, while the kernels compute
  float32 exactly. The setting is process-wide while it runs, not a thread-local context:
  torch's autograd engine runs the backward of CUDA tensors on its own thread.

Each asserts which path ran, so a test cannot pass by comparing a path with itself.
"""

import contextlib

import jax
import torch

from qflax.ops import use_backend
from torch_compat import direct_path


def _run(layer, x, op, expected, grad=None):
    out = layer(x)
    assert direct_path.last_path(op) == expected
    if grad is not None:
        out.backward(grad)
    return out


def direct(layer, x, op, grad=None):
    with use_backend("triton"):
        return _run(layer, x, op, direct_path.KERNEL, grad)


def jax_kernel(layer, x, op, grad=None):
    with use_backend("triton"), direct_path.dlpack_only():
        return _run(layer, x, op, direct_path.DLPACK, grad)


@contextlib.contextmanager
def _full_precision_dots():
    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", before)


def jax_xla(layer, x, op, grad=None):
    with use_backend("xla"), _full_precision_dots():
        return _run(layer, x, op, direct_path.DLPACK, grad)


def grads(*tensors):
    """The ``.grad`` of each tensor (cloned), then clears them for the next path."""
    out = []
    for t in tensors:
        out.append(None if t is None or t.grad is None else t.grad.clone())
        if t is not None:
            t.grad = None
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())
