"""Running qflax's kernel launches on torch tensors: where they can run, and one launch per call.

The launches are the ones the JAX side runs (``qflax_kernels.fourbit_launch``,
``qflax_kernels.int8_specs``); ``qflax_kernels.torch_launch`` runs them with Triton's own
launcher on the current torch stream. Two runtimes exist:

- "compiled": Triton compiles the kernels for the GPU; they take CUDA tensors.
- "interpreter": ``TRITON_INTERPRET=1`` was set before the kernels were imported; Triton's
  interpreter runs them on CPU tensors (the CI tests of the custom ops).

:func:`run` runs inside the bodies of the ``qflax::`` custom ops, on real tensors; nothing of it
is traced by torch.compile. :func:`call` decides whether a call needs the op or just its body.
"""

import contextlib
import functools
import importlib.util
from typing import Optional

import torch

from qflax_kernels import fourbit_plan

COMPILED, INTERPRETER = "compiled", "interpreter"


@functools.lru_cache(maxsize=None)
def kernel_runtime() -> Optional[str]:
    """"compiled", "interpreter" (``TRITON_INTERPRET=1`` before the kernels were imported) or None (no triton).

    Decided once per process: triton.jit reads TRITON_INTERPRET when it decorates a kernel.
    """
    if importlib.util.find_spec("triton") is None:
        return None
    from qflax_kernels import fourbit_triton
    from qflax_kernels.launch import is_interpreted

    return INTERPRETER if is_interpreted(fourbit_triton.fourbit_matmul_kernel) else COMPILED


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def device_supported(device: torch.device, dtype_name: str) -> bool:
    """Whether the kernels can run on tensors of ``device`` holding ``dtype_name`` activations.

    CUDA: compiled kernels on compute capability 7.5 or newer (8.0 for bfloat16, whose tensor
    cores start with Ampere); CPU: only in Triton's interpreter.
    """
    runtime = kernel_runtime()
    if device.type == "cpu":
        return runtime == INTERPRETER
    if device.type != "cuda" or runtime != COMPILED:
        return False
    major, minor = _capability(torch.cuda.current_device() if device.index is None else device.index)
    return (major, minor) >= ((8, 0) if dtype_name == "bfloat16" else (7, 5))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (the split-K policy's target); the plan's default elsewhere.

    The JAX launcher asks the same of its device, so both sides plan a launch the same way.
    """
    if device.type != "cuda":
        return fourbit_plan.DEFAULT_SM_COUNT
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


_DTYPE_NAMES = {t: str(t).replace("torch.", "") for t in (torch.float16, torch.bfloat16, torch.float32)}


def dtype_name(dtype: torch.dtype) -> str:
    """"float16", "bfloat16", ... (the dtype names of ``qflax_kernels.launch.Output``)."""
    name = _DTYPE_NAMES.get(dtype)
    return str(dtype).replace("torch.", "") if name is None else name


def _device_guard(device: torch.device):
    # Triton launches on the current CUDA device; tensors on another GPU need it switched.
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def run(launch, inputs: list) -> list:
    """Runs ``launch`` on ``inputs`` (signature order) and returns its outputs.

    Outputs are allocated by torch next to ``inputs[0]`` (zero-filled where the launch says so:
    a memset, no host work). In the interpreter, other outputs are filled with NaN / 77 first,
    so an element a kernel forgets to write shows in the tests.

    Raises:
      RuntimeError: CPU tensors without the interpreter, or CUDA tensors with it.
    """
    from qflax_kernels import torch_launch
    from qflax_kernels.launch import is_interpreted

    device = inputs[0].device
    interpreted = is_interpreted(launch.kernel)
    if interpreted != (device.type == "cpu"):
        raise RuntimeError(
            f"{launch.name}: the kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter "
            f"(TRITON_INTERPRET=1 before qflax_kernels is imported); got {device} tensors with the kernels "
            f"{'interpreted' if interpreted else 'compiled'}")
    outputs = torch_launch.allocate_outputs(launch, device, poison=interpreted)
    with _device_guard(device):
        torch_launch.launch_into(launch, inputs, outputs)
    return outputs


def _modes_active() -> bool:
    dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
    function_modes = getattr(torch._C, "_is_torch_function_mode_enabled", None)
    return dispatch_modes is None or dispatch_modes() > 0 or (function_modes is not None and function_modes())


def body_suffices(*args) -> bool:
    """Whether a custom op called on ``args`` may be replaced by its body (plain eager code).

    The op (a ``torch.library`` custom op) is needed wherever something must see it: torch.compile
    tracing, autograd (an argument requires grad), a dispatch or torch-function mode.
    """
    return not (torch.compiler.is_compiling() or _modes_active()
                or (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)))


def call(op, body, *args):
    """``op(*args)``, or in plain eager code ``body(*args)``: the same computation without the dispatcher.

    Calling the body directly (:func:`body_suffices`) saves the custom op's Python dispatch on
    every layer call.
    """
    return body(*args) if body_suffices(*args) else op(*args)
