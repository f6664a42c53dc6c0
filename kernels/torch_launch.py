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

    Zero-filled outputs must already be zero (:func:`allocate_outputs` does it).

    Returns:
      What Triton's launcher returns (the compiled kernel on a GPU).
    """
    launch.input_names(len(inputs))
    return launch.kernel[launch.grid3](
        *inputs, *(v for _, v in launch.scalars), *outputs,
        num_warps=launch.num_warps, num_stages=launch.num_stages, enable_fp_fusion=launch.enable_fp_fusion,
        **launch.constexpr_dict())


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
