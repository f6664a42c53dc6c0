"""The direct launch of compiled kernels (``qflax_kernels.torch_launch._CompiledLaunches``) on a CUDA GPU.

After a specialisation's first call through ``JITFunction.run``, later calls launch the compiled
kernel with Triton's launcher directly. They must compute what Triton's own path computes, and
an argument Triton would specialise differently (a pointer off 16-byte alignment, another
dtype) must go through Triton again, never reuse a kernel compiled for other properties.
"""

import pytest
import torch

import torch_compat as tc
from qflax_kernels import fourbit_launch, torch_launch
from torch_compat import cuda_weights, kernel_launch

pytestmark = pytest.mark.gpu
K, N = 768, 1000


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA")


def _setup(rows):
    torch.manual_seed(0)
    layer = tc.nn.LinearNF4(K, N, compute_dtype=torch.bfloat16).cuda()
    weight = fourbit_launch.weight_inputs(*cuda_weights.fourbit_weight(layer))
    launch = fourbit_launch.matmul_launch(rows, N, K, 64, x_dtype="bfloat16", nested=True, has_bias=False,
                                          sm_count=kernel_launch.sm_count(torch.device("cuda")))
    return launch, weight


@pytest.mark.parametrize("rows", [1, 16])
def test_direct_launches_compute_what_triton_computes_and_respecialise(monkeypatch, rows):
    launch, weight = _setup(rows)
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    through_triton = []
    original = torch_launch._launch_through_triton
    monkeypatch.setattr(torch_launch, "_launch_through_triton",
                        lambda *a: through_triton.append(1) or original(*a))
    expected = torch_launch.allocate_outputs(launch, x.device)
    original(launch, fourbit_launch.matmul_inputs(x, weight, None), expected)
    first = torch_launch.run(launch, fourbit_launch.matmul_inputs(x, weight, None))
    again = [torch_launch.run(launch, fourbit_launch.matmul_inputs(x, weight, None)) for _ in range(3)]
    torch.cuda.synchronize()
    assert len(through_triton) == 1  # only the first call of this specialisation
    for out in [first, *again]:
        assert torch.equal(out[0], expected[0])
    # x at an address 2 bytes past 16-byte alignment: Triton's key differs, so its path runs again.
    buffer = torch.empty(rows * K + 1, device="cuda", dtype=torch.bfloat16)
    shifted = buffer[1:].view(rows, K)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    out = torch_launch.run(launch, fourbit_launch.matmul_inputs(shifted, weight, None))
    torch.cuda.synchronize()
    assert len(through_triton) == 2 and torch.equal(out[0], expected[0])
    # New inputs through the cached kernel: a different result, still Triton's.
    y = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    direct = torch_launch.run(launch, fourbit_launch.matmul_inputs(y, weight, None))
    reference = torch_launch.allocate_outputs(launch, y.device)
    original(launch, fourbit_launch.matmul_inputs(y, weight, None), reference)
    torch.cuda.synchronize()
    assert torch.equal(direct[0], reference[0]) and not torch.equal(direct[0], expected[0])


def test_direct_launches_are_captured_by_cuda_graphs():
    launch, weight = _setup(1)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    torch_launch.run(launch, fourbit_launch.matmul_inputs(x, weight, None))  # compiled and cached
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        (out, *_) = torch_launch.run(launch, fourbit_launch.matmul_inputs(x, weight, None))
    x.copy_(torch.randn(1, K, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    reference = torch_launch.allocate_outputs(launch, x.device)
    torch_launch._launch_through_triton(launch, fourbit_launch.matmul_inputs(x, weight, None), reference)
    torch.cuda.synchronize()
    assert torch.equal(out, reference[0])
