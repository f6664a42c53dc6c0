"""Partition specs for a whole tree of quantized variables, from rules or from a float model's annotations.

Rules are ``(pattern, PartitionSpec)`` pairs. A variable's path is its keys joined by "/"
(Linen: ``"quantized/layers_0/q_proj/weight"``, ``"params/layers_0/q_proj/bias"``; NNX state:
``"layers/0/q_proj/weight"``); the first rule whose pattern ``re.search``-es the path gives its
spec, and a variable no rule matches is replicated. For a quantized weight (a
:class:`~qflax.quant.Packed4bit` or :class:`~qflax.quant.Int8Rows` node) the spec is that of
the weight as qflax stores it, ``(out_features, in_features)`` for dense layers, and its arrays'
specs follow (:mod:`qflax.sharding.specs`); for any other array the spec is its own.

Megatron-style tensor parallelism of a Llama block, for example::

    rules = [
        (r"(q|k|v|gate|up)_proj/weight$", P("tp", None)),   # column-parallel: split out-features
        (r"(q|k|v|gate|up)_proj/bias$", P("tp")),
        (r"(o|down)_proj/weight$", P(None, "tp")),          # row-parallel: split in-features
    ]

:func:`rules_from_annotations` derives such rules from a float model annotated with
``nn.with_partitioning`` / ``nn.with_logical_partitioning`` (Linen) or
``nnx.with_partitioning`` (NNX): a Flax ``kernel`` ``(in, out)`` annotated ``(a, b)`` gives its
quantized ``weight`` ``(out, in)`` the spec ``(b, a)``; an ``embedding`` keeps its spec.
"""

import re
from typing import Any, Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qflax.quant.fourbit import Packed4bit
from qflax.quant.int8 import Int8Rows
from qflax.sharding import specs as specs_lib

Rules = Sequence[tuple[str, PartitionSpec]]


def _is_quantized(node: Any) -> bool:
    return isinstance(node, (Packed4bit, Int8Rows))


def path_string(path: Sequence[Any]) -> str:
    """A pytree key path as "a/b/c" (dict keys, sequence indices and attribute names).

    The ``value`` attribute through which an NNX Variable holds its data is left out, so NNX
    paths read like the module tree.
    """
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name not in ("value", "raw_value"):
                names.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
        else:
            names.append(str(key))
    return "/".join(names)


def _check_rules(rules: Any) -> list[tuple[re.Pattern, Any, str]]:
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"rules must be a sequence of (pattern, PartitionSpec) pairs or an annotated float params "
                        f"tree, got {type(rules).__name__}")
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(f"rules[{i}] must be a (pattern string, PartitionSpec) pair, got {rule!r}")
        pattern, spec = rule
        if spec is not None and not isinstance(spec, PartitionSpec):
            raise TypeError(f"rules[{i}] ({pattern!r}): the spec must be a jax.sharding.PartitionSpec, got "
                            f"{type(spec).__name__}")
        try:
            compiled.append((re.compile(pattern), spec, pattern))
        except re.error as err:
            raise ValueError(f"rules[{i}]: {pattern!r} is not a valid regular expression: {err}") from err
    return compiled


def _spec_for(path: str, compiled) -> Any:
    for regex, spec, _ in compiled:
        if regex.search(path):
            return spec
    return PartitionSpec()


def _node_specs(node: Any, spec: Any, mesh: Mesh, where: str) -> Any:
    if isinstance(node, Packed4bit):
        return specs_lib.packed4bit_specs(node, spec, mesh, where)
    if isinstance(node, Int8Rows):
        return specs_lib.int8_specs(node, spec, mesh, where)
    return specs_lib.array_spec(tuple(getattr(node, "shape", ())), spec, mesh, where)


def quantized_partition_specs(variables: Any, rules: Any, mesh: Mesh,
                              logical_axis_rules: Optional[Sequence] = None) -> Any:
    """PartitionSpecs for every array of ``variables`` (quantized or not), in the tree's own structure.

    Args:
      variables: Linen variables (``{"params", "quantized", ...}``), an NNX ``State``, or any
        pytree holding Packed4bit / Int8Rows nodes and arrays. 4-bit weights to be split along
        their input features must be in the row view (:func:`qflax.sharding.to_row_view`).
      rules: ``(pattern, PartitionSpec)`` pairs (see the module docstring), or an annotated
        float params tree / NNX state or module, turned into rules by :func:`rules_from_annotations`.
      mesh: the device mesh the specs are checked against.
      logical_axis_rules: Flax logical-axis rules, for logical annotations in ``rules``.

    Returns:
      A tree like ``variables`` with a PartitionSpec for every array (Packed4bit and Int8Rows
      nodes become Packed4bit / Int8Rows of PartitionSpecs), for ``shard_map`` in_specs.

    Raises:
      TypeError: malformed rules.
      ValueError: a split the weight does not allow, an unknown mesh axis, or a dimension not
        divisible by its devices; the message names the variable's path, the sizes and what is
        allowed.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if not isinstance(rules, Sequence) or isinstance(rules, (str, bytes)):
        rules = rules_from_annotations(rules, logical_axis_rules)
    compiled = _check_rules(rules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables, is_leaf=_is_quantized)
    out = []
    for path, node in leaves:
        where = path_string(path)
        out.append(_node_specs(node, _spec_for(where, compiled), mesh, where))
    return jax.tree_util.tree_unflatten(treedef, out)


def quantized_shardings(variables: Any, rules: Any, mesh: Mesh, logical_axis_rules: Optional[Sequence] = None) -> Any:
    """:func:`quantized_partition_specs` as ``NamedSharding``s, for ``jax.device_put`` and ``jax.jit`` in_shardings.

    Example:
      >>> variables = to_row_view(variables)
      >>> shardings = quantized_shardings(variables, rules, mesh)
      >>> variables = jax.device_put(variables, shardings)
      >>> y = jax.jit(model.apply, in_shardings=(shardings, x_sharding))(variables, x)
    """
    specs = quantized_partition_specs(variables, rules, mesh, logical_axis_rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def _linen_specs(tree: Mapping, logical_axis_rules: Optional[Sequence]) -> list:
    import flax.linen as nn

    out = []
    boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=boxed)[0]:
        if isinstance(leaf, nn.LogicallyPartitioned):
            rules = logical_axis_rules if logical_axis_rules is not None else leaf.rules
            spec = nn.logical_to_mesh_axes(leaf.names, rules) if rules is not None else leaf.get_partition_spec()
        elif isinstance(leaf, nn.Partitioned):
            spec = PartitionSpec(*leaf.names)
        else:
            continue
        out.append((path, spec))
    return out


def _nnx_specs(state: Any, logical_axis_rules: Optional[Sequence]) -> list:
    from flax import nnx

    mapping = dict(logical_axis_rules or ())
    out = []
    specs = nnx.get_partition_spec(state)
    for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))[0]:
        if isinstance(spec, PartitionSpec):
            # Logical names in the metadata resolve through the rules; mesh axis names pass through.
            out.append((path, PartitionSpec(*(mapping.get(e, e) if isinstance(e, str) else e for e in spec))))
    return out


def _annotation_specs(tree: Any, logical_axis_rules: Optional[Sequence]) -> list:
    """(path, PartitionSpec over mesh axes) of every annotated leaf of a Linen params tree or NNX state/module."""
    from flax import nnx

    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    if isinstance(tree, nnx.State):
        return _nnx_specs(tree, logical_axis_rules)
    if isinstance(tree, Mapping):
        return _linen_specs(tree, logical_axis_rules)
    raise TypeError(f"rules must be (pattern, PartitionSpec) pairs, a Linen params tree or an NNX state/module, "
                    f"got {type(tree).__name__}")


def rules_from_annotations(tree: Any, logical_axis_rules: Optional[Sequence] = None) -> list:
    """Rules for the quantized twin of an annotated float model.

    Each annotated leaf yields a rule for its own path (layers kept in float) and, for a 2-D
    ``kernel`` (Flax ``(in, out)``) or ``embedding``, a rule for the quantized ``weight`` at the
    same module path, with the kernel's spec transposed to qflax's ``(out, in)``. Patterns
    match the path's end, so rules from ``variables["params"]`` fit the "quantized" collection
    and NNX state alike. Unannotated leaves give no rule (they are replicated).

    Args:
      tree: Linen params (leaves boxed in ``nn.Partitioned`` / ``nn.LogicallyPartitioned``,
        e.g. ``model.init(...)["params"]``) or an NNX module/state built under a mesh with
        ``nnx.with_partitioning`` metadata.
      logical_axis_rules: ``(logical name, mesh axis)`` pairs resolving logical annotations.

    Returns:
      A list of ``(pattern, PartitionSpec)`` pairs; append your own (LoRA adapters, ...).
    """
    rules = []
    for path, spec in _annotation_specs(tree, logical_axis_rules):
        if all(e is None for e in spec):
            continue
        name = path_string(path)
        if name.startswith("params/"):
            name = name[len("params/"):]
        rules.append((rf"(^|/){re.escape(name)}$", spec))
        module, _, leaf = name.rpartition("/")
        weight = rf"(^|/){re.escape(module + '/' if module else '')}weight$"
        entries = tuple(spec) + (None,) * (2 - len(tuple(spec)))
        if leaf == "kernel" and len(entries) == 2:
            rules.append((weight, PartitionSpec(entries[1], entries[0])))
        elif leaf == "embedding" and len(entries) == 2:
            rules.append((weight, PartitionSpec(*entries)))
    return rules
