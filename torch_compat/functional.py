"""bitsandbytes.functional's names over torch tensors, computed by qflax.quant in JAX (docs/fourbit.md).

Results have bitsandbytes' dtypes, shapes and layouts; quantization follows qflax's rules
(bitsandbytes' CUDA rules with the exact FP4 table, odd counts padded; see README).
"""

from typing import Optional

import jax
import jax.numpy as jnp
import torch

from qflax import quant
from qflax.quant import blockwise as qblockwise
from qflax.quant import codebooks
from torch_compat import bridge
from torch_compat.quant_state import QuantState, dtype_name

__all__ = [
    "QuantState", "quantize_4bit", "dequantize_4bit", "quantize_fp4", "quantize_nf4", "get_4bit_type",
    "create_dynamic_map", "quantize_blockwise", "dequantize_blockwise", "int8_vectorwise_quant",
    "int8_vectorwise_dequant", "int8_linear_matmul", "int8_mm_dequant", "gemv_4bit",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The float32 16-entry table of "nf4" or "fp4" (exact FP4 values)."""
    if typename not in codebooks.QUANT_TYPES:
        raise NotImplementedError(f"Typename {typename} not supported")
    return torch.from_numpy(codebooks.table_4bit(typename)).to(device or "cpu")


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit dynamic map (the only configuration bitsandbytes' nn layers use)."""
    if (signed, max_exponent_bits, total_bits) != (True, 7, 8):
        raise ValueError("create_dynamic_map supports only signed=True, max_exponent_bits=7, total_bits=8")
    return torch.from_numpy(codebooks.DYNAMIC_MAP.copy())


def _check_float(A: torch.Tensor, what: str) -> None:
    if A.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"{what} only supports 16/32-bit floats, but got {A.dtype}")


def quantize_4bit(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantizes ``A`` to 4 bits in bitsandbytes' layout.

    Args:
      A: float32/float16/bfloat16 tensor (CPU or CUDA).
      absmax: if given, receives a copy of the absmax (deprecated in bitsandbytes).
      out: if given, receives a copy of the packed data (deprecated in bitsandbytes).
      blocksize: 32, 64, ..., 4096 (None means 64).
      compress_statistics: double-quantize the absmax.
      quant_type: "nf4" or "fp4".
      quant_storage: dtype the packed bytes are viewed as (uint8 by default).

    Returns:
      ``(packed ((n+1)//2 // itemsize, 1) of quant_storage, QuantState)`` on ``A``'s device.

    Raises:
      RuntimeError: ``A`` is not a 16/32-bit float tensor.
      ValueError: unknown ``quant_type`` or unsupported ``blocksize``.
    """
    _check_float(A, "Blockwise 4bit quantization")
    if quant_type not in codebooks.QUANT_TYPES:
        raise ValueError(f"quant_type must be nf4 or fp4, got {quant_type}")
    q = quant.quantize_4bit(
        bridge.to_jax(A), blocksize=64 if blocksize is None else blocksize, quant_type=quant_type,
        compress_statistics=compress_statistics,
    )
    state = QuantState.from_packed4bit(q)
    packed = bridge.to_torch(q.packed)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if packed.numel() % itemsize:
        raise ValueError(
            f"quant_storage {quant_storage} needs a packed byte count divisible by {itemsize}, got {packed.numel()}"
        )
    packed = packed.reshape(-1).view(quant_storage).reshape(-1, 1)
    if absmax is not None:
        absmax.copy_(state.absmax)
    if out is not None:
        out.copy_(packed)
    return packed, state


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """``quantize_4bit(..., quant_type="fp4")``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """``quantize_4bit(..., quant_type="nf4")``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Reconstructs the float tensor of packed 4-bit data.

    As in bitsandbytes, a packed input of shape ``(1, n)`` (the transposed weight that
    ``Linear4bit`` passes) gives a transposed result.

    Args:
      A: packed data (any quant_storage dtype).
      quant_state: the state from :func:`quantize_4bit`; if None, ``absmax`` and ``out`` are
        required and give the statistics, shape and dtype.
      absmax, out, blocksize, quant_type: the state's pieces when ``quant_state`` is None.

    Returns:
      Tensor of the state's shape and dtype (``out`` if given).
    """
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(
            absmax=absmax, shape=out.shape, dtype=out.dtype, blocksize=64 if blocksize is None else blocksize,
            code=get_4bit_type(quant_type, A.device), quant_type=quant_type,
        )
    if quant_state.quant_type not in codebooks.QUANT_TYPES:
        raise ValueError(f"quant_type must be nf4 or fp4, got {quant_state.quant_type}")
    result = bridge.to_torch(_dequantize_4bit_jit(quant_state.to_packed4bit(A)))
    if out is not None:
        out.copy_(result)
        result = out
    return result.t() if A.shape[0] == 1 else result


_dequantize_4bit_jit = jax.jit(quant.dequantize_4bit)


def quantize_blockwise(
    A: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization with a 256-entry code (dynamic map by default); never mutates ``code``.

    Returns:
      ``(uint8 codes of A's shape, QuantState(absmax, code, blocksize, dtype))``; with
      ``nested=True`` the absmax is itself quantized with the same blocksize.
    """
    _check_float(A, "Blockwise 8bit quantization")
    code_arr = None if code is None else bridge.to_jax(code.float())
    q = quant.quantize_blockwise(bridge.to_jax(A), code=code_arr, blocksize=blocksize)
    codes = bridge.to_torch(q.codes)
    absmax_t = bridge.to_torch(q.absmax)
    if nested:
        offset = absmax_t.mean()
        qabsmax, state2 = quantize_blockwise(absmax_t - offset, blocksize=blocksize)
        state = QuantState(absmax=qabsmax, code=bridge.to_torch(q.code), blocksize=blocksize, dtype=A.dtype,
                           offset=offset, state2=state2)
    else:
        state = QuantState(absmax=absmax_t, code=bridge.to_torch(q.code), blocksize=blocksize, dtype=A.dtype)
    if absmax is not None:
        absmax.copy_(state.absmax)
    if out is not None:
        out.copy_(codes)
        codes = out
    return codes, state


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> torch.Tensor:
    """``code[A[i]] * absmax[i // blocksize]`` in float32, cast to the state's dtype (float32 without a state)."""
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        code = create_dynamic_map().to(A.device) if code is None else code
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
    absmax_t = quant_state.absmax
    if quant_state.nested:
        absmax_t = dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    values = qblockwise.dequantize_flat(
        bridge.to_jax(A.reshape(-1)), bridge.to_jax(absmax_t.float()), bridge.to_jax(quant_state.code.float()),
        int(quant_state.blocksize),
    )
    result = bridge.to_torch(values.astype(dtype_name(quant_state.dtype))).reshape(A.shape)
    if out is not None:
        out.copy_(result)
        return out
    return result


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """Row-wise int8 quantization (leading dims flattened into rows) with outlier columns.

    Returns:
      ``(int8 (rows, cols), float32 row_stats (rows,), outlier_cols)`` where outlier_cols is
      a sorted int64 index tensor when ``threshold > 0`` (possibly empty), else None.
    """
    _check_float(A, "int8_vectorwise_quant")
    codes, stats, mask = quant.int8_vectorwise_quant(bridge.to_jax(A), threshold=float(threshold))
    cols = None
    if threshold > 0:
        cols = torch.from_numpy(quant.outlier_columns(mask)).to(A.device)
    return bridge.to_torch(codes), bridge.to_torch(stats), cols


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """float32 ``A * stats[:, None] / 127``."""
    return bridge.to_torch(quant.int8_vectorwise_dequant(bridge.to_jax(A), bridge.to_jax(stats)))


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
                       dtype=torch.int32) -> torch.Tensor:
    """Exact int32 ``A @ B.T`` of int8 tensors."""
    if A.dtype != torch.int8 or B.dtype != torch.int8:
        raise TypeError(f"A and B must be int8, got {A.dtype} and {B.dtype}")
    result = bridge.to_torch(quant.int8_linear_matmul(bridge.to_jax(A), bridge.to_jax(B)))
    if out is not None:
        out.copy_(result)
        return out
    return result


def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    out: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A * row_stats * col_stats / 127² (+ bias)`` returned as float16, like bitsandbytes (exact 1/127²)."""
    for name, t, dt in (("A", A, torch.int32), ("row_stats", row_stats, torch.float32),
                        ("col_stats", col_stats, torch.float32)):
        if t.dtype != dt:
            raise TypeError(f"{name} must be {dtype_name(dt)}, got {t.dtype}")
    acc = quant.int8_mm_dequant(bridge.to_jax(A), bridge.to_jax(row_stats), bridge.to_jax(col_stats),
                                None if bias is None else bridge.to_jax(bias))
    result = bridge.to_torch(acc.astype(jnp.float16))
    if out is not None:
        out.copy_(result)
        return out
    return result


def gemv_4bit(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None, transposed_A: bool = False,
              transposed_B: bool = False, state: Optional[QuantState] = None) -> torch.Tensor:
    """``A @ W.T`` for packed 4-bit ``B`` (the weight's packed data, possibly ``.t()``) and its state.

    Returns:
      ``(*A.shape[:-1], out_features)`` in ``A.dtype``.

    Raises:
      ValueError: ``state`` is None.
    """
    if state is None:
        raise ValueError("state cannot be None. gemv_4bit() requires the state from quantize_4bit()")
    from torch_compat import forwards

    result = bridge.call(bridge.jax_op(forwards.linear_4bit, compute_dtype=None), state.to_packed4bit(B), A, None)
    if out is not None:
        out.copy_(result)
        return out
    return result

