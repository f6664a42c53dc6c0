"""SwitchBackLinear (global / vector-wise / mem-efficient), StandardLinear and SwitchBackLinearBnb.

bitsandbytes 0.49.2 cannot run these on this machine (SwitchBackLinear needs Triton on a GPU and
its kernels fail to compile on Triton 3.x; SwitchBackLinearBnb's forward raises
AttributeError), so the references are independent torch formulas of the intended maths (docs/switchback.md).
"""

import pytest
import torch

import torch_compat as bnb


def _rowwise(x):
    scale = x.abs().amax(1, keepdim=True)
    return torch.round(x * (127 / scale)), scale


def _switchback_reference(x2, w, b, vectorwise):
    xq, sx = _rowwise(x2)
    if vectorwise:
        wq, sw = _rowwise(w)
        sw = sw.T
    else:
        sw = w.abs().max()
        wq = torch.round(w * (127 / sw))
    return (xq @ wq.T) * sx * sw / (127 * 127) + b


@pytest.mark.parametrize("cls,vectorwise", [
    (bnb.nn.SwitchBackLinearGlobal, False),
    (bnb.nn.SwitchBackLinearVectorwise, True),
    (lambda *a, **k: bnb.nn.SwitchBackLinear(*a, mem_efficient=True, **k), False),
])
def test_switchback_forward_and_gradients(cls, vectorwise, gen):
    layer = cls(83, 33)
    assert isinstance(layer, bnb.nn.SwitchBackLinear)
    x = torch.randn(13, 2, 83, generator=gen, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (13, 2, 33)
    expected = _switchback_reference(x.detach().reshape(-1, 83), layer.weight.detach(), layer.bias.detach(),
                                     vectorwise)
    torch.testing.assert_close(y.reshape(-1, 33), expected, atol=1e-4, rtol=1e-4)
    g = torch.randn(13, 2, 33, generator=gen)
    y.backward(g)
    g2, x2 = g.reshape(-1, 33), x.detach().reshape(-1, 83)
    # the weight gradient is computed in full precision ("switch back"); mem-efficient keeps only the int8 input
    if layer.mem_efficient:
        xq, sx = _rowwise(x2)
        x2 = xq * sx / 127
    torch.testing.assert_close(layer.weight.grad, g2.T @ x2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.bias.grad, g2.sum(0))
    exact = (g2 @ layer.weight.detach()).reshape(x.shape)
    assert (x.grad - exact).abs().mean() < 0.02 * exact.abs().mean()


def test_switchback_bf16_returns_input_dtype_and_prepare_for_eval(gen, capsys):
    layer = bnb.nn.SwitchBackLinearVectorwise(64, 32)
    x = torch.randn(5, 64, generator=gen)
    assert layer(x.bfloat16()).dtype == torch.bfloat16  # bitsandbytes: always fp16
    y_train = layer(x)
    layer.eval()
    layer.prepare_for_eval()
    assert "preparing for eval" in capsys.readouterr().out
    assert not hasattr(layer, "weight") and layer.W_int8.dtype == torch.int8 and layer.state_W.shape == (32,)
    torch.testing.assert_close(layer(x), y_train, atol=1e-5, rtol=1e-5)


def test_switchback_vectorwise_mem_efficient_raises_value_error():
    """Fixed: bitsandbytes prints a message and calls exit(1)."""
    with pytest.raises(ValueError, match="mem_efficient"):
        bnb.nn.SwitchBackLinear(8, 8, vector_wise_quantization=True, mem_efficient=True)


def test_standard_linear_equals_torch_linear(gen):
    layer = bnb.nn.StandardLinear(16, 8)
    ref = torch.nn.Linear(16, 8)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 16, generator=gen)
    torch.testing.assert_close(layer(x), ref(x))


@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_switchback_linear_bnb_intended_semantics(bnb_ref, gen, threshold):
    """Fixed: bitsandbytes' forward raises AttributeError (bnb.matmul_mixed does not exist)."""
    layer = bnb.nn.SwitchBackLinearBnb(48, 24, threshold=threshold).to("cpu")
    assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad
    x = torch.randn(6, 48, generator=gen)
    x[:, 4] = 5.0
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    # reference: LLM.int8 from bitsandbytes' own primitives (row-quantized fp16 input and weight)
    F = bnb_ref.functional
    CA, SCA, cols = F.int8_vectorwise_quant(x.half(), threshold)
    CB, SCB, _ = F.int8_vectorwise_quant(layer.weight.detach().half())
    ref = (CA.float() @ CB.float().T) * SCA[:, None] * SCB[None, :] / (127 * 127) + layer.bias.detach()
    if threshold:
        w_deq = CB.float() * SCB[:, None] / 127
        ref = ref + x[:, cols] @ w_deq[:, cols].T
        assert layer.state.idx.tolist() == cols.tolist()
    # qflax may quantize the float32 weight directly (bitsandbytes casts to fp16 first): codes can differ by 1
    torch.testing.assert_close(y, ref, atol=1e-2, rtol=1e-2)
    g = torch.randn(6, 24, generator=gen)
    y.backward(g)
    torch.testing.assert_close(layer.weight.grad, g.T @ x, atol=1e-4, rtol=1e-5)  # full precision
    torch.testing.assert_close(xr.grad, g @ (CB.float() * SCB[:, None] / 127), atol=1e-2, rtol=1e-2)
    frozen = bnb.nn.SwitchBackLinearBnb(48, 24, has_fp16_weights=False).to("cpu")
    assert frozen.weight.dtype == torch.int8 and frozen(x).dtype == torch.float32
