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
import numpy as np

from qflax.quant import codebooks, validation
from qflax.quant.fourbit import NESTED_BLOCKSIZE, Packed4bit
from qflax.quant.int8 import Int8Rows

QUANT_STATE_KEY = "quant_state.bitsandbytes__"
WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}
_SUFFIXES_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def to_numpy(value: Any) -> np.ndarray:
    """A numpy view of a numpy/jax array or CPU torch tensor (non-uint8 torch storage viewed as bytes is kept)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _packed_bytes(value: Any) -> np.ndarray:
    """The packed 4-bit data as uint8, whatever storage dtype it was saved in (quant_storage)."""
    if hasattr(value, "detach") and hasattr(value, "view"):  # torch: bf16 cannot go to numpy directly
        import torch  # only reached when the caller already holds torch tensors

        return value.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1, 1)
    arr = np.ascontiguousarray(np.asarray(value))
    return arr.view(np.uint8).reshape(-1, 1)


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
      ``{prefix: uint8 ((n+1)//2, 1), prefix.absmax, prefix.quant_map,
      [prefix.nested_absmax, prefix.nested_quant_map], prefix.quant_state.bitsandbytes__<type>}``
      as numpy arrays with bitsandbytes' dtypes and shapes.
    """
    out = {
        prefix: np.array(q.packed, dtype=np.uint8),
        f"{prefix}.absmax": np.array(q.absmax),
        f"{prefix}.quant_map": np.array(q.quant_map, dtype=np.float32),
    }
    if q.nested:
        out[f"{prefix}.nested_absmax"] = np.array(q.nested_absmax, dtype=np.float32)
        out[f"{prefix}.nested_quant_map"] = np.array(q.nested_quant_map, dtype=np.float32)
    out[f"{prefix}.{QUANT_STATE_KEY}{q.quant_type}"] = np.frombuffer(quant_state_json(q), dtype=np.uint8).copy()
    return out


def _require(d: Mapping[str, Any], key: str) -> Any:
    if key not in d:
        raise KeyError(f"state dict is missing the key {key!r}")
    return d[key]


def _check_array(arr: np.ndarray, key: str, shape: tuple, dtype: str) -> None:
    if tuple(arr.shape) != shape or arr.dtype.name != dtype:
        raise ValueError(
            f"state dict entry {key!r} must be {dtype} of shape {shape}, got {arr.dtype.name} {tuple(arr.shape)}"
        )


def _read_quant_state(d: Mapping[str, Any], prefix: str) -> tuple[str, dict]:
    state_keys = [k for k in d if k.startswith(f"{prefix}.{QUANT_STATE_KEY}")]
    if len(state_keys) != 1:
        raise KeyError(
            f"state dict must hold exactly one key {prefix}.{QUANT_STATE_KEY}nf4 or ...fp4, found {state_keys}"
        )
    key = state_keys[0]
    quant_type = key[len(f"{prefix}.{QUANT_STATE_KEY}") :]
    validation.check_choice(quant_type, codebooks.QUANT_TYPES, f"quant_type in key {key!r}")
    try:
        meta = json.loads(to_numpy(d[key]).astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"state dict entry {key!r} is not valid UTF-8 JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"state dict entry {key!r} must hold a JSON object, got {type(meta).__name__}")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"state dict entry {key!r} lacks the JSON field {field!r}")
    if meta["quant_type"] != quant_type:
        raise ValueError(f"{key!r} says quant_type {meta['quant_type']!r} but its key names {quant_type!r}")
    return key, meta


def from_bnb_state_dict(d: Mapping[str, Any], prefix: str = "weight") -> Packed4bit:
    """Reads a 4-bit weight saved by bitsandbytes (or by :func:`to_bnb_state_dict`).

    The stored ``quant_map`` and ``nested_quant_map`` are used as they are (a CPU-made
    checkpoint's nested map has -1.0 in entry 0; it is honoured). Keys of other weights in
    ``d`` are ignored.

    Args:
      d: a mapping from keys to arrays/tensors (a whole model's state dict is fine).
      prefix: the weight's key, e.g. ``"weight"``.

    Returns:
      The :class:`Packed4bit`.

    Raises:
      KeyError: a required entry is missing.
      ValueError: bad JSON, unknown quant type/dtype/blocksize, unknown keys under the
        prefix, or a shape/dtype mismatch.
    """
    state_key, meta = _read_quant_state(d, prefix)
    quant_type = meta["quant_type"]
    validation.check_choice(meta["blocksize"], validation.BLOCKSIZES_4BIT, "blocksize (checkpoint)")
    validation.check_choice(meta["dtype"], validation.FLOAT_DTYPES, "dtype (checkpoint)")
    shape = tuple(int(s) for s in meta["shape"])
    n = int(np.prod(shape, dtype=np.int64))
    nblocks = -(-n // meta["blocksize"])
    nested = "nested_offset" in meta
    known = {prefix, state_key} | {f"{prefix}.{s}" for s in _SUFFIXES_4BIT}
    unknown = [k for k in d if k.startswith(f"{prefix}.") and k not in known]
    if unknown:
        raise ValueError(f"unexpected keys under {prefix!r}: {unknown}")

    packed = _packed_bytes(_require(d, prefix))
    _check_array(packed, prefix, ((n + 1) // 2, 1), "uint8")
    absmax = to_numpy(_require(d, f"{prefix}.absmax"))
    _check_array(absmax, f"{prefix}.absmax", (nblocks,), "uint8" if nested else "float32")
    quant_map = to_numpy(_require(d, f"{prefix}.quant_map"))
    _check_array(quant_map, f"{prefix}.quant_map", (16,), "float32")
    fields = dict(
        packed=jnp.asarray(packed),
        absmax=jnp.asarray(absmax),
        quant_map=jnp.asarray(quant_map),
        shape=shape,
        dtype=meta["dtype"],
        blocksize=int(meta["blocksize"]),
        quant_type=quant_type,
    )
    if nested:
        nested_blocksize = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
        nested_absmax = to_numpy(_require(d, f"{prefix}.nested_absmax"))
        _check_array(nested_absmax, f"{prefix}.nested_absmax", (-(-nblocks // nested_blocksize),), "float32")
        nested_map = to_numpy(_require(d, f"{prefix}.nested_quant_map"))
        _check_array(nested_map, f"{prefix}.nested_quant_map", (256,), "float32")
        if meta.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"nested_dtype must be 'float32', got {meta['nested_dtype']!r}")
        fields.update(
            nested_absmax=jnp.asarray(nested_absmax),
            nested_quant_map=jnp.asarray(nested_map),
            nested_offset=jnp.asarray(np.float32(meta["nested_offset"])),
            nested_blocksize=nested_blocksize,
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
        code = int(to_numpy(value).reshape(()).item())
        if code not in WEIGHT_FORMATS:
            raise ValueError(f"Expected supported weight format - got {code}")
        name = WEIGHT_FORMATS[code]
    if name != "row":
        raise ValueError(f"Only 'row' weight format is supported, got {name}")
    return name


def from_bnb_int8_state_dict(d: Mapping[str, Any], module_prefix: str = "") -> Int8Rows:
    """Reads a bitsandbytes 8-bit weight (``weight`` int8, ``SCB``, optional ``weight_format``).

    Raises:
      KeyError: ``weight`` or ``SCB`` is missing.
      ValueError: weight_format is not "row", wrong dtypes, or SCB length != weight rows.
    """
    weight_format_name(d.get(f"{module_prefix}weight_format", "row"))
    codes = to_numpy(_require(d, f"{module_prefix}weight"))
    scale = to_numpy(_require(d, f"{module_prefix}SCB"))
    if codes.dtype != np.int8 or codes.ndim != 2:
        raise ValueError(f"{module_prefix}weight must be a 2-D int8 array, got {codes.dtype} {codes.shape}")
    _check_array(scale, f"{module_prefix}SCB", (codes.shape[0],), "float32")
    return Int8Rows(codes=jnp.asarray(codes), scale=jnp.asarray(scale))
