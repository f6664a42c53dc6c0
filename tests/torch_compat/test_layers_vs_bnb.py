"""Every quantized layer against bitsandbytes 0.49.2 on CPU: same weights and inputs, outputs and gradients."""

import dataclasses

import pytest
import torch

import torch_compat as tc


def _pair(make_ref, make_ours, weight, bias=None):
    """Builds a bitsandbytes layer and ours with the same float weight (and bias) and quantizes both on CPU."""
    ref, ours = make_ref(), make_ours()
    for layer in (ref, ours):
        with torch.no_grad():
            layer.weight.data = weight.clone()
            if bias is not None:
                layer.bias.data = bias.clone()
        layer.to("cpu")
    return ref, ours


def _run(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_matches_bnb_in_train_mode(bnb_ref, gen, quant_type, compress, dtype):
    w = torch.randn(48, 128, generator=gen)
    b = torch.randn(48, generator=gen)
    ref, ours = _pair(
        lambda: bnb_ref.nn.Linear4bit(128, 48, compress_statistics=compress, quant_type=quant_type),
        lambda: tc.nn.Linear4bit(128, 48, compress_statistics=compress, quant_type=quant_type),
        w, b,
    )
    if quant_type == "fp4":
        # bitsandbytes' CPU FP4 quantizer uses a 4-decimal table (docs/fourbit.md#rounding) and picks other codes for
        # ~0.4 % of values; compare the matmul on bitsandbytes' own packed weight (loaded from its state dict).
        ours.load_state_dict(ref.state_dict())
    else:
        assert torch.equal(ours.weight.data, ref.weight.data)
    ref.train()
    x = torch.randn(2, 5, 128, generator=gen).to(dtype)
    y_ref, g_ref = _run(ref, x)
    y, g = _run(ours, x)
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(g, g_ref, **tol)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad.to(ours.bias.grad.dtype), **tol)
    assert ours.weight.grad is None


def test_linear4bit_compute_dtype_rules(bnb_ref, gen):
    """fp32 input with compute bf16: computed in bf16, returned fp32 (same as bitsandbytes)."""
    w = torch.randn(32, 64, generator=gen)
    ref, ours = _pair(lambda: bnb_ref.nn.LinearNF4(64, 32, compute_dtype=torch.bfloat16),
                      lambda: tc.nn.LinearNF4(64, 32, compute_dtype=torch.bfloat16), w, torch.randn(32, generator=gen))
    ref.train()
    x = torch.randn(4, 64, generator=gen)
    y_ref, y = ref(x), ours(x)
    assert y.dtype == torch.float32 and ours.compute_dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=0.15, rtol=0.02)  # a few bf16 ulps
    exact = x @ tc.functional.dequantize_4bit(ours.weight.data, ours.weight.quant_state).T + ours.bias
    assert (y - exact).abs().max() > 1e-4  # really computed in bf16


@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_linear8bitlt_matches_bnb_int8_path(bnb_ref, gen, threshold):
    """bitsandbytes' CPU int8 path is its eval mode (train mode on CPU skips activation quantization)."""
    w = torch.randn(40, 96, generator=gen)
    b = torch.randn(40, generator=gen)
    ref, ours = _pair(lambda: bnb_ref.nn.Linear8bitLt(96, 40, has_fp16_weights=False, threshold=threshold),
                      lambda: tc.nn.Linear8bitLt(96, 40, has_fp16_weights=False, threshold=threshold), w, b)
    assert torch.equal(ours.weight.data, ref.weight.data) and torch.equal(ours.weight.SCB, ref.weight.SCB)
    ref.eval()
    ours.eval()
    x = torch.randn(3, 7, 96, generator=gen)
    x[:, :, 5] *= 8  # an outlier column for threshold 3
    # fp16 input (bitsandbytes' own activation dtype): same int8 codes, so the outputs agree closely
    y_ref, g_ref = _run(ref, x.half())
    y, g = _run(ours, x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-3)  # a few fp16 ulps
    torch.testing.assert_close(g, g_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad.float(), atol=1e-2, rtol=1e-3)
    if threshold:
        assert torch.equal(ours.state.idx, ref.state.idx)
    assert ours.state.CB is not None and ours.weight.dtype == torch.int8
    ref.bias.data = b.clone()  # bitsandbytes re-typed its bias to fp16 in place (docs/deviations.md); ours did not
    # fp32 input: qflax quantizes the activations in fp32, bitsandbytes from an fp16 copy (README);
    # both are LLM.int8 approximations of the float product with errors of the same size
    with pytest.warns(UserWarning):  # bitsandbytes: "inputs will be cast from torch.float32 to float16"
        y_ref, g_ref = _run(ref, x)
    y, g = _run(ours, x)
    exact = x @ (ref.state.CB.float() * ref.state.SCB[:, None] / 127).T + b
    err, err_ref = (y - exact).abs().mean(), (y_ref - exact).abs().mean()
    assert err <= 1.25 * err_ref, (err, err_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)  # input gradient: G @ dequant(W) in both


def test_linear8bitlt_fp16_weights_true_gradient(gen):
    """has_fp16_weights=True: the weight gradient is the exact G^T X (bitsandbytes' is wrong, docs/int8.md#gradients)."""
    layer = tc.nn.Linear8bitLt(64, 16, has_fp16_weights=True).to("cpu")
    assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad
    x = torch.randn(12, 64, generator=gen)
    g_out = torch.randn(12, 16, generator=gen)
    layer(x).backward(g_out)
    torch.testing.assert_close(layer.weight.grad, g_out.T @ x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, g_out.sum(0))


def test_embedding8bit_matches_bnb(bnb_ref, gen):
    w = torch.randn(50, 64, generator=gen)
    ref, ours = _pair(lambda: bnb_ref.nn.Embedding8bit(50, 64), lambda: tc.nn.Embedding8bit(50, 64), w)
    ids = torch.randint(0, 50, (4, 6), generator=gen)
    torch.testing.assert_close(ours(ids), ref(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dim", [64, 65])
def test_embedding4bit_matches_bnb(bnb_ref, gen, quant_type, dim):
    w = torch.randn(30, dim, generator=gen)
    with pytest.warns(UserWarning) if dim % 64 else _nothing():
        ref, ours = _pair(lambda: bnb_ref.nn.Embedding4bit(30, dim, quant_type=quant_type),
                          lambda: tc.nn.Embedding4bit(30, dim, quant_type=quant_type), w)
    ids = torch.randint(0, 30, (3, 5), generator=gen)
    if quant_type == "nf4":
        assert torch.equal(ours.weight.data, ref.weight.data)
    else:  # CPU FP4 codes differ (docs/fourbit.md#rounding): use bitsandbytes' packed weight
        stats = ref.weight.quant_state.as_dict(packed=True)
        ours.weight = tc.nn.Params4bit.from_prequantized(ref.weight.data, stats, device="cpu", module=ours)
    # dim 65 FP4: bitsandbytes dequantizes with its 4-decimal FP4 table (docs/deviations.md#cpu-decoder), qflax with
    # the exact one.
    tol = dict(atol=1e-6, rtol=1e-6) if quant_type == "nf4" or dim == 64 else dict(atol=1e-3, rtol=2e-3)
    torch.testing.assert_close(ours(ids), ref(ids), **tol)


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_embedding_and_stable_embedding_match_bnb(bnb_ref, gen):
    torch.manual_seed(3)
    ref = bnb_ref.nn.StableEmbedding(20, 16, padding_idx=2)
    torch.manual_seed(3)
    ours = tc.nn.StableEmbedding(20, 16, padding_idx=2)
    assert torch.equal(ref.weight, ours.weight)
    ids = torch.tensor([[0, 2, 5], [19, 2, 1]])
    torch.testing.assert_close(ours(ids), ref(ids))
    torch.manual_seed(4)
    ref = bnb_ref.nn.Embedding(20, 16, padding_idx=0)
    torch.manual_seed(4)
    ours = tc.nn.Embedding(20, 16, padding_idx=0)
    assert torch.equal(ref.weight, ours.weight) and ours.weight[0].abs().sum() == 0
    bound = (6 / (20 + 16)) ** 0.5
    assert ours.weight.abs().max() <= bound


def test_matmul_4bit_functional_matches_bnb(bnb_ref, gen):
    w = torch.randn(24, 64, generator=gen)
    qr, sr = bnb_ref.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    q, s = tc.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    x = torch.randn(3, 64, generator=gen)
    b = torch.randn(24, generator=gen)
    torch.testing.assert_close(tc.matmul_4bit(x, q.t(), s, bias=b), bnb_ref.matmul_4bit(x, qr.t(), sr, bias=b),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tc.functional.gemv_4bit(x[:1], q.t(), state=s), x[:1] @ tc.functional.dequantize_4bit(q, s).T,
                               atol=1e-4, rtol=1e-4)


def test_matmul_int8_functional(bnb_ref, gen):
    """bnb.matmul with an int8 weight and its SCB equals the LLM.int8 result of bitsandbytes (eval path)."""
    w = torch.randn(16, 32, generator=gen)
    x = torch.randn(5, 32, generator=gen).half()
    CB, SCB, _ = tc.functional.int8_vectorwise_quant(w.half())
    state = tc.MatmulLtState()
    state.SCB = SCB
    ours = tc.matmul(x, CB, state=state)
    rstate = bnb_ref.MatmulLtState()
    rstate.CB, rstate.SCB, rstate.has_fp16_weights, rstate.is_training = CB, SCB, False, False
    ref = bnb_ref.matmul(x, CB, state=rstate)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)


def test_outlier_idx_is_found_on_the_device_and_read_when_asked(bnb_ref, gen):
    """state.idx holds bitsandbytes' value, but the forward leaves it as a device mask (no host read)."""
    x = torch.randn(4, 96, generator=gen)
    x[:, 11] = 9.0
    x[2, 70] = -9.0
    ours = tc.nn.Linear8bitLt(96, 40, has_fp16_weights=False, threshold=6.0).to("cpu")
    ours(x.half())
    columns = ours.state.__dict__["_idx_columns"]
    assert columns.dtype == torch.bool and columns.shape == (96,)
    assert ours.state.idx.tolist() == [11, 70] and ours.state.idx.dtype == torch.int64
    assert ours.state.__dict__["_idx_columns"] is None  # read once, then a plain value
    ours.state.idx = torch.tensor([1])  # assignment still works, as on bitsandbytes' dataclass
    assert ours.state.idx.tolist() == [1]
    fields = [f.name for f in dataclasses.fields(ours.state)]
    assert fields == [f.name for f in dataclasses.fields(bnb_ref.autograd._functions.MatmulLtState)]
