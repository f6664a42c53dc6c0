"""Runs a :class:`~qflax_kernels.launch.Launch` with Triton's own launcher on torch tensors.

The same launch objects the JAX primitive lowers are run here on torch tensors: on CUDA by
torch_compat and the tile tuner (Triton launches on the current torch stream), on CPU by
Triton's interpreter (the JAX primitive's CPU lowering and the interpreter tests). torch is
imported when a function here runs, never at import time.
"""

import numpy as np

from qflax_kernels.launch import Launch

_POISON_INT = 77  # unwritten integer outputs show up as this; floats as NaN


def _torch_dtype(name: str):
    import torch

    return getattr(torch, "bool" if name == "bool" else name)


def allocate_outputs(launch: Launch, device, poison: bool = False) -> list:
    """Output tensors of ``launch`` on ``device``: zero-filled where required, else uninitialised
    (or, with ``poison``, filled with NaN / 77 so unwritten elements show in tests)."""
    import torch

    outs = []
    for o in launch.outputs:
        dtype = _torch_dtype(o.dtype)
        if o.zeroed:
            outs.append(torch.zeros(o.shape, dtype=dtype, device=device))
        elif poison:
            fill = float("nan") if dtype.is_floating_point else _POISON_INT
            outs.append(torch.full(o.shape, fill, dtype=dtype, device=device))
        else:
            outs.append(torch.empty(o.shape, dtype=dtype, device=device))
    return outs


def launch_into(launch: Launch, inputs, outputs):
    """Launches ``launch`` on ``inputs`` (tensors, signature order) writing ``outputs``.

    Zero-filled outputs must already be zero (:func:`allocate_outputs` does it). On a GPU, after
    the first call of a specialisation, the compiled kernel is launched directly
    (:class:`_CompiledLaunches`), skipping the ~15 us of Python of ``JITFunction.run``.

    Returns:
      What Triton's launcher returns (the compiled kernel on a GPU).
    """
    fast = launch.__dict__.get("_compiled_launches")
    if fast is None:
        launch.input_names(len(inputs))
        fast = _CompiledLaunches(launch) if _direct_launch_supported(launch) else False
        object.__setattr__(launch, "_compiled_launches", fast)  # frozen dataclass: a private cache
    if fast:
        return fast(inputs, outputs)
    return _launch_through_triton(launch, inputs, outputs)


def _launch_through_triton(launch: Launch, inputs, outputs):
    return launch.kernel[launch.grid3](
        *inputs, *(v for _, v in launch.scalars), *outputs,
        num_warps=launch.num_warps, num_stages=launch.num_stages, enable_fp_fusion=launch.enable_fp_fusion,
        **({} if launch.maxnreg is None else dict(maxnreg=launch.maxnreg)), **launch.constexpr_dict())


# Triton versions whose CompiledKernel.run takes (grid x3, stream, function, packed metadata, launch
# metadata, enter hook, exit hook, *every argument in signature order), as JITFunction.run calls it.
_DIRECT_LAUNCH_TRITON = ((3, 4), (3, 5), (3, 6), (3, 7), (3, 8), (3, 9))


def _direct_launch_supported(launch: Launch) -> bool:
    import triton

    from qflax_kernels.launch import is_interpreted

    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    return version in _DIRECT_LAUNCH_TRITON and not is_interpreted(launch.kernel)


def _hooked(hook) -> bool:
    """Whether a Triton launch hook does anything (Triton >= 3.5 holds an empty ``HookChain`` by default)."""
    return hook is not None and (not hasattr(hook, "calls") or bool(hook.calls))


class _CompiledLaunches:
    """The compiled kernels of one launch, by what Triton specialises them on, launched directly.

    Triton compiles one kernel per specialisation of its arguments: pointer alignment to 16
    bytes and dtype, integer scalars equal to 1 or divisible by 16. Those properties of the
    arguments are the key here; a new key goes through ``JITFunction.run`` once (which compiles
    or finds the kernel and returns it), later calls launch it with Triton's own launcher on the
    current torch stream, exactly as ``JITFunction.run`` would. With a launch hook installed
    (profilers) every call goes through ``JITFunction.run``.
    """

    def __init__(self, launch: Launch):
        import torch
        from triton import knobs

        names = tuple(p.name for p in launch.kernel.params)
        positional = launch.argument_names()
        if names[:len(positional)] != positional:
            raise ValueError(f"{launch.name}: the kernel's constexpr parameters must follow its outputs, got {names}")
        self.launch = launch
        # The scalars are fixed per launch, so only the tensors' properties vary between calls.
        self.scalars = tuple(v for _, v in launch.scalars)
        given = launch.constexpr_dict()
        self.tail = tuple(given[name] for name in names[len(positional):])
        self.compiled: dict = {}
        # Looked up once: every call below is on the layer's hot path.
        self._hooks = knobs.runtime
        self._current_stream = torch._C._cuda_getCurrentRawStream

    def __call__(self, inputs, outputs):
        tensors = (*inputs, *outputs)
        device = tensors[0].device.index
        key = (device, tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors))
        kernel = self.compiled.get(key)
        if kernel is None or _hooked(self._hooks.launch_enter_hook) or _hooked(self._hooks.launch_exit_hook):
            kernel = _launch_through_triton(self.launch, inputs, outputs)
            self.compiled[key] = kernel
            return kernel
        g0, g1, g2 = self.launch.grid3
        stream = self._current_stream(device)
        kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *inputs, *self.scalars, *outputs, *self.tail)
        return kernel


def run(launch: Launch, inputs, poison: bool = False) -> list:
    """Allocates the outputs of ``launch`` next to ``inputs[0]``, launches it and returns them.

    Args:
      launch: what to run.
      inputs: torch tensors, one per array input of the kernel, in signature order.
      poison: fill non-zeroed outputs with NaN / 77 first (tests).

    Returns:
      The output tensors, in ``launch.outputs`` order.
    """
    outputs = allocate_outputs(launch, inputs[0].device, poison)
    launch_into(launch, inputs, outputs)
    return outputs


def from_numpy(array):
    """A torch CPU tensor with ``array``'s values (bfloat16 through its bits; numpy has no bf16)."""
    import ml_dtypes
    import torch

    array = np.asarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def to_numpy(tensor) -> np.ndarray:
    """The numpy twin of :func:`from_numpy`."""
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
