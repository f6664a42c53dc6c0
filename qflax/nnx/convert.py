"""Float NNX models -> quantized ones, in one call with one rule object.

:func:`quantize_model` walks an NNX model and replaces each ``nnx.Linear`` and ``nnx.Embed`` that the
rules select (:class:`qflax.layers.QuantRules`; by default every Linear to NF4) by a qflax layer holding
the quantized weights, keeping the bias and every other submodule as it is. A
``nnx.LoRA(base_module=nnx.Linear(...))`` becomes a QLoRA layer: its base layer is quantized, its
adapters stay float. ``qflax.linen.quantize_params`` reads the same rules for a Linen params tree and
gives the same bytes.

=============  ==============================================  ==========================
rule format    ``nnx.Linear`` becomes                          ``nnx.Embed`` becomes
=============  ==============================================  ==========================
"4bit"         DenseNF4 / DenseFP4 (the rule's quant_type)     EmbedNF4 / EmbedFP4
"8bit"         Dense8bitLt(threshold=rule.threshold)           Embed8bit
=============  ==============================================  ==========================
"""

import fnmatch
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
from flax import nnx

from qflax.layers.progress import progress_bar
from qflax.layers.rules import LayerQuantization, QuantRules, Rule, as_rules
from qflax.nnx.fourbit import DenseFP4, DenseNF4, EmbedFP4, EmbedNF4
from qflax.nnx.int8 import Dense8bitLt, Embed8bit

Converter = Callable[[nnx.Module], nnx.Module]
_KINDS = {nnx.Linear: "dense", nnx.Embed: "embed"}
_4BIT_LAYERS = {
    ("dense", "nf4"): DenseNF4, ("dense", "fp4"): DenseFP4, ("embed", "nf4"): EmbedNF4, ("embed", "fp4"): EmbedFP4
}
_LEGACY = object()  # marks the deprecated keyword arguments as not given


def _from_rule(how: LayerQuantization) -> Converter:
    """The constructor of the qflax layer a resolved rule asks for."""
    if how.kind == "dense" and how.format == "8bit":
        return lambda linear: Dense8bitLt.from_linear(linear, threshold=how.threshold)
    if how.kind == "embed" and how.format == "8bit":
        return Embed8bit.from_embed
    options = dict(blocksize=how.blocksize, compress_statistics=how.compress_statistics)
    layer = _4BIT_LAYERS[how.kind, how.quant_type]
    build = layer.from_linear if how.kind == "dense" else layer.from_embed
    return lambda module: build(module, **options)


def _legacy_converters(dense: Any, embed: Any, exclude: Any) -> Callable[[str, nnx.Module], Optional[Converter]]:
    """The converter choice of the deprecated ``dense=``/``embed=``/``exclude=`` arguments."""

    def converter(target: Any, method: str, argument: str) -> Optional[Converter]:
        if target is None:
            return None
        if isinstance(target, type):
            if not hasattr(target, method):
                raise TypeError(f"{argument} must be a qflax.nnx class with a {method} method or a callable: {target}")
            return getattr(target, method)
        if not callable(target):
            raise TypeError(f"{argument} must be None, a qflax.nnx class or a callable, got {type(target).__name__}")
        return target

    if isinstance(exclude, str):
        raise TypeError("exclude must be an iterable of name patterns or a predicate, got a single str")
    if callable(exclude):
        excluded = exclude
    else:
        patterns = tuple(exclude)
        excluded = lambda path, _: any(fnmatch.fnmatchcase(path, p) for p in patterns)  # noqa: E731
    by_kind = {"dense": converter(dense, "from_linear", "dense"), "embed": converter(embed, "from_embed", "embed")}
    return lambda path, module: None if excluded(path, module) else by_kind[_KINDS[type(module)]]


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    key = path[-1]
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def _weight_count(module: nnx.Module) -> int:
    table = module.kernel if isinstance(module, nnx.Linear) else module.embedding
    return int(np.prod(table.shape))


def quantize_model(
    model: nnx.Module,
    rules: Union[None, Rule, QuantRules, Iterable[Rule]] = None,
    *,
    progress: Optional[bool] = None,
    dense: Any = _LEGACY,
    embed: Any = _LEGACY,
    exclude: Any = _LEGACY,
) -> nnx.Module:
    """Replaces the float ``nnx.Linear`` / ``nnx.Embed`` layers ``rules`` select by quantized qflax layers.

    The model is changed in place (its other submodules and variables are kept) and returned; a model
    that *is* a single Linear/Embed is returned converted, so always use the return value.

    Args:
      model: an NNX model.
      rules: a :class:`~qflax.layers.QuantRules` (or one Rule, or a sequence of Rules) on the dotted
        attribute paths (``"blocks.0"``, ``"adapter.base_module"``); None: every Linear to NF4
        (blocksize 64, double quantization), embeddings kept float.
      progress: show a tqdm progress bar; None shows one from 2**24 weights to quantize on.
      dense, embed, exclude: deprecated (the previous release's way to choose): a qflax.nnx class or
        a callable for the Linear / Embed layers, and fnmatch patterns or a predicate
        ``(path, module)`` of layers to keep float. They warn with a DeprecationWarning.

    Returns:
      The quantized model.

    Raises:
      TypeError: bad ``rules`` (or deprecated arguments of the wrong kind).

    Example:
      >>> model = quantize_model(model, QuantRules(Rule("lm_head", keep_float=True), Rule("*", layers="dense")))
    """
    legacy = {k: v for k, v in dict(dense=dense, embed=embed, exclude=exclude).items() if v is not _LEGACY}
    if legacy:
        warnings.warn(
            "quantize_model(dense=, embed=, exclude=) is deprecated and will be removed in the next release; "
            "pass rules=QuantRules(...)",
            DeprecationWarning,
            stacklevel=2,
        )
        if rules is not None:
            raise TypeError("pass either rules or the deprecated dense=/embed=/exclude=, not both")
        choose = _legacy_converters(legacy.get("dense", DenseNF4), legacy.get("embed"), legacy.get("exclude", ()))
    else:
        resolved = as_rules(rules)

        def choose(path: str, module: nnx.Module) -> Optional[Converter]:
            how = resolved.resolve(path, _KINDS[type(module)])
            return None if how is None else _from_rule(how)

    todo = []
    for path, module in nnx.iter_modules(model):
        if type(module) in _KINDS:
            convert = choose(".".join(str(p) for p in path), module)
            if convert is not None:
                todo.append((path, module, convert))
    with progress_bar(sum(_weight_count(module) for _, module, _ in todo), progress) as bar:
        for path, module, convert in todo:
            new = convert(module)
            if path:
                _replace(model, path, new)
            else:
                model = new
            bar.update(_weight_count(module))
    return model
