"""Checks of 4-bit checkpoint entries: the packed-JSON quant state, packed bytes, statistics and code tables.

Checked: every JSON field's type and value (integer block sizes, a finite ``nested_offset``,
no unknown field), the packed data's byte count and the statistics' dtypes and lengths against
the declared shape and blocksize (sizes as Python ints, so nothing wraps), the code tables
(length, finite, NF4 and dynamic maps sorted, the table of the declared quant type), negative
statistics, and the settings the target module declares. Errors are those of
:mod:`qflax.checkpoint_checks`.
"""

import dataclasses
import json
import math
from typing import Any, Mapping, Optional

import jax
import numpy as np

from qflax.checkpoint_checks import (
    CheckpointError,
    CheckpointTypeError,
    MissingEntryError,
    UnexpectedEntryError,
    check_array,
    check_known,
    check_scales,
    concrete,
    dtype_name,
    shape_of,
    to_numpy,
)
from qflax.quant import codebooks, validation

# Dtypes the packed 4-bit bytes may be stored as (bitsandbytes' quant_storage), with their sizes.
PACKED_STORAGE = {
    "uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "int16": 2, "float32": 4, "int32": 4, "float64": 8,
    "int64": 8,
}
JSON_FIELDS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")
STAT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclasses.dataclass(frozen=True)
class Layout4bit:
    """What a 4-bit quant state declares; sizes are Python ints (no overflow)."""

    quant_type: str
    blocksize: int
    dtype: str
    shape: tuple
    nested: bool
    nested_blocksize: int = 256
    nested_offset: Optional[float] = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.size // self.blocksize)

    @property
    def packed_bytes(self) -> int:
        return (self.size + 1) // 2

    @property
    def nested_nblocks(self) -> int:
        return -(-self.nblocks // self.nested_blocksize)


def _json_int(value: Any, field: str, where: str) -> int:
    if type(value) is not int:  # noqa: E721 -- bool and 64.0 are not block sizes
        raise CheckpointTypeError(f"{where}: {field} must be an integer, got {value!r} ({type(value).__name__})")
    return value


def layout_from_fields(fields: Mapping[str, Any], where: str) -> Layout4bit:
    """Checks the non-tensor fields of a 4-bit quant state (decoded JSON) and returns its layout.

    Args:
      fields: ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, when nested, all of
        ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.
      where: the key the fields came from, for messages.

    Returns:
      The :class:`Layout4bit`.

    Raises:
      CheckpointError / CheckpointTypeError: a missing, mistyped or out-of-range field.
    """
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in fields:
            raise CheckpointError(f"state dict entry {where!r} lacks the JSON field {field!r}")
    validation.check_choice(fields["quant_type"], codebooks.QUANT_TYPES, f"{where}: quant_type (checkpoint)")
    blocksize = _json_int(fields["blocksize"], "blocksize", where)
    validation.check_choice(blocksize, validation.BLOCKSIZES_4BIT, f"{where}: blocksize (checkpoint)")
    validation.check_choice(fields["dtype"], validation.FLOAT_DTYPES, f"{where}: dtype (checkpoint)")
    shape = fields["shape"]
    if not isinstance(shape, (list, tuple)):
        raise CheckpointTypeError(f"{where}: shape must be a list of integers, got {shape!r}")
    shape = tuple(_json_int(s, "every shape entry", where) for s in shape)
    if any(s < 0 for s in shape) or math.prod(shape) == 0:
        raise CheckpointError(f"{where}: shape must have positive entries, got {list(shape)}")
    present = [f for f in NESTED_FIELDS if f in fields]
    if not present:
        return Layout4bit(fields["quant_type"], blocksize, fields["dtype"], shape, nested=False)
    if len(present) != len(NESTED_FIELDS):
        missing = [f for f in NESTED_FIELDS if f not in fields]
        raise CheckpointError(f"{where}: a nested quant state needs {list(NESTED_FIELDS)}, missing {missing}")
    nested_blocksize = _json_int(fields["nested_blocksize"], "nested_blocksize", where)
    validation.check_choice(nested_blocksize, validation.BLOCKSIZES_8BIT, f"{where}: nested_blocksize (checkpoint)")
    if fields["nested_dtype"] != "float32":
        raise CheckpointError(f"{where}: nested_dtype must be 'float32', got {fields['nested_dtype']!r}")
    offset = fields["nested_offset"]
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise CheckpointError(f"{where}: nested_offset must be a finite number, got {offset!r}")
    return Layout4bit(
        fields["quant_type"], blocksize, fields["dtype"], shape, nested=True, nested_blocksize=nested_blocksize,
        nested_offset=float(offset),
    )


def parse_quant_state(value: Any, key: str, quant_type: Optional[str] = None) -> tuple[dict, Layout4bit]:
    """Decodes and checks a packed ``quant_state.bitsandbytes__<type>`` entry.

    Args:
      value: the entry: a 1-D uint8 array of UTF-8 JSON bytes.
      key: its key, for messages.
      quant_type: the quant type the key names, which the JSON must repeat.

    Returns:
      ``(fields, layout)``: the decoded JSON object and its :class:`Layout4bit`.

    Raises:
      CheckpointError: bad bytes, bad JSON, unknown or inconsistent fields.
    """
    if dtype_name(value) != "uint8" or len(shape_of(value)) != 1:
        raise CheckpointTypeError(
            f"state dict entry {key!r} must be a 1-D uint8 array of JSON bytes, got {dtype_name(value)} "
            f"{shape_of(value)}"
        )
    try:
        fields = json.loads(to_numpy(value).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"state dict entry {key!r} is not valid UTF-8 JSON: {err}") from err
    if not isinstance(fields, dict):
        raise CheckpointError(f"state dict entry {key!r} must hold a JSON object, got {type(fields).__name__}")
    check_known(fields, JSON_FIELDS, f"{key} (JSON fields)")
    if quant_type is not None and fields.get("quant_type") != quant_type:
        raise CheckpointError(f"{key!r} says quant_type {fields.get('quant_type')!r} but its key names {quant_type!r}")
    return fields, layout_from_fields(fields, key)


# ---------------------------------------------------------------------------------------------
# 4-bit: the arrays


def quant_type_of_table(table: np.ndarray) -> str:
    """"fp4" or "nf4", read off a 16-entry table the way bitsandbytes does (FP4 iff entry 1 > 0)."""
    return "fp4" if float(table[1]) > 0 else "nf4"


def check_code_table(value: Any, key: str, length: int, quant_type: Optional[str], values: bool = True) -> None:
    """Raises unless a code table is float32 ``(length,)``, finite, and of the declared kind.

    A 4-bit table must be the declared quant type's (sorted for NF4); the 256-entry dynamic
    map of double quantization must be sorted ascending. Custom values are otherwise allowed:
    stored tables are honoured when decoding.
    """
    check_array(value, key, (length,), "float32")
    if not values or not concrete(value):
        return
    table = to_numpy(value)
    if not np.all(np.isfinite(table)):
        raise CheckpointError(f"state dict entry {key!r} must hold finite values, got {table.tolist()}")
    if quant_type is not None and quant_type_of_table(table) != quant_type:
        raise CheckpointError(
            f"state dict entry {key!r} holds a {quant_type_of_table(table)} table but the quant state says "
            f"{quant_type!r}"
        )
    if quant_type != "fp4" and np.any(np.diff(table) < 0):
        raise CheckpointError(f"state dict entry {key!r} must be sorted ascending, got {table.tolist()}")


def check_packed(value: Any, layout: Layout4bit, key: str) -> None:
    """Raises unless the packed weight holds exactly ``(n + 1) // 2`` bytes as a ``(k, 1)`` array.

    Any quant_storage dtype is allowed (its bytes are what count); a packed weight cast
    numerically to another dtype changes its byte count and is caught here.
    """
    dtype, shape = dtype_name(value), shape_of(value)
    if dtype not in PACKED_STORAGE:
        raise CheckpointTypeError(
            f"state dict entry {key!r} (packed 4-bit data) must be stored as one of {sorted(PACKED_STORAGE)}, "
            f"got {dtype}"
        )
    itemsize = PACKED_STORAGE[dtype]
    if layout.packed_bytes % itemsize:
        raise CheckpointError(
            f"state dict entry {key!r}: {layout.packed_bytes} packed bytes cannot be stored as {dtype}"
        )
    want = (layout.packed_bytes // itemsize, 1)
    if shape != want:
        got_bytes = math.prod(shape) * itemsize
        raise CheckpointError(
            f"state dict entry {key!r} must be {dtype} of shape {want} ({layout.packed_bytes} bytes for shape "
            f"{list(layout.shape)}), got {dtype} {shape} ({got_bytes} bytes; truncated, or cast numerically?)"
        )


def check_4bit_entries(
    layout: Layout4bit, stats: Mapping[str, Any], prefix: str, packed: Any = None, values: bool = True
) -> None:
    """Checks the statistics (and, if given, the packed data) of one 4-bit weight against its layout.

    Args:
      layout: from :func:`parse_quant_state` / :func:`layout_from_fields`.
      stats: suffix -> array for ``absmax``, ``quant_map`` and, when nested,
        ``nested_absmax`` and ``nested_quant_map`` (other suffixes are rejected).
      prefix: the weight's key, e.g. ``"fc.weight"``; messages name ``prefix.suffix``.
      packed: the packed data, or None to skip that check.
      values: also check the values of statistics and tables (not only dtypes and shapes).

    Raises:
      MissingEntryError, CheckpointError, CheckpointTypeError, UnexpectedEntryError.
    """
    allowed = STAT_SUFFIXES if layout.nested else STAT_SUFFIXES[:2]
    if not layout.nested:
        extra = [s for s in STAT_SUFFIXES[2:] if s in stats]
        if extra:
            raise UnexpectedEntryError(
                f"{prefix}: entries {[entry_key(prefix, s) for s in extra]} belong to a double-quantized weight, but "
                "the quant state has no nested_offset"
            )
    check_known([entry_key(prefix, k) for k in stats], [entry_key(prefix, k) for k in allowed], prefix)
    if packed is not None:
        check_packed(packed, layout, prefix)
    key = lambda s: entry_key(prefix, s)  # noqa: E731
    absmax = _get(stats, "absmax", prefix)
    check_array(absmax, key("absmax"), (layout.nblocks,), "uint8" if layout.nested else "float32")
    if values and not layout.nested:
        check_scales(absmax, key("absmax"))
    check_code_table(_get(stats, "quant_map", prefix), key("quant_map"), 16, layout.quant_type, values)
    if layout.nested:
        nested_absmax = _get(stats, "nested_absmax", prefix)
        check_array(nested_absmax, key("nested_absmax"), (layout.nested_nblocks,), "float32")
        if values:
            check_scales(nested_absmax, key("nested_absmax"))
        check_code_table(_get(stats, "nested_quant_map", prefix), key("nested_quant_map"), 256, None, values)


def entry_key(prefix: str, suffix: str) -> str:
    """The state-dict key of a statistics entry: ``prefix.suffix`` (just ``suffix`` without a prefix)."""
    return f"{prefix}.{suffix}" if prefix else suffix


def _get(stats: Mapping[str, Any], suffix: str, prefix: str) -> Any:
    if suffix not in stats:
        raise MissingEntryError(f"state dict is missing the key {entry_key(prefix, suffix)!r}")
    return stats[suffix]


def check_4bit_target(
    layout: Layout4bit,
    where: str,
    *,
    shape: Optional[tuple] = None,
    quant_type: Optional[str] = None,
    blocksize: Optional[int] = None,
    nested: Optional[bool] = None,
) -> None:
    """Raises CheckpointError if a 4-bit weight does not have the settings its target module declares.

    Args:
      layout: the checkpoint's layout.
      where: the key or module path, for messages.
      shape, quant_type, blocksize, nested: the target's settings; None skips a check.
    """
    wanted = {"shape": None if shape is None else tuple(shape), "quant_type": quant_type, "blocksize": blocksize,
              "double quantization (compress_statistics)": nested}
    found = {"shape": tuple(layout.shape), "quant_type": layout.quant_type, "blocksize": layout.blocksize,
             "double quantization (compress_statistics)": layout.nested}
    for name, want in wanted.items():
        if want is not None and found[name] != want:
            raise CheckpointError(f"{where}: the checkpoint's {name} is {found[name]!r}, the target expects {want!r}")


def check_packed4bit(q: Any, where: str, values: bool = True) -> Layout4bit:
    """Checks a :class:`~qflax.quant.Packed4bit` (static fields and arrays) as a checkpoint entry.

    Args:
      q: the Packed4bit.
      where: its key or path, for messages.
      values: also check values (tables, signs, a finite offset); skipped anyway for arrays
        traced under ``jax.jit``. False checks only static fields, dtypes and shapes.

    Returns:
      Its :class:`Layout4bit`.
    """
    fields = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": q.dtype, "shape": list(q.shape)}
    if q.nested:
        offset = float(q.nested_offset) if values and concrete(q.nested_offset) else 0.0
        fields.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=offset)
        check_array(q.nested_offset, entry_key(where, "nested_offset"), (), "float32")
    layout = layout_from_fields(fields, where)
    names = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
    stats = {n: getattr(q, n) for n in names if getattr(q, n) is not None}
    check_4bit_entries(layout, stats, where, packed=q.packed, values=values)
    return layout


def check_packed4bit_leaves(tree: Any, where: str) -> None:
    """:func:`check_packed4bit` on every :class:`~qflax.quant.Packed4bit` in a pytree (messages name its path)."""
    from qflax.quant.fourbit import Packed4bit  # the container; the checks above only read its fields

    is_packed = lambda x: isinstance(x, Packed4bit)  # noqa: E731
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_packed)[0]:
        if is_packed(leaf):
            check_packed4bit(leaf, f"{where}/{jax.tree_util.keystr(path)}")
