"""The ``qflax::`` ops under torch.compile: registered correctly, traced whole (``fullgraph=True``).

``torch.library.opcheck`` checks each op's schema, fake implementation, autograd registration
and AOT dispatch with dynamic shapes. A small model of Linear4bit and Linear8bitLt layers then
compiles with no graph break (fullgraph raises on one), its graph holds the ops, and compiled
results and gradients equal the eager direct path's. Kernels run in Triton's interpreter.
"""

import os

import pytest
import torch

import torch_compat as tc
from qflax.ops import use_backend
from torch_compat import direct_path

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the direct path runs on CPU only in Triton's interpreter")


def _fourbit_inputs(nested, gen):
    layer = tc.nn.LinearNF4(128, 24, compress_statistics=nested).to("cpu")
    from torch_compat import cuda_weights

    weight = cuda_weights.fourbit_views(layer.weight, layer.weight.quant_state)
    x = torch.randn(3, 128, generator=gen, dtype=torch.float32, requires_grad=True)
    return x, weight, layer.bias.detach().clone().requires_grad_()


@pytest.mark.parametrize("nested", [False, True])
def test_opcheck_fourbit_ops(nested, gen):
    x, weight, bias = _fourbit_inputs(nested, gen)
    torch.library.opcheck(torch.ops.qflax.matmul_4bit.default, (x, *weight, bias, 24, 64))
    g = torch.randn(3, 24, generator=gen)
    torch.library.opcheck(torch.ops.qflax.grad_input_4bit.default, (g, *weight, 128, 64))


def test_opcheck_int8_ops(gen):
    w = torch.randn(16, 48, generator=gen)
    codes, scale = torch.ops.qflax.int8_quantize_rows(w)
    torch.library.opcheck(torch.ops.qflax.int8_quantize_rows.default, (w,))
    x = torch.randn(5, 48, generator=gen)
    x[1, 7] = 20.0
    x.requires_grad_()
    bias = torch.randn(16, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.qflax.llm_int8_matmul.default, (x, codes, scale, bias, 6.0))
    torch.library.opcheck(torch.ops.qflax.llm_int8_matmul_trainable.default,
                          (x, w.clone().requires_grad_(), bias, 6.0))


class _Block(torch.nn.Module):
    """An MLP-like block with both kinds of layers, fp16 activations, one 4-bit layer double-quantized."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = tc.nn.LinearNF4(128, 96, compress_statistics=True)
        self.mid = tc.nn.Linear8bitLt(96, 64, has_fp16_weights=False, threshold=6.0)
        self.down = tc.nn.LinearFP4(64, 32, compress_statistics=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.mid(self.up(x) * 4)))


def _graph_recorder(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    return backend


def test_fullgraph_compile_holds_the_ops_and_matches_eager(gen):
    model = _Block().to("cpu").half()
    xs = [torch.randn(rows, 128, generator=gen).half() for rows in (1, 5, 9)]
    graphs = []
    with use_backend("triton"), torch.no_grad():
        eager = [model(x) for x in xs]
        assert direct_path.last_path(direct_path.LINEAR_4BIT) == direct_path.KERNEL
        compiled = torch.compile(model, fullgraph=True, backend=_graph_recorder(graphs))
        outs = [compiled(x) for x in xs]  # new row counts: a dynamic-shape recompile, still one graph
    for got, want in zip(outs, eager):
        assert torch.equal(got, want)
    assert graphs and all("qflax.matmul_4bit" in code and "qflax.llm_int8_matmul" in code for code in graphs)
    assert all("dlpack" not in code.lower() for code in graphs)


def test_fullgraph_aot_compile_of_a_fresh_model_gives_eager_gradients(gen):
    x = torch.randn(4, 128, generator=gen)
    g = torch.randn(4, 32, generator=gen)
    results = []
    for compile_it in (False, True):
        model = _Block().to("cpu")
        for layer in (model.up, model.down):
            layer.bias.requires_grad_(True)
        xi = x.clone().requires_grad_()
        with use_backend("triton"):
            run = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_it else model
            out = run(xi)  # the compiled model's first call: compute dtypes are set inside the trace
            out.backward(g)
        results.append([out.detach(), xi.grad, model.up.bias.grad, model.down.bias.grad, model.mid.bias.grad])
    for got, want in zip(*results):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_eager_calls_skip_the_dispatcher_only_where_nothing_would_see_it(gen):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = tc.nn.LinearNF4(128, 24).to("cpu")
    x = torch.randn(2, 128, generator=gen)
    with use_backend("triton"), torch.no_grad():
        plain = layer(x)
        with Recorder() as recorder:  # a dispatch mode must see the op, so the op is called
            seen = layer(x)
    assert any("qflax.matmul_4bit" in op for op in recorder.ops)
    assert torch.equal(plain, seen)
