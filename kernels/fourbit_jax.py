"""JAX launchers for the 4-bit kernels: one ``triton_call`` each, with ``custom_vmap`` rules.

Arrays follow bitsandbytes' layout (see ``fourbit_triton``); nothing here knows of qflax. The
launch itself (plan, argument order, outputs) comes from ``fourbit_launch``; the call emits
exactly one kernel, with no XLA op around it (split-K is reduced in the kernel, unused pointers
reuse an input, every statistic is already float32 in the weight).

vmap (``qflax_kernels.batching``): batching x alone folds the batch into M (one launch);
batching the weight or bias runs one launch per batch element (``lax.map``).
"""

import functools

import jax
import jax.numpy as jnp

from qflax_kernels import fourbit_launch, fourbit_plan
from qflax_kernels.batching import batched_launcher
from qflax_kernels.triton_call import triton_call


def sm_count() -> int:
    """Multiprocessors of the default device (the split-K policy's target)."""
    return getattr(jax.devices()[0], "core_count", None) or fourbit_plan.DEFAULT_SM_COUNT


def _f32(a):
    # A no-op for weights made by qflax (statistics are stored as float32); a cast otherwise.
    return a if a is None or a.dtype == jnp.float32 else a.astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _matmul_fn(n: int, k: int, blocksize: int, nested: bool, has_bias: bool, override: tuple):
    """Launcher for one static configuration: f(x, packed, absmax, quant_map, nmap, nabs, noff, bias)."""

    def launch(x, packed, absmax, quant_map, nested_map, nested_absmax, nested_offset, bias):
        spec = fourbit_launch.matmul_launch(x.shape[0], n, k, blocksize, x_dtype=jnp.dtype(x.dtype).name,
                                            nested=nested, has_bias=has_bias, sm_count=sm_count(),
                                            override=dict(override))
        weight = fourbit_launch.weight_inputs(packed, absmax, quant_map, nested_map, nested_absmax, nested_offset)
        out, _, _ = triton_call(spec, *fourbit_launch.matmul_inputs(x, weight, bias if has_bias else None))
        return out

    return batched_launcher(launch, (0,))


@functools.lru_cache(maxsize=None)
def _grad_input_fn(n: int, k: int, blocksize: int, nested: bool, override: tuple):
    """Launcher for one static configuration: f(g, packed, absmax, quant_map, nmap, nabs, noff)."""

    def launch(g, packed, absmax, quant_map, nested_map, nested_absmax, nested_offset):
        spec = fourbit_launch.grad_input_launch(g.shape[0], n, k, blocksize, g_dtype=jnp.dtype(g.dtype).name,
                                                nested=nested, override=dict(override))
        weight = fourbit_launch.weight_inputs(packed, absmax, quant_map, nested_map, nested_absmax, nested_offset)
        (out,) = triton_call(spec, g, *weight)
        return out

    return batched_launcher(launch, (0,))


def _check(shape, blocksize, dtype):
    n, k = shape
    reason = fourbit_plan.unsupported_reason(n, k, blocksize, jnp.dtype(dtype).name)
    if reason:
        raise ValueError(reason)
    return n, k


def _weight_arrays(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset):
    """The weight's arrays as the launchers take them (unused nested slots: absmax)."""
    if nested_absmax is None:
        absmax = _f32(absmax)
        return packed.reshape(-1), absmax, _f32(quant_map), absmax, absmax, absmax
    return (packed.reshape(-1), absmax, _f32(quant_map), _f32(nested_quant_map), _f32(nested_absmax),
            _f32(jnp.reshape(nested_offset, (1,))))


def decode_nested_absmax(codes, nested_quant_map, nested_absmax, nested_offset):
    """Double-quantized absmax as float32, by the kernels' own formula (``NESTED`` in fourbit_triton).

    ``nested_quant_map[code] * nested_absmax[block // NESTED_BLOCKSIZE] + offset`` per block.

    Args:
      codes: uint8 (nblocks,) absmax codes.
      nested_quant_map: float32 (256,) table.
      nested_absmax: float32 (ceil(nblocks / NESTED_BLOCKSIZE),).
      nested_offset: float32 scalar or (1,).

    Returns:
      float32 (nblocks,).
    """
    codes = codes.reshape(-1)
    groups = jnp.arange(codes.shape[0], dtype=jnp.int32) // fourbit_launch.NESTED_BLOCKSIZE
    return (_f32(nested_quant_map)[codes.astype(jnp.int32)] * _f32(nested_absmax)[groups]
            + _f32(jnp.reshape(nested_offset, (1,)))[0])


def matmul_4bit(x, packed, absmax, quant_map, *, shape, blocksize, bias=None,
                nested_absmax=None, nested_quant_map=None, nested_offset=None, plan_override=None):
    """``x @ W.T + bias`` with W (N, K) in NF4/FP4 blocks, fused on the GPU.

    Args:
      x: (..., K) float16/bfloat16/float32 activations.
      packed: uint8 packed codes, any shape with N*K/2 elements.
      absmax: float32 (N*K/blocksize,) or, when nested, uint8 codes.
      quant_map: float32 (16,) code table.
      shape: (N, K), the weight's shape.
      blocksize: 64 or 128; must divide K.
      bias: optional (N,) bias (any float dtype; added in float32 in the kernel).
      nested_absmax, nested_quant_map, nested_offset: double-quantization statistics
        (float32 (ceil(nblocks/256),), (256,), scalar) or None.
      plan_override: optional dict of :class:`fourbit_plan.Plan` fields (tile sweeps), and
        ``use_asm`` (False decodes without inline PTX, for tests).

    Returns:
      (..., N) array of x's dtype.
    """
    n, k = _check(shape, blocksize, x.dtype)
    lead = x.shape[:-1]
    if nested_absmax is not None:
        # Double-quantized statistics are decoded by XLA before the kernel (one fused elementwise
        # op, about 4 bytes written per block), not inside it: per packed word the in-kernel
        # decode costs a code load, two gathers and their address arithmetic on the integer pipe
        # that bounds the decode kernels (H200, Llama-3-8B stack at M = 1: 6.2 ms against 3.8 ms
        # without double quantization).
        absmax = decode_nested_absmax(absmax, nested_quant_map, nested_absmax, nested_offset)
        nested_absmax = nested_quant_map = nested_offset = None
    weight = _weight_arrays(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset)
    fn = _matmul_fn(n, k, blocksize, nested_absmax is not None, bias is not None,
                    tuple(sorted((plan_override or {}).items())))
    # Without a bias the slot gets a weight array (never read), so a batch of x alone still folds into M.
    out = fn(x.reshape(-1, k), *weight, weight[1] if bias is None else bias)
    return out.reshape(*lead, n)


def grad_input_4bit(g, packed, absmax, quant_map, *, shape, blocksize,
                    nested_absmax=None, nested_quant_map=None, nested_offset=None, plan_override=None):
    """``g @ W`` (input gradient of ``x @ W.T``) with W (N, K) in NF4/FP4 blocks, fused.

    Args:
      g: (..., N) float16/bfloat16/float32 output gradient.
      packed, absmax, quant_map, shape, blocksize, nested_*: as in :func:`matmul_4bit`.
      plan_override: optional dict of :class:`fourbit_plan.Plan` fields.

    Returns:
      (..., K) array of g's dtype.
    """
    n, k = _check(shape, blocksize, g.dtype)
    lead = g.shape[:-1]
    weight = _weight_arrays(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset)
    fn = _grad_input_fn(n, k, blocksize, nested_absmax is not None, tuple(sorted((plan_override or {}).items())))
    out = fn(g.reshape(-1, n), *weight)
    return out.reshape(*lead, k)
