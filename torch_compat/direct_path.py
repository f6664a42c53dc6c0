"""Which path a torch_compat layer call takes: the Triton kernels on the torch tensors, or DLPack to JAX.

The direct path launches qflax's kernels on the layer's tensors through the ``qflax::`` custom
ops (:mod:`torch_compat.fourbit_ops`, :mod:`torch_compat.int8_ops`): no DLPack crossing, no
jitted JAX call, nothing read on the host, so torch.compile and CUDA graphs capture it. It is
taken where the JAX op would run the same kernel:

- the backend asked for (``backend`` of :func:`qflax.ops.use_backend`, ``QFLAX_BACKEND``) is not
  "xla";
- the kernels can run the arguments (``qflax.ops.fourbit_kernels.unsupported_reason``,
  ``qflax.ops.int8_kernels.unsupported_reason``);
- "auto": the tensors are on a CUDA GPU the kernels support, and for 4-bit the rows are within
  the measured policy (``fourbit_kernels.max_kernel_rows``, what ``is_faster`` applies);
- "triton": on CUDA, or on CPU tensors when the kernels run in Triton's interpreter (tests).

Everywhere else the layer computes through JAX by DLPack, as before; :func:`dlpack_only` (or
``QFLAX_TORCH_DIRECT=0``) keeps every call on that path, e.g. to compare the two. The decisions read only
shapes, dtypes and Python settings: the settings functions are constants to torch.compile
(``assume_constant_result``), so a compiled graph keeps the path it was compiled with.
:func:`last_path` says which path the last eager call took ("kernel" or "dlpack").
"""

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import torch

from qflax.ops import dispatch, fourbit_kernels, int8_kernels
from qflax.quant.fourbit import Packed4bit
from qflax_kernels import fourbit_plan
from torch_compat import kernel_launch

KERNEL, DLPACK = "kernel", "dlpack"
LINEAR_4BIT, LINEAR_8BIT = "linear_4bit", "linear_8bit"

ENV_VAR = "QFLAX_TORCH_DIRECT"

_last_paths: dict = {}
_direct_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("qflax_torch_direct", default=True)


def last_path(op: str) -> Optional[str]:
    """"kernel" or "dlpack": the path the last eager call of ``op`` ("linear_4bit", "linear_8bit") took."""
    return _last_paths.get(op)


@contextlib.contextmanager
def dlpack_only() -> Iterator[None]:
    """Within the block (this thread or task), every torch_compat call computes through JAX by DLPack."""
    token = _direct_allowed.set(False)
    try:
        yield
    finally:
        _direct_allowed.reset(token)


@torch.compiler.assume_constant_result
def _requested_backend() -> str:
    setting = os.environ.get(ENV_VAR)
    if not _direct_allowed.get() or setting == "0":
        return "dlpack"
    return dispatch.requested_backend()


@functools.lru_cache(maxsize=None)
def _device_supported_cached(device_type: str, index: int, dtype_name: str) -> bool:
    return kernel_launch.device_supported(torch.device(device_type, None if index < 0 else index), dtype_name)


@torch.compiler.assume_constant_result
def _device_supported(device_type: str, index: int, dtype_name: str) -> bool:
    return _device_supported_cached(device_type, index, dtype_name)


@functools.lru_cache(maxsize=None)
def _fourbit_reason(n: int, k: int, blocksize: int, dtype_name: str, quant_map_size: int, nested_blocksize: int):
    # qflax's own check, on stand-ins with the shapes that it reads (one row: rows are checked apart).
    q = Packed4bit(packed=None, absmax=None, quant_map=jax.ShapeDtypeStruct((quant_map_size,), jnp.float32),
                   shape=(n, k), blocksize=blocksize)
    reason = fourbit_kernels.unsupported_reason(jax.ShapeDtypeStruct((1, k), jnp.dtype(dtype_name)), q, dtype_name)
    if reason is None and nested_blocksize not in (0, fourbit_plan.NESTED_BLOCKSIZE):
        reason = f"the kernels decode double quantization with blocks of {fourbit_plan.NESTED_BLOCKSIZE}, got " \
                 f"{nested_blocksize}"
    return reason


@torch.compiler.assume_constant_result
def fourbit_unsupported(n: int, k: int, blocksize: int, dtype_name: str, quant_map_size: int,
                         nested_blocksize: int) -> bool:
    return _fourbit_reason(n, k, blocksize, dtype_name, quant_map_size, nested_blocksize) is not None


@torch.compiler.assume_constant_result
def fourbit_max_rows(n: int, dtype_name: str) -> int:
    return _fourbit_max_rows(n, dtype_name)


_fourbit_max_rows = functools.lru_cache(maxsize=None)(fourbit_kernels.max_kernel_rows)


@functools.lru_cache(maxsize=None)
def _int8_reason(dtype_name: str, in_features: int, out_features: int) -> Optional[str]:
    return int8_kernels.unsupported_reason(dtype_name, in_features, out_features)


@torch.compiler.assume_constant_result
def int8_unsupported(dtype_name: str, in_features: int, out_features: int) -> bool:
    return _int8_reason(dtype_name, in_features, out_features) is not None


def _record(op: str, path: str) -> None:
    if not torch.compiler.is_compiling():
        _last_paths[op] = path


def use_kernel(op: str, device: torch.device, dtype_name: str, supported: bool, faster: bool) -> bool:
    """Whether this call of ``op`` takes the direct kernel path (and records the answer).

    Args:
      op: LINEAR_4BIT or LINEAR_8BIT.
      device: the tensors' device.
      dtype_name: the compute dtype.
      supported: the kernels can run these arguments.
      faster: the measured policy picks the kernels for this many rows.

    Returns:
      True for the kernel path, False for DLPack to JAX (which then applies the same backend
      request, and raises where "triton" was asked for arguments no kernel can run).
    """
    wanted = _requested_backend()
    take = (wanted not in ("xla", "dlpack") and supported
            and _device_supported(device.type, -1 if device.index is None else device.index, dtype_name)
            and (wanted == "triton" or (device.type == "cuda" and faster)))
    _record(op, KERNEL if take else DLPACK)
    return take
