"""Run bitsandbytes code on torch_compat: transformers' ``BitsAndBytesConfig``, peft's LoRA over 4-bit layers.

:func:`install_as_bitsandbytes` puts a module named ``bitsandbytes`` into ``sys.modules`` whose
``nn``, ``functional``, ``utils``, ``matmul``, ``matmul_4bit`` and ``MatmulLtState`` are
torch_compat's own objects (so ``isinstance`` checks against ``bitsandbytes.nn.Linear4bit`` see
torch_compat's classes), and answers the checks that transformers and peft make before they use
bitsandbytes:

- ``importlib.util.find_spec("bitsandbytes")`` (both): the module carries a ``__spec__``;
- ``importlib.metadata.version("bitsandbytes")`` (transformers' ``is_bitsandbytes_available``,
  which wants >= 0.46.1): a distribution finder, placed first on ``sys.meta_path``, reports
  a ``bitsandbytes`` distribution of :data:`BITSANDBYTES_VERSION` (the API torch_compat mirrors),
  whether or not bitsandbytes' own distribution is installed;
- ``bitsandbytes.supported_torch_devices`` (transformers' ``validate_bnb_backend_availability``).

Both libraries cache these answers (``functools.lru_cache``); the caches of modules already
imported are cleared, so installing after ``import transformers`` works too. Install before
anything imports the real bitsandbytes (or pass ``replace=True``).

Example:
  >>> import torch_compat
  >>> torch_compat.install_as_bitsandbytes()
  >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
"""

import importlib.abc
import importlib.machinery
import importlib.metadata
import pathlib
import sys
import types

import torch_compat

NAME = "bitsandbytes"
BITSANDBYTES_VERSION = "0.49.2"
# Submodules code imports by name (``from bitsandbytes.nn import Linear4bit``).
_SUBMODULES = ("nn", "functional", "utils")
# bitsandbytes' own module paths that are the same objects as a submodule above (the layers are
# defined in ``bitsandbytes.nn.modules``; code and tests import them from there too).
_ALIASES = {"nn.modules": "nn"}
# Availability checks of other libraries that cache their answer: (module, function).
_CACHED_CHECKS = (
    ("transformers.utils.import_utils", "is_bitsandbytes_available"),
    ("peft.import_utils", "is_bnb_available"),
    ("peft.import_utils", "is_bnb_4bit_available"),
)


class _Distribution(importlib.metadata.Distribution):
    """The metadata of the installed stand-in: name, version, and the top-level module it provides."""

    _files = {
        "METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {BITSANDBYTES_VERSION}\n"
                    "Summary: torch_compat (qflax) installed under the bitsandbytes name\n",
        "top_level.txt": f"{NAME}\n",
    }

    def read_text(self, filename):
        return self._files.get(filename)

    def locate_file(self, path):
        return pathlib.Path(torch_compat.__file__).parent / path


class _MetadataFinder(importlib.abc.MetaPathFinder):
    """Finds no modules; reports the stand-in distribution to ``importlib.metadata``."""

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = context.name
        if name is None or name.replace("-", "_").lower() == NAME:
            yield _Distribution()


def _facade() -> types.ModuleType:
    module = types.ModuleType(NAME, "torch_compat installed as bitsandbytes (torch_compat.install_as_bitsandbytes)")
    module.__spec__ = importlib.machinery.ModuleSpec(NAME, None, origin=torch_compat.__file__, is_package=True)
    module.__file__ = torch_compat.__file__
    module.__path__ = []
    module.__version__ = BITSANDBYTES_VERSION
    module.supported_torch_devices = {"cpu", "cuda"}
    module.features = set()
    module.torch_compat = torch_compat
    for name in (*_SUBMODULES, "MatmulLtState", "matmul", "matmul_4bit"):
        setattr(module, name, getattr(torch_compat, name))
    return module


def is_installed() -> bool:
    """Whether ``sys.modules["bitsandbytes"]`` is torch_compat's stand-in."""
    return getattr(sys.modules.get(NAME), "torch_compat", None) is torch_compat


def _clear_cached_checks() -> None:
    for module_name, function in _CACHED_CHECKS:
        check = getattr(sys.modules.get(module_name), function, None)
        if hasattr(check, "cache_clear"):
            check.cache_clear()


def install_as_bitsandbytes(replace: bool = False) -> types.ModuleType:
    """Makes ``import bitsandbytes`` give torch_compat (see the module docstring for what is checked).

    Args:
      replace: replace a real bitsandbytes that was already imported (objects already made
        from it stay what they are).

    Returns:
      The ``bitsandbytes`` module now in ``sys.modules``.

    Raises:
      RuntimeError: the real bitsandbytes was already imported and ``replace`` is False.
    """
    if is_installed():
        return sys.modules[NAME]
    if NAME in sys.modules and not replace:
        raise RuntimeError(
            f"bitsandbytes is already imported from {getattr(sys.modules[NAME], '__file__', '?')}; call "
            "install_as_bitsandbytes() before anything imports it, or pass replace=True")
    for key in [k for k in sys.modules if k == NAME or k.startswith(NAME + ".")]:
        del sys.modules[key]
    module = _facade()
    sys.modules[NAME] = module
    for name in _SUBMODULES:
        sys.modules[f"{NAME}.{name}"] = getattr(torch_compat, name)
    for alias, name in _ALIASES.items():
        sys.modules[f"{NAME}.{alias}"] = getattr(torch_compat, name)
    sys.meta_path.insert(0, _MetadataFinder())
    _clear_cached_checks()
    return module


def uninstall() -> None:
    """Undoes :func:`install_as_bitsandbytes` (the next ``import bitsandbytes`` finds the real one, if any)."""
    if not is_installed():
        return
    for key in [NAME, *(f"{NAME}.{name}" for name in (*_SUBMODULES, *_ALIASES))]:
        sys.modules.pop(key, None)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _MetadataFinder)]
    _clear_cached_checks()
