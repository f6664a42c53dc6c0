"""Nested-dict variable trees (Linen's ``{collection: {module: {name: value}}}``) as flat keys and back."""

from typing import Any, Mapping


def flat_variables(variables: Mapping[str, Any]) -> dict[tuple, Any]:
    """``{(collection, *module_path, name): value}``; quantized pytrees (Packed4bit, ...) stay whole."""
    flat = {}

    def walk(node: Mapping, prefix: tuple) -> None:
        for name, value in node.items():
            if isinstance(value, Mapping):
                walk(value, prefix + (str(name),))
            else:
                flat[prefix + (str(name),)] = value

    walk(variables, ())
    return flat


def nested_set(tree: dict, path: tuple, value: Any) -> None:
    """``tree[path[0]][path[1]]... = value``, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
