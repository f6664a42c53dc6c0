"""bitsandbytes checkpoint format <-> qflax pytrees, per tensor (docs/state_dict.md).

4-bit: ``to_bnb_state_dict`` writes exactly the entries bitsandbytes 0.49.2's
``Linear4bit`` saves under a weight key (the packed bytes, absmax, quant_map, nested
statistics and the packed-JSON ``quant_state.bitsandbytes__<type>`` entry, byte for byte),
and ``from_bnb_state_dict`` reads them back. 8-bit: ``to_bnb_int8_state_dict`` /
``from_bnb_int8_state_dict`` handle ``weight`` (int8), ``SCB`` and ``weight_format``.

Values may be numpy arrays, jax arrays or CPU torch tensors; results are fresh, writable numpy arrays.
"""

import json
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qflax import checkpoint_checks as checks
from qflax import checkpoint_checks_4bit as checks_4bit
from qflax.checkpoint_checks import to_numpy
from qflax.quant import codebooks
from qflax.quant.fourbit import Packed4bit
from qflax.quant.int8 import Int8Rows

QUANT_STATE_KEY = "quant_state.bitsandbytes__"
WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}

__all__ = [
    "QUANT_STATE_KEY", "WEIGHT_FORMATS", "encode_quant_state", "from_bnb_int8_state_dict", "from_bnb_state_dict",
    "quant_state_json", "read_quant_state", "to_bnb_int8_state_dict", "to_bnb_state_dict", "to_numpy",
    "weight_format_name",
]


def _packed_bytes(value: Any) -> np.ndarray:
    """The packed 4-bit data as uint8, whatever storage dtype it was saved in (quant_storage)."""
    if hasattr(value, "detach") and hasattr(value, "view"):  # torch: bf16 cannot go to numpy directly
        import torch  # only reached when the caller already holds torch tensors

        return value.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1, 1)
    arr = np.ascontiguousarray(np.asarray(value))
    return arr.view(np.uint8).reshape(-1, 1)


def _storage_view(packed: np.ndarray, storage: str) -> np.ndarray:
    """The packed bytes viewed as the checkpoint's storage dtype, shape ``(k, 1)`` (bitsandbytes' layout)."""
    dtype = ml_dtypes.bfloat16 if storage == "bfloat16" else np.dtype(storage)
    return np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1).view(dtype).reshape(-1, 1).copy()


def encode_quant_state(
    quant_type: Optional[str],
    blocksize: int,
    dtype: str,
    shape: Optional[Sequence[int]],
    nested: Optional[tuple[int, str, float]] = None,
) -> bytes:
    """The packed-JSON bytes bitsandbytes stores in ``quant_state.bitsandbytes__<type>`` (docs/state_dict.md).

    The only writer of this entry in qflax and torch_compat: ``json.dumps`` with Python's default
    separators and bitsandbytes' key order, so the bytes equal bitsandbytes' own.

    Args:
      quant_type: "nf4"/"fp4" (None for an 8-bit blockwise state, as bitsandbytes writes it).
      blocksize: elements per absmax block.
      dtype: the dequantization dtype's name ("float16", ...).
      shape: the tensor's shape (None if unknown).
      nested: ``(nested_blocksize, nested_dtype, nested_offset)`` of a double-quantized absmax.

    Returns:
      UTF-8 JSON bytes.
    """
    items = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": None}
    if shape is not None:
        items["shape"] = [int(s) for s in shape]
    if nested is not None:
        nested_blocksize, nested_dtype, nested_offset = nested
        items.update(nested_blocksize=nested_blocksize, nested_dtype=nested_dtype, nested_offset=float(nested_offset))
    return json.dumps(items).encode("utf-8")


def quant_state_json(q: Packed4bit) -> bytes:
    """The packed-JSON bytes of a 4-bit weight (:func:`encode_quant_state` of its settings)."""
    nested = (q.nested_blocksize, "float32", float(np.float32(q.nested_offset))) if q.nested else None
    return encode_quant_state(q.quant_type, q.blocksize, q.dtype, q.shape, nested)


def to_bnb_state_dict(q: Packed4bit, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The bitsandbytes state-dict entries of a 4-bit weight.

    Args:
      q: the quantized weight (for a layer, in bitsandbytes' ``(out, in)`` shape).
      prefix: the weight's key, e.g. ``"weight"`` or ``"model.layers.0.q_proj.weight"``.

    Returns:
      ``{prefix: ((n+1)//2 // itemsize, 1) of q.quant_storage (uint8 by default), prefix.absmax,
      prefix.quant_map, [prefix.nested_absmax, prefix.nested_quant_map],
      prefix.quant_state.bitsandbytes__<type>}`` as numpy arrays with bitsandbytes' dtypes and shapes.
    """
    out = {
        prefix: _storage_view(np.asarray(q.packed), q.quant_storage),
        f"{prefix}.absmax": np.array(q.absmax),
        f"{prefix}.quant_map": np.array(q.quant_map, dtype=np.float32),
    }
    if q.nested:
        out[f"{prefix}.nested_absmax"] = np.array(q.nested_absmax, dtype=np.float32)
        out[f"{prefix}.nested_quant_map"] = np.array(q.nested_quant_map, dtype=np.float32)
    out[f"{prefix}.{QUANT_STATE_KEY}{q.quant_type}"] = np.frombuffer(quant_state_json(q), dtype=np.uint8).copy()
    return out


def read_quant_state(d: Mapping[str, Any], prefix: str) -> tuple[str, checks_4bit.Layout4bit]:
    """The key and checked layout of the one ``<prefix>.quant_state.bitsandbytes__<type>`` entry of ``d``.

    Raises:
      MissingEntryError: there is not exactly one such entry.
      CheckpointError: its quant type is unknown or its JSON is bad (see :mod:`qflax.checkpoint_checks_4bit`).
    """
    state_keys = [k for k in d if k.startswith(f"{prefix}.{QUANT_STATE_KEY}")]
    if len(state_keys) != 1:
        raise checks.MissingEntryError(
            f"state dict must hold exactly one key {prefix}.{QUANT_STATE_KEY}nf4 or ...fp4, found {state_keys}"
        )
    key = state_keys[0]
    quant_type = key[len(f"{prefix}.{QUANT_STATE_KEY}") :]
    if quant_type not in codebooks.QUANT_TYPES:
        raise checks.CheckpointError(
            f"quant_type in key {key!r} must be one of {codebooks.QUANT_TYPES}, got {quant_type!r}"
        )
    return key, checks_4bit.parse_quant_state(d[key], key, quant_type)[1]


def from_bnb_state_dict(d: Mapping[str, Any], prefix: str = "weight") -> Packed4bit:
    """Reads a 4-bit weight saved by bitsandbytes (or by :func:`to_bnb_state_dict`).

    Every entry is checked against the quant state before anything is built (see
    :mod:`qflax.checkpoint_checks_4bit`). The stored ``quant_map`` and ``nested_quant_map`` are
    used as they are (a CPU-made checkpoint's nested map has -1.0 in entry 0; it is honoured).
    The packed data's storage dtype (quant_storage) is kept in ``Packed4bit.quant_storage``.
    Keys of other weights in ``d`` are ignored.

    Args:
      d: a mapping from keys to arrays/tensors (a whole model's state dict is fine).
      prefix: the weight's key, e.g. ``"weight"``.

    Returns:
      The :class:`Packed4bit`.

    Raises:
      KeyError (MissingEntryError): a required entry is missing.
      ValueError (CheckpointError): bad JSON, unknown quant type/dtype/blocksize, unknown keys
        under the prefix, a shape/dtype mismatch (TypeError too), or bad statistics/tables.
    """
    state_key, layout = read_quant_state(d, prefix)
    stats = {k[len(prefix) + 1 :]: v for k, v in d.items() if k.startswith(f"{prefix}.") and k != state_key}
    raw_packed = checks.require(d, prefix)
    checks_4bit.check_4bit_entries(layout, stats, prefix, packed=raw_packed)
    fields = dict(
        packed=jnp.asarray(_packed_bytes(raw_packed)),
        absmax=jnp.asarray(to_numpy(stats["absmax"])),
        quant_map=jnp.asarray(to_numpy(stats["quant_map"])),
        shape=tuple(layout.shape),
        dtype=layout.dtype,
        blocksize=layout.blocksize,
        quant_type=layout.quant_type,
        quant_storage=checks.dtype_name(raw_packed),
    )
    if layout.nested:
        fields.update(
            nested_absmax=jnp.asarray(to_numpy(stats["nested_absmax"])),
            nested_quant_map=jnp.asarray(to_numpy(stats["nested_quant_map"])),
            nested_offset=jnp.asarray(np.float32(layout.nested_offset)),
            nested_blocksize=layout.nested_blocksize,
        )
    return Packed4bit(**fields)


def to_bnb_int8_state_dict(q: Int8Rows, module_prefix: str = "") -> dict[str, np.ndarray]:
    """bitsandbytes ``Linear8bitLt`` entries: ``weight`` int8 (out, in), ``SCB`` float32 (out,), ``weight_format`` 0.

    Args:
      q: the row-quantized weight.
      module_prefix: prepended to every key, e.g. ``"model.fc1."``.

    Returns:
      A dict of numpy arrays (``weight_format`` is a 0-dim uint8 array holding 0, "row").
    """
    return {
        f"{module_prefix}weight": np.array(q.codes, dtype=np.int8),
        f"{module_prefix}SCB": np.array(q.scale, dtype=np.float32),
        f"{module_prefix}weight_format": np.array(0, dtype=np.uint8),
    }


def weight_format_name(value: Any) -> str:
    """Maps a stored ``weight_format`` (int, 0-dim array/tensor or string) to its name; only "row" loads."""
    if isinstance(value, str):
        name = value
    else:
        arr = to_numpy(value)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise checks.CheckpointTypeError(
                f"weight_format must be a 0-dim integer (0 = 'row') or a format name, got {arr.dtype.name} {arr.shape}"
            )
        code = int(arr.reshape(()).item())
        if code not in WEIGHT_FORMATS:
            raise ValueError(f"Expected supported weight format - got {code}")
        name = WEIGHT_FORMATS[code]
    if name != "row":
        raise ValueError(f"Only 'row' weight format is supported, got {name}")
    return name


def from_bnb_int8_state_dict(d: Mapping[str, Any], module_prefix: str = "", shape: tuple | None = None) -> Int8Rows:
    """Reads a bitsandbytes 8-bit weight (``weight`` int8, ``SCB``, optional ``weight_format``).

    Args:
      d: a mapping from keys to arrays/tensors.
      module_prefix: the layer's key prefix, e.g. ``"fc."``.
      shape: the target's ``(out, in)``, or None.

    Raises:
      KeyError (MissingEntryError): ``weight`` or ``SCB`` is missing.
      ValueError (CheckpointError): weight_format is not "row", wrong dtypes (TypeError too),
        SCB length != weight rows, a negative SCB, or another shape than ``shape``.
    """
    weight_format_name(d.get(f"{module_prefix}weight_format", "row"))
    codes = checks.require(d, f"{module_prefix}weight")
    scale = checks.require(d, f"{module_prefix}SCB")
    checks.check_int8_entries(codes, scale, module_prefix, shape)
    return Int8Rows(codes=jnp.asarray(to_numpy(codes)), scale=jnp.asarray(to_numpy(scale)))
