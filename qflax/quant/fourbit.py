"""4-bit NF4/FP4 blockwise quantization in bitsandbytes' exact layout (docs/fourbit.md).

Layout: the tensor is flattened row-major and cut into blocks of ``blocksize``
consecutive elements; each block has one float32 absmax; codes are packed two per byte,
element 2j in the high nibble of byte j, into a uint8 array of shape ``((n + 1) // 2, 1)``.
An odd element count is padded with the code of 0 (as CUDA does; bitsandbytes' CPU path
raises instead). With ``compress_statistics=True`` the absmax vector is itself quantized
to 8 bits (double quantization): ``absmax - mean(absmax)`` in blocks of 256 with the
dynamic map.

Non-finite and extreme input (:mod:`qflax.quant.scaling`), the same eagerly and under
``jax.jit``: a block holding a NaN or +-Inf gets a NaN absmax and the code of zero, so it
decodes to NaN throughout while every other block is unchanged; with double quantization the
NaN reaches the nested absmax of its group of 256 blocks (which all decode to NaN) and the
shared offset is the mean of the finite absmax values. Blocks are scaled exactly up to
float32's maximum.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qflax.quant import blockwise, codebooks, packing, scaling, validation

NESTED_BLOCKSIZE = 256
# The code whose table value is exactly 0.0.
ZERO_CODE = {"nf4": 7, "fp4": 0}


@struct.dataclass
class Packed4bit:
    """A 4-bit quantized tensor with its statistics (bitsandbytes' QuantState plus data).

    Attributes:
      packed: uint8 ``((n + 1) // 2, 1)``: two codes per byte, high nibble first.
      absmax: float32 ``(nblocks,)``, or uint8 ``(nblocks,)`` codes when nested.
      quant_map: float32 ``(16,)`` code table used to decode (taken from a checkpoint
        when loaded, so a stored table is always honoured).
      nested_absmax: float32 ``(ceil(nblocks / 256),)`` when nested, else None.
      nested_quant_map: float32 ``(256,)`` dynamic map when nested, else None.
      nested_offset: float32 scalar added back to the decoded absmax, else None.
      shape: static; original shape (bitsandbytes' ``(out, in)`` for a weight).
      dtype: static; original dtype name ("float32", "float16" or "bfloat16").
      blocksize: static; elements per absmax block.
      quant_type: static; "nf4" or "fp4".
      nested_blocksize: static; block size of the nested statistics (256).
      quant_storage: static; the dtype name a checkpoint stores the packed bytes as
        (bitsandbytes' quant_storage, "uint8" by default); ``packed`` is always uint8 here.
    """

    packed: jax.Array
    absmax: jax.Array
    quant_map: jax.Array
    nested_absmax: jax.Array | None = None
    nested_quant_map: jax.Array | None = None
    nested_offset: jax.Array | None = None
    shape: tuple = struct.field(pytree_node=False, default=())
    dtype: str = struct.field(pytree_node=False, default="float32")
    blocksize: int = struct.field(pytree_node=False, default=64)
    quant_type: str = struct.field(pytree_node=False, default="nf4")
    nested_blocksize: int = struct.field(pytree_node=False, default=NESTED_BLOCKSIZE)
    quant_storage: str = struct.field(pytree_node=False, default="uint8")

    @property
    def nested(self) -> bool:
        """True when the absmax statistics are double-quantized."""
        return self.nested_absmax is not None

    @property
    def size(self) -> int:
        """Number of elements of the original tensor."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nblocks(self) -> int:
        """Number of absmax blocks."""
        return -(-self.size // self.blocksize)


def encode_nf4(scaled: jax.Array) -> jax.Array:
    """NF4 code of each scaled value: the number of CUDA thresholds strictly below it."""
    codes = jnp.zeros(scaled.shape, jnp.uint8)
    for threshold in codebooks.NF4_THRESHOLDS:
        codes = codes + (scaled > threshold).astype(jnp.uint8)
    return codes


def encode_fp4(scaled: jax.Array) -> jax.Array:
    """FP4 code of each scaled value by the CUDA rules: sign bit for s < 0, magnitude by threshold."""
    magnitude = jnp.abs(scaled)
    rank = jnp.zeros(scaled.shape, jnp.int32)
    for threshold in codebooks.FP4_MAGNITUDE_THRESHOLDS:
        rank = rank + (magnitude > threshold).astype(jnp.int32)
    codes = jnp.take(jnp.asarray(codebooks.FP4_MAGNITUDE_CODES), rank)
    return codes | jnp.where(scaled < 0, jnp.uint8(codebooks.FP4_SIGN_BIT), jnp.uint8(0))


def _validate(blocksize: int, quant_type: str) -> None:
    validation.check_choice(quant_type, codebooks.QUANT_TYPES, "quant_type")
    validation.check_choice(blocksize, validation.BLOCKSIZES_4BIT, "blocksize")


def quantize_4bit(
    x: jax.Array, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False
) -> Packed4bit:
    """Quantizes a float tensor to 4 bits in bitsandbytes' layout.

    Args:
      x: float32/float16/bfloat16 array of any non-empty shape.
      blocksize: elements per absmax block: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
      quant_type: "nf4" or "fp4".
      compress_statistics: double-quantize the absmax vector (8-bit, blocks of 256).

    Returns:
      A :class:`Packed4bit` pytree; ``dequantize_4bit`` inverts it.

    Raises:
      TypeError: ``x`` is not a float array.
      ValueError: bad ``blocksize``/``quant_type`` or empty ``x`` (values never raise: see the
        module docstring for NaN/Inf).

    Example:
      >>> q = quantize_4bit(jnp.ones((64, 64)), quant_type="nf4")
      >>> q.packed.shape, q.absmax.shape
      ((2048, 1), (64,))
    """
    _validate(blocksize, quant_type)
    x = validation.check_float_array(x)
    return _quantize_4bit(x, blocksize, quant_type, bool(compress_statistics))


# Jitted even for eager calls: XLA contracts multiply-adds into FMAs when it compiles, so an
# eager op-by-op run would differ from a jitted one in the last bit.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_4bit(x: jax.Array, blocksize: int, quant_type: str, compress_statistics: bool) -> Packed4bit:
    n = x.size
    blocks = blockwise.pad_to_blocks(x.reshape(-1).astype(jnp.float32), blocksize)
    absmax = scaling.absmax(blocks, axis=1)
    # Reciprocal first, then multiply: the CUDA kernel's order, needed for identical codes.
    scaled = scaling.scale_by_reciprocal(blocks, absmax[:, None])
    codes = encode_nf4(scaled) if quant_type == "nf4" else encode_fp4(scaled)
    # An all-zero block gets the code of 0.0 (NF4 7, FP4 0), so it decodes to exact zeros even
    # when its absmax comes back from double quantization slightly off zero. (bitsandbytes'
    # CUDA kernel computes 0 * inf = NaN there and emits code 0, which is -1.0 in NF4.) A
    # non-finite block (NaN absmax) gets it too, and decodes to 0 * NaN = NaN.
    zero_code = jnp.uint8(ZERO_CODE[quant_type])
    codes = jnp.where(scaling.usable(absmax)[:, None], codes, zero_code)
    codes = codes.reshape(-1)[: n + n % 2]
    packed = packing.pack_nibbles(codes).reshape(-1, 1)
    common = dict(
        packed=packed,
        quant_map=jnp.asarray(codebooks.table_4bit(quant_type)),
        shape=tuple(x.shape),
        dtype=np.dtype(x.dtype).name,
        blocksize=blocksize,
        quant_type=quant_type,
    )
    if not compress_statistics:
        return Packed4bit(absmax=absmax, **common)
    return Packed4bit(**common, **_double_quantize(absmax))


def _double_quantize(absmax: jax.Array) -> dict:
    """8-bit codes of absmax - mean(absmax), blocks of 256 (docs/fourbit.md#double-quantization)."""
    finite = jnp.isfinite(absmax)
    count = jnp.maximum(jnp.sum(finite), 1).astype(jnp.float32)
    kept = jnp.where(finite, absmax, 0)
    # Huge statistics are summed at 2**-64 of their size (exact), so the sum cannot overflow.
    factor = jnp.where(jnp.max(kept, initial=np.float32(0)) > np.float32(2.0**100), np.float32(2.0**-64), 1)
    kept = kept * factor.astype(jnp.float32)
    # Two-pass mean (the second pass sums the residuals), so the float32 offset is correctly
    # rounded in practice whatever order the backend sums in.
    rough = jnp.sum(kept) / count
    offset = (rough + jnp.sum(jnp.where(finite, kept - rough, 0)) / count) / factor.astype(jnp.float32)
    nested_map = jnp.asarray(codebooks.DYNAMIC_MAP)
    # A non-finite block keeps its NaN, which makes its group's nested absmax NaN.
    centred = jnp.where(finite, absmax - offset, jnp.float32(jnp.nan))
    codes, nested_absmax = blockwise.quantize_flat(centred, nested_map, NESTED_BLOCKSIZE)
    return dict(
        absmax=codes,
        nested_absmax=nested_absmax,
        nested_quant_map=nested_map,
        nested_offset=offset.astype(jnp.float32),
    )


def dequantize_absmax(q: Packed4bit) -> jax.Array:
    """float32 absmax per block, decoding double-quantized statistics when present.

    Args:
      q: a :class:`Packed4bit`.

    Returns:
      float32 array of shape ``(q.nblocks,)``.
    """
    if not q.nested:
        return q.absmax.astype(jnp.float32).reshape(-1)  # flat also for a row view (qflax.sharding)
    decoded = blockwise.dequantize_flat(q.absmax, q.nested_absmax, q.nested_quant_map, q.nested_blocksize)
    return decoded + q.nested_offset.astype(jnp.float32)


def unpack_codes(q: Packed4bit) -> jax.Array:
    """The uint8 4-bit codes of ``q``, flat, without the padding nibble of an odd count."""
    return packing.unpack_nibbles(q.packed)[: q.size]


def dequantize_4bit(q: Packed4bit) -> jax.Array:
    """Reconstructs the tensor of a :class:`Packed4bit` in its original shape and dtype.

    ``table[code] * absmax`` is computed in float32 and then cast, as bitsandbytes' CUDA
    and CPU kernels do.

    Args:
      q: a :class:`Packed4bit`.

    Returns:
      Array of shape ``q.shape`` and dtype ``q.dtype``.

    Raises:
      TypeError: ``q`` is not a Packed4bit.
      ValueError: its arrays do not match its shape, blocksize or quant type (e.g. an absmax
        of the wrong length), or a static field is out of range.
    """
    check_structure(q, "q")
    return _dequantize_4bit(q)


def check_structure(q: Packed4bit, name: str) -> Packed4bit:
    """Raises unless ``q`` is a Packed4bit whose arrays fit its static fields (dtypes and shapes only)."""
    from qflax import checkpoint_checks_4bit  # imports qflax.quant itself: imported when first needed

    if not isinstance(q, Packed4bit):
        raise TypeError(f"{name} must be a qflax.quant.Packed4bit, got {type(q).__name__}")
    from qflax.quant import fourbit_rows  # the row view (qflax.sharding): checked as the flat bytes it holds

    checkpoint_checks_4bit.check_packed4bit(fourbit_rows.flat_shapes(q, name), name, values=False)
    return q


@jax.jit
def _dequantize_4bit(q: Packed4bit) -> jax.Array:
    values = jnp.take(q.quant_map.astype(jnp.float32), unpack_codes(q).astype(jnp.int32))
    blocks = blockwise.pad_to_blocks(values, q.blocksize) * dequantize_absmax(q)[:, None]
    return blocks.reshape(-1)[: q.size].astype(q.dtype).reshape(q.shape)
