"""Float NNX models -> quantized ones, in one call.

:func:`quantize_model` walks an NNX model and replaces every ``nnx.Linear`` (and, when asked,
every ``nnx.Embed``) by a qflax layer holding the quantized weights, keeping the bias and
every other submodule as it is. A ``nnx.LoRA(base_module=nnx.Linear(...))`` becomes a QLoRA
layer: its base layer is quantized, its adapters stay float.
"""

import fnmatch
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import tqdm
from flax import nnx

from qflax.nnx.fourbit import DenseNF4

# Models with at least this many weights to quantize get a progress bar by default.
PROGRESS_MIN_WEIGHTS = 1 << 24

Replacement = Union[None, type, Callable[[nnx.Module], nnx.Module]]


def _converter(target: Replacement, method: str, argument: str) -> Optional[Callable[[nnx.Module], nnx.Module]]:
    if target is None:
        return None
    if isinstance(target, type):
        if not hasattr(target, method):
            raise TypeError(f"{argument} must be a qflax.nnx class with a {method} method or a callable, got {target}")
        return getattr(target, method)
    if not callable(target):
        raise TypeError(f"{argument} must be None, a qflax.nnx class or a callable, got {type(target).__name__}")
    return target


def _excluded(exclude: Union[Iterable[str], Callable[[str, nnx.Module], bool]]) -> Callable[[str, nnx.Module], bool]:
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        raise TypeError("exclude must be an iterable of name patterns or a predicate, got a single str")
    patterns = tuple(exclude)
    return lambda name, _: any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _weight_count(module: nnx.Module) -> int:
    table = module.kernel if isinstance(module, nnx.Linear) else module.embedding
    return int(np.prod(table.shape))


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    key = path[-1]
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def quantize_model(
    model: nnx.Module,
    dense: Replacement = DenseNF4,
    embed: Replacement = None,
    *,
    exclude: Union[Iterable[str], Callable[[str, nnx.Module], bool]] = (),
    progress: Optional[bool] = None,
) -> nnx.Module:
    """Replaces the float ``nnx.Linear`` / ``nnx.Embed`` layers of a model by quantized qflax layers.

    The model is changed in place (its other submodules and variables are kept) and
    returned; a model that *is* a single Linear/Embed is returned converted, so always use the
    return value.

    Args:
      model: an NNX model.
      dense: what ``nnx.Linear`` layers become: a qflax.nnx class with ``from_linear``
        (``DenseNF4``, ``DenseFP4``, ``Dense4bit``, ``Dense8bitLt``), any callable taking the
        float layer and returning a module (e.g. ``functools.partial(Dense4bit.from_linear,
        quant_type="fp4", blocksize=128)``), or None to leave them float.
      embed: the same for ``nnx.Embed`` layers (``EmbedNF4``, ``EmbedFP4``, ``Embed4bit``,
        ``Embed8bit`` or a callable); None (default) leaves them float.
      exclude: layers to leave float: name patterns matched (``fnmatch``) against the dotted
        path, e.g. ``("lm_head", "blocks.*.gate")``, or a predicate ``(path, module) -> bool``.
      progress: show a tqdm progress bar; None shows one for models with at least
        ``PROGRESS_MIN_WEIGHTS`` weights to quantize.

    Returns:
      The quantized model.

    Raises:
      TypeError: ``dense``/``embed``/``exclude`` of the wrong kind.

    Example:
      >>> model = quantize_model(model, dense=DenseNF4, exclude=("lm_head",))
    """
    converters = {
        nnx.Linear: _converter(dense, "from_linear", "dense"),
        nnx.Embed: _converter(embed, "from_embed", "embed"),
    }
    is_excluded = _excluded(exclude)
    todo = []
    for path, module in nnx.iter_modules(model):
        convert = converters.get(type(module))
        if convert is not None and not is_excluded(".".join(str(p) for p in path), module):
            todo.append((path, module, convert))
    total = sum(_weight_count(module) for _, module, _ in todo)
    show = total >= PROGRESS_MIN_WEIGHTS if progress is None else progress
    with tqdm.tqdm(total=total, unit="w", unit_scale=True, desc="quantizing", disable=not show) as bar:
        for path, module, convert in todo:
            new = convert(module)
            if path:
                _replace(model, path, new)
            else:
                model = new
            bar.update(_weight_count(module))
    return model
