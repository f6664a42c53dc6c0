"""Test-wide settings: 8 host CPU devices (for sharding tests), strict dtype promotion, the gpu marker, and
the backend every test runs on.

Each setting is made at import, before jax is imported, so it holds in every pytest-xdist worker too
(each worker imports this file first).
"""

import os

# Must happen before jax is imported anywhere.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# A persistent compilation cache shared by the pytest-xdist workers, the notebook kernels and the test
# subprocesses: most of the suite's CPU time is XLA compiling, and the cache makes every later run reuse
# it (the same executables; JAX keys them by program, options and versions). Ignored by git.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from qflax import ops  # noqa: E402

# Strict promotion turns silent int8 -> float or fp16 -> fp32 upcasts into errors.
jax.config.update("jax_numpy_dtype_promotion", "strict")

# The kernel tests choose their backends themselves (Triton's interpreter on CPU, use_backend blocks or
# explicit backend=), and some check what "auto" picks with nothing pinned: qflax's kernels (tests/kernels,
# the dispatch scope tests among them) and torch_compat's direct kernel path (tests/torch_compat_kernels).
KERNEL_TESTS = (Path(__file__).parent / "kernels", Path(__file__).parent / "torch_compat_kernels")


@pytest.fixture(autouse=True)
def pinned_backend(request):
    """Runs each test on one backend, whatever the machine: "xla" (the reference the numeric tests were
    written against), "triton" for tests marked ``gpu``, or what a ``backend(name)`` marker says ("auto":
    the dispatch rules themselves are under test). Kernel tests (tests/kernels, tests/torch_compat_kernels)
    are left alone unless marked."""
    marker = request.node.get_closest_marker("backend")
    if marker is not None:
        name = marker.args[0]
    elif request.node.get_closest_marker("gpu") is not None:
        name = "triton"
    elif any(folder in Path(request.node.path).parents for folder in KERNEL_TESTS):
        name = "auto"
    else:
        name = "xla"
    if name == "auto":
        yield name
        return
    with ops.use_backend(name):
        yield name


def pytest_collection_modifyitems(config, items):
    """Runs the slow group first and skips `gpu`-marked tests unless JAX runs on a GPU.

    Slow tests (the demo, the notebooks: tens of seconds each) first, so that pytest-xdist's workers
    finish together instead of one waiting for the last notebook. The order is deterministic, as xdist
    requires of every worker's collection.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with triton (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
