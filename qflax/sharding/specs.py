"""From the PartitionSpec of a weight to the PartitionSpecs of the arrays that hold it, with every check.

A rule gives the spec of a weight as qflax stores it: ``(out_features, in_features)`` for a
dense layer (bitsandbytes' layout, the transpose of a Flax ``kernel``) and ``(num_embeddings,
features)`` for an embedding table. Its arrays then get:

=========================  ===================================  =================================
weight                     spec ``P(o, i)``                     allowed
=========================  ===================================  =================================
Packed4bit, row view       packed ``P(o, i)``, absmax ``P(o, i)``  ``N % |o| == 0``,
                                                                ``K % (|i| * blocksize) == 0``
Packed4bit, flat layout    packed ``P(o, None)``, absmax ``P(o)``  ``N % |o| == 0``; ``i`` needs
                                                                the row view (``to_row_view``)
Int8Rows                   codes ``P(o, i)``, scale ``P(o)``      ``N % |o| == 0``, ``K % |i| == 0``
=========================  ===================================  =================================

``|o|`` is the number of devices along the mesh axes ``o``. Code tables and double-quantization
statistics (``quant_map``, ``nested_quant_map``, ``nested_absmax``, ``nested_offset``: one float32
per 256 absmax blocks) are always replicated: any shard can then decode its blocks' absmax.
Any split also needs ``K % blocksize == 0`` (each row made of whole absmax blocks).
"""

from typing import Any, Sequence

import numpy as np
from jax.sharding import Mesh, PartitionSpec

from qflax.quant import fourbit_rows
from qflax.quant.fourbit import Packed4bit
from qflax.quant.int8 import Int8Rows


def axes_of(entry: Any) -> tuple:
    """A PartitionSpec entry (None, an axis name or a tuple of names) as a tuple of names."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def spec_of(*entries: Any) -> PartitionSpec:
    """A PartitionSpec without trailing Nones (``P("tp", None)`` and ``P("tp")`` mean the same)."""
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _size(mesh: Mesh, entry: Any) -> int:
    return int(np.prod([mesh.shape[a] for a in axes_of(entry)], dtype=np.int64))


def _describe(entry: Any, mesh: Mesh) -> str:
    axes = axes_of(entry)
    return f"mesh axes {axes} ({_size(mesh, entry)} devices)" if len(axes) > 1 else (
        f"mesh axis {axes[0]!r} (size {mesh.shape[axes[0]]})")


def check_spec(spec: Any, ndim: int, mesh: Mesh, where: str) -> tuple:
    """``spec`` as a tuple of ``ndim`` entries, after checking its axis names against ``mesh``.

    Raises:
      TypeError: ``spec`` is not a PartitionSpec (or None).
      ValueError: too many entries, an axis not in the mesh, or an axis used twice.
    """
    if spec is None:
        spec = PartitionSpec()
    if not isinstance(spec, PartitionSpec):
        raise TypeError(f"{where}: the rule's spec must be a jax.sharding.PartitionSpec, got {type(spec).__name__}")
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"{where}: spec {spec} has {len(entries)} entries, but the array has only {ndim} dimensions")
    used = [a for e in entries for a in axes_of(e)]
    unknown = [a for a in used if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"{where}: spec {spec} names mesh axes {unknown}; the mesh has axes {tuple(mesh.axis_names)}")
    if len(set(used)) != len(used):
        raise ValueError(f"{where}: spec {spec} uses a mesh axis twice")
    return entries + (None,) * (ndim - len(entries))


def check_auto_axes(entries: tuple, mesh: Mesh, where: str) -> None:
    """Raises unless every mesh axis splitting a quantized weight is an Auto axis.

    The ops decode a quantized weight with table lookups whose output sharding JAX's Explicit
    mode cannot infer; XLA's partitioner (Auto axes) places them shard by shard.
    """
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ()))
    explicit = [a for e in entries for a in axes_of(e) if "Explicit" in str(types.get(a, ""))]
    if explicit:
        raise ValueError(
            f"{where}: quantized weights can be split only over Auto mesh axes; {explicit} are Explicit. Build the "
            "mesh with jax.sharding.Mesh(devices, names) or jax.make_mesh(shape, names, "
            "axis_types=(jax.sharding.AxisType.Auto,) * len(names))")


def _check_divides(where: str, what: str, size: int, entry: Any, mesh: Mesh, multiple: int = 1,
                   why: str = "") -> None:
    parts = _size(mesh, entry)
    if size % (parts * multiple):
        unit = f"{parts} x {multiple} = {parts * multiple}" if multiple > 1 else f"{parts}"
        raise ValueError(f"{where}: {what} ({size}) split over {_describe(entry, mesh)} must be a multiple of "
                         f"{unit}{why}; got {size}")


def array_spec(shape: Sequence[int], spec: Any, mesh: Mesh, where: str) -> PartitionSpec:
    """The checked spec of a plain array.

    Raises:
      ValueError: a split dimension is not divisible by its devices (or see :func:`check_spec`).
    """
    entries = check_spec(spec, len(shape), mesh, where)
    for dim, (size, entry) in enumerate(zip(shape, entries)):
        if entry is not None:
            _check_divides(where, f"dimension {dim}", size, entry, mesh)
    return spec_of(*entries)


def packed4bit_specs(q: Packed4bit, spec: Any, mesh: Mesh, where: str) -> Packed4bit:
    """A Packed4bit of PartitionSpecs for the arrays of ``q`` (see the module docstring).

    Args:
      q: the 4-bit weight.
      spec: spec of the weight ``(out, in)`` (or ``(num_embeddings, features)``).
      mesh: the mesh.
      where: the variable's path, for error messages.

    Raises:
      ValueError: the split is not allowed for this weight (the message says what is).
    """
    replicated = PartitionSpec()
    if len(q.shape) != 2:
        if any(e is not None for e in tuple(spec or ())):
            raise ValueError(f"{where}: only 2-D 4-bit weights can be split; this one has shape {q.shape}, "
                             f"got spec {spec}; use PartitionSpec()")
        out = inner = None
    else:
        out, inner = check_spec(spec, 2, mesh, where)
        check_auto_axes((out, inner), mesh, where)
    n, k = q.shape if len(q.shape) == 2 else (q.size, 1)
    what = f"{where} (4-bit weight {q.shape}, blocksize {q.blocksize})"
    if (out is not None or inner is not None) and k % q.blocksize:
        raise ValueError(f"{what}: splitting needs in_features to be a multiple of blocksize {q.blocksize} (each "
                         f"row made of whole absmax blocks); got {k}; replicate this weight (spec P())")
    if out is not None:
        _check_divides(what, "out_features", n, out, mesh)
    if inner is not None:
        if not fourbit_rows.is_row_view(q):
            raise ValueError(f"{what}: splitting in_features (spec {PartitionSpec(out, inner)}) needs the row view; "
                             "convert the tree first with qflax.sharding.to_row_view(variables)")
        _check_divides(what, "in_features", k, inner, mesh, q.blocksize,
                       " (splits only at absmax-block boundaries)")
    if fourbit_rows.is_row_view(q):
        packed = absmax = spec_of(out, inner)
    else:
        packed, absmax = spec_of(out), spec_of(out)
    nested = q.nested
    return q.replace(packed=packed, absmax=absmax, quant_map=replicated,
                     nested_absmax=replicated if nested else None, nested_quant_map=replicated if nested else None,
                     nested_offset=replicated if nested else None)


def int8_specs(w: Int8Rows, spec: Any, mesh: Mesh, where: str) -> Int8Rows:
    """An Int8Rows of PartitionSpecs: codes ``P(o, i)``, row absmax ``P(o)``.

    Raises:
      ValueError: a split dimension is not divisible by its devices.
    """
    out, inner = check_spec(spec, 2, mesh, where)
    check_auto_axes((out, inner), mesh, where)
    n, k = w.codes.shape
    what = f"{where} (int8 weight {(n, k)})"
    if out is not None:
        _check_divides(what, "out_features", n, out, mesh)
    if inner is not None:
        _check_divides(what, "in_features", k, inner, mesh)
    return Int8Rows(codes=spec_of(out, inner), scale=spec_of(out))
