"""The cache of compiled launches in ``qflax_kernels.torch_launch``, on a stand-in kernel (no GPU needed).

A stand-in for a compiled ``@triton.jit`` function records what it is asked: the first call of a
specialisation must go through ``kernel[grid](...)`` (Triton's ``JITFunction.run``), later ones
must call the returned compiled kernel's ``run`` with Triton's argument convention (grid, stream,
function, metadata, hooks, then every parameter in signature order), and tensors Triton would
specialise differently (another dtype, a pointer off 16-byte alignment) must go through Triton
again. The GPU test ``tests/torch_compat_kernels/test_compiled_launch_gpu.py`` checks the same
against real kernels.
"""

import inspect

import pytest

torch = pytest.importorskip("torch")

from qflax_kernels import torch_launch  # noqa: E402
from qflax_kernels.launch import Output, make_launch  # noqa: E402


class _Compiled:
    function, packed_metadata = "function-handle", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _StandInKernel:
    """What the launcher reads of a compiled JITFunction: params, arg_names, and ``[grid](...)``."""

    def __init__(self):
        def signature(x_ptr, w_ptr, M, out_ptr, BLOCK, ASM):
            pass

        self.params = list(inspect.signature(signature).parameters.values())
        self.arg_names = [p.name for p in self.params]
        self.through_triton = []
        self.compiled = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.through_triton.append((grid, args, kwargs))
            self.compiled.append(_Compiled())
            return self.compiled[-1]

        return run


@pytest.fixture
def launch(monkeypatch):
    import triton

    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: f"stream-{device}", raising=False)
    # The mechanism under test, whatever Triton CI installed (the version list is policy).
    installed = tuple(int(part) for part in triton.__version__.split(".")[:2])
    monkeypatch.setattr(torch_launch, "_DIRECT_LAUNCH_TRITON", (installed,))
    kernel = _StandInKernel()
    return make_launch(kernel, (3, 2), num_warps=4, num_stages=2, constexprs={"ASM": True, "BLOCK": 64},
                       outputs=(Output((4,), "float32"),), name="stand-in", scalars={"M": 5})


def test_first_call_goes_through_triton_later_calls_launch_the_compiled_kernel(launch):
    x, w, out = torch.zeros(8), torch.zeros(8), torch.zeros(4)
    first = torch_launch.launch_into(launch, [x, w], [out])
    assert len(launch.kernel.through_triton) == 1
    grid, args, kwargs = launch.kernel.through_triton[0]
    assert grid == (3, 2, 1) and args[:2] == (x, w) and args[2] == 5 and args[3] is out
    assert kwargs["BLOCK"] == 64 and kwargs["ASM"] is True and kwargs["num_warps"] == 4
    second = torch_launch.launch_into(launch, [x, w], [out])
    assert second is first and len(launch.kernel.through_triton) == 1
    (run,) = first.runs
    assert run[:9] == (3, 2, 1, f"stream-{x.device.index}", "function-handle", "metadata", None, None, None)
    assert run[9:] == (x, w, 5, out, 64, True)  # every parameter in signature order, constexprs last


def test_another_dtype_or_alignment_goes_through_triton_again(launch):
    x, w, out = torch.zeros(8), torch.zeros(8), torch.zeros(4)
    torch_launch.launch_into(launch, [x, w], [out])
    torch_launch.launch_into(launch, [x.half(), w], [out])
    assert len(launch.kernel.through_triton) == 2
    shifted = torch.zeros(9)[1:]  # 4 bytes past the allocation's alignment
    assert shifted.data_ptr() % 16 != 0
    torch_launch.launch_into(launch, [shifted, w], [out])
    assert len(launch.kernel.through_triton) == 3
    torch_launch.launch_into(launch, [torch.ones(8), w], [out])  # aligned float32 again: cached
    assert len(launch.kernel.through_triton) == 3
    assert len(launch.kernel.compiled[0].runs) == 1


def test_an_installed_launch_hook_sends_every_call_through_triton(launch, monkeypatch):
    from triton import knobs

    x, w, out = torch.zeros(8), torch.zeros(8), torch.zeros(4)
    torch_launch.launch_into(launch, [x, w], [out])
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
    torch_launch.launch_into(launch, [x, w], [out])
    assert len(launch.kernel.through_triton) == 2 and not launch.kernel.compiled[0].runs


def test_constexprs_before_the_outputs_are_refused(monkeypatch):
    kernel = _StandInKernel()

    def signature(x_ptr, BLOCK, out_ptr):
        pass

    kernel.params = list(inspect.signature(signature).parameters.values())
    kernel.arg_names = [p.name for p in kernel.params]
    bad = make_launch(kernel, (1,), num_warps=1, num_stages=1, constexprs={"BLOCK": 8},
                      outputs=(Output((1,), "float32"),), name="bad")
    with pytest.raises(ValueError, match="constexpr parameters must follow its outputs"):
        torch_launch.launch_into(bad, [torch.zeros(1)], [torch.zeros(1)])
