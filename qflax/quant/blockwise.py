"""8-bit blockwise quantization with a 256-entry code (docs/blockwise.md#blockwise).

Used on its own (``quantize_blockwise``) and for double quantization of 4-bit absmax
statistics (``compress_statistics=True``, docs/fourbit.md#double-quantization).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qflax.quant import codebooks, scaling, validation


@struct.dataclass
class Blockwise8bit:
    """An 8-bit blockwise-quantized tensor.

    Attributes:
      codes: uint8 array, same shape as the original tensor: indices into ``code``.
      absmax: float32 ``(ceil(n / blocksize),)`` absolute maximum of each block.
      code: float32 ``(256,)`` sorted code table (the dynamic map by default).
      shape: static; the original shape.
      dtype: static; the original dtype name ("float32", "float16", "bfloat16").
      blocksize: static; elements per block of the flattened tensor.
    """

    codes: jax.Array
    absmax: jax.Array
    code: jax.Array
    shape: tuple = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)
    blocksize: int = struct.field(pytree_node=False)


def pad_to_blocks(flat: jax.Array, blocksize: int) -> jax.Array:
    """Zero-pads a flat array to whole blocks and reshapes it to ``(nblocks, blocksize)``."""
    nblocks = -(-flat.size // blocksize)
    return jnp.pad(flat, (0, nblocks * blocksize - flat.size)).reshape(nblocks, blocksize)


def encode_with_code(scaled: jax.Array, code: jax.Array) -> jax.Array:
    """Nearest entry of a sorted code for each scaled value; ties go to the lower index.

    Args:
      scaled: float32 values in [-1, 1].
      code: float32 sorted code table.

    Returns:
      uint8 indices, same shape as ``scaled``.
    """
    mids = (code[:-1] + code[1:]) / jnp.float32(2)
    return jnp.searchsorted(mids, scaled, side="left").astype(jnp.uint8)


def quantize_flat(flat: jax.Array, code: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """Blockwise 8-bit quantization of a flat float32 array.

    An all-zero block gets absmax 0 and codes 0 (bitsandbytes does the same), with no NaN. A
    block holding NaN or +-Inf gets absmax NaN and codes 0, so it decodes to NaN
    (:mod:`qflax.quant.scaling`); blocks scale exactly up to float32's maximum.

    Args:
      flat: 1-D float32 array.
      code: float32 sorted code table.
      blocksize: elements per block.

    Returns:
      ``(codes, absmax)``: uint8 of ``flat``'s shape and float32 ``(nblocks,)``.
    """
    blocks = pad_to_blocks(flat.astype(jnp.float32), blocksize)
    absmax = scaling.absmax(blocks, axis=1)
    scaled = jnp.clip(scaling.scale_by_reciprocal(blocks, absmax[:, None]), -1.0, 1.0)
    codes = encode_with_code(scaled, code)
    codes = jnp.where(scaling.usable(absmax)[:, None], codes, jnp.uint8(0))
    return codes.reshape(-1)[: flat.size], absmax


def dequantize_flat(codes: jax.Array, absmax: jax.Array, code: jax.Array, blocksize: int) -> jax.Array:
    """float32 ``code[codes[i]] * absmax[i // blocksize]`` for flat ``codes``."""
    values = pad_to_blocks(jnp.take(code, codes.reshape(-1).astype(jnp.int32)), blocksize)
    return (values * absmax[:, None]).reshape(-1)[: codes.size]


def quantize_blockwise(
    x: jax.Array, code: Optional[jax.Array] = None, blocksize: int = 4096
) -> Blockwise8bit:
    """Quantizes a float tensor to 8-bit codes, one float32 absmax per block.

    Args:
      x: float32/float16/bfloat16 array, any shape, flattened row-major into blocks.
      code: 256-entry sorted float32 code; defaults to the dynamic map (docs/blockwise.md#dynamic-map).
      blocksize: one of 64, 128, ..., 4096.

    Returns:
      A :class:`Blockwise8bit` pytree.

    Example:
      >>> q = quantize_blockwise(jnp.linspace(-1, 1, 8192))
      >>> dequantize_blockwise(q).shape
      (8192,)
    """
    x = validation.check_float_array(x)
    validation.check_choice(blocksize, validation.BLOCKSIZES_8BIT, "blocksize")
    code = jnp.asarray(codebooks.DYNAMIC_MAP if code is None else code, dtype=jnp.float32)
    if code.shape != (256,):
        raise ValueError(f"code must have shape (256,), got {tuple(code.shape)}")
    return _quantize_blockwise(x, code, blocksize)


# Jitted for eager calls too, so eager and jitted results agree bit for bit (see fourbit.py).
@functools.partial(jax.jit, static_argnums=(2,))
def _quantize_blockwise(x: jax.Array, code: jax.Array, blocksize: int) -> Blockwise8bit:
    codes, absmax = quantize_flat(x.reshape(-1), code, blocksize)
    return Blockwise8bit(
        codes=codes.reshape(x.shape),
        absmax=absmax,
        code=code,
        shape=tuple(x.shape),
        dtype=np.dtype(x.dtype).name,
        blocksize=blocksize,
    )


@jax.jit
def dequantize_blockwise(q: Blockwise8bit) -> jax.Array:
    """Reconstructs the tensor of a :class:`Blockwise8bit` in its original shape and dtype."""
    values = dequantize_flat(q.codes, q.absmax, q.code, q.blocksize)
    return values.astype(q.dtype).reshape(q.shape)
