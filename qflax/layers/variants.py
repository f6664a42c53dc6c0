"""Layer variants with fixed settings (DenseNF4, EmbedFP4, SwitchBackDenseGlobal, ...), made one way.

bitsandbytes' LinearNF4, LinearFP4, EmbeddingNF4, EmbeddingFP4 and the SwitchBackLinear partials are
their base layer with some settings fixed. Here a variant is a subclass of its base made by
:func:`fixed_variant`: the fixed settings become its defaults, and the base layer rejects any other
value with :func:`check_fixed`. Linen layers are dataclasses, so their defaults are class fields
(:func:`field_defaults`); NNX layers take theirs as ``__init__`` keywords (:func:`init_defaults`).
"""

import functools
from typing import Any, Callable, Mapping

FIXED = "fixed_settings"

# The NF4/FP4 variants of the 4-bit layers: (name, bitsandbytes name, fixed settings).
FOURBIT_DENSE = (("DenseNF4", "LinearNF4", {"quant_type": "nf4"}), ("DenseFP4", "LinearFP4", {"quant_type": "fp4"}))
FOURBIT_EMBED = (
    ("EmbedNF4", "EmbeddingNF4", {"quant_type": "nf4"}),
    ("EmbedFP4", "EmbeddingFP4", {"quant_type": "fp4"}),
)


def check_fixed(cls: type, settings: Mapping[str, Any]) -> None:
    """Raises ValueError when a layer of ``cls`` is given another value for one of its fixed settings.

    Args:
      cls: the layer class; its ``fixed_settings`` (empty for a base layer) say what is fixed.
      settings: the values the layer was given, by name.
    """
    for name, value in getattr(cls, FIXED, {}).items():
        if settings[name] != value:
            base = cls.__mro__[1].__name__
            raise ValueError(f"{cls.__name__} fixes {name}={value!r}; got {name}={settings[name]!r} (use {base})")


def field_defaults(base: type, fixed: Mapping[str, Any]) -> dict:
    """The class namespace that makes ``fixed`` the field defaults of a dataclass layer (Linen)."""
    return {"__annotations__": {name: type(value) for name, value in fixed.items()}, **fixed}


def init_defaults(base: type, fixed: Mapping[str, Any]) -> dict:
    """The class namespace that makes ``fixed`` the keyword defaults of ``base.__init__`` (NNX)."""

    @functools.wraps(base.__init__)
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **{**fixed, **kwargs})

    return {"__init__": __init__}


def fixed_variant(
    base: type, name: str, bnb_name: str, fixed: Mapping[str, Any], module: str, defaults: Callable[..., dict]
) -> type:
    """A subclass of ``base`` named ``name`` whose settings ``fixed`` cannot be changed.

    Args:
      base: the base layer.
      name: the variant's class name.
      bnb_name: the bitsandbytes class it corresponds to, for its docstring.
      fixed: the fixed settings, by name.
      module: the defining module's ``__name__`` (for pickling and documentation).
      defaults: :func:`field_defaults` (Linen) or :func:`init_defaults` (NNX).

    Returns:
      The new class.
    """
    settings = ", ".join(f"{key}={value!r}" for key, value in fixed.items())
    attributes = {
        "__doc__": f":class:`{base.__name__}` with {settings} (bitsandbytes' {bnb_name}).",
        "__module__": module,
        "__qualname__": name,
        FIXED: dict(fixed),
        **defaults(base, fixed),
    }
    return type(base)(name, (base,), attributes)
