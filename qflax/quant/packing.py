"""Nibble packing in bitsandbytes' order: element 2j in the HIGH nibble of byte j.

XLA's int4 layout puts the even element in the low nibble, so we never bitcast int4
pairs; these two functions are the only place the byte order is decided.
"""

import jax
import jax.numpy as jnp


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Packs 4-bit codes two to a byte.

    Args:
      codes: uint8 array of codes in [0, 16) with an even number of elements (flat).

    Returns:
      uint8 array of shape ``(codes.size // 2,)``: ``(codes[2j] << 4) | codes[2j + 1]``.
    """
    pairs = codes.reshape(-1, 2).astype(jnp.uint8)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_nibbles`.

    Args:
      packed: uint8 array of any shape (read flat).

    Returns:
      uint8 array of shape ``(2 * packed.size,)`` with codes in [0, 16).
    """
    flat = packed.reshape(-1).astype(jnp.uint8)
    return jnp.stack([flat >> 4, flat & 0x0F], axis=-1).reshape(-1)
