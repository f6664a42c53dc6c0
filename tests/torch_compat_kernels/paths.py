"""The three ways a torch_compat layer can compute, for comparing them in tests.

- :func:`direct`: the ``qflax::`` custom ops launch the Triton kernels on the torch tensors
  (here, CPU tensors in Triton's interpreter);
- :func:`jax_kernel`: DLPack to JAX, whose op runs the same kernel through its ``triton_call``
  primitive (same launch, so the results must be bit-identical);
- :func:`jax_xla`: DLPack to JAX, XLA reference path (the semantics; rounding may differ).

Each asserts which path ran, so a test cannot pass by comparing a path with itself.
"""

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


def jax_xla(layer, x, op, grad=None):
    with use_backend("xla"):
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
