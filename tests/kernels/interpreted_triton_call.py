"""A CPU stand-in for ``jax_triton.triton_call``: runs the kernel in Triton's interpreter via ``pure_callback``.

Lets the CPU tests drive the real JAX launchers of ``qflax_kernels.int8_launch`` (argument order,
grids, metaparameters, output shapes, zeroed outputs, custom_vmap rules) without a GPU.
Import ``qflax_kernels.int8_launch`` inside :func:`installed`; the stand-in is registered only
for that import, so nothing else in the test session sees a fake ``jax_triton``.
"""

import contextlib
import sys
import threading
import types

import jax
import ml_dtypes
import numpy as np


# Triton's interpreter keeps the grid of the running launch in global state, and XLA may run
# independent callbacks on several threads: one launch at a time.
_LAUNCH_LOCK = threading.Lock()


def _to_torch(a):
    import torch

    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True, order="C"))


def _to_numpy(t):
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def triton_call(*args, kernel, out_shape, grid, name="", zeroed_outputs=(), num_warps=None, num_stages=None,
                enable_fp_fusion=True, **meta):
    import torch

    single = not isinstance(out_shape, (tuple, list))
    shapes = [out_shape] if single else list(out_shape)
    is_array = [isinstance(a, (jax.Array, np.ndarray)) or hasattr(a, "aval") for a in args]
    arrays = [a for a, arr in zip(args, is_array) if arr]

    def host(*host_arrays):
        it = iter(host_arrays)
        call_args = [_to_torch(next(it)) if arr else a for a, arr in zip(args, is_array)]
        outs = []
        for i, s in enumerate(shapes):
            dtype = getattr(torch, np.dtype(s.dtype).name)
            if i in zeroed_outputs:
                outs.append(torch.zeros(s.shape, dtype=dtype))
            else:  # poisoned, so an unwritten element shows
                outs.append(torch.full(s.shape, 77 if not dtype.is_floating_point else float("nan"), dtype=dtype))
        g = grid(meta) if callable(grid) else grid
        with _LAUNCH_LOCK:
            kernel[tuple(g) if isinstance(g, (tuple, list)) else (g,)](*call_args, *outs, **meta)
        return tuple(_to_numpy(o) for o in outs)

    result = jax.pure_callback(host, tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes), *arrays)
    return result[0] if single else result


@contextlib.contextmanager
def installed():
    """Within the block, ``import jax_triton`` gives this stand-in (the real one cannot run on CPU)."""
    saved = sys.modules.get("jax_triton")
    fake = types.ModuleType("jax_triton")
    fake.triton_call = triton_call
    fake.__version__ = "interpreted"
    sys.modules["jax_triton"] = fake
    try:
        yield
    finally:
        if saved is None:
            del sys.modules["jax_triton"]
        else:
            sys.modules["jax_triton"] = saved
