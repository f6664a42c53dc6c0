"""What bitsandbytes' own tests check of the 18 names (the fixed ones tested as fixed), device moves
(docs/torch_compat.md#device-movement) and warnings (docs/deviations.md#warnings)."""

import functools
import warnings

import pytest
import torch

import torch_compat as bnb

NAMES = ["Embedding", "StableEmbedding", "Embedding4bit", "Embedding8bit", "EmbeddingFP4", "EmbeddingNF4",
         "OutlierAwareLinear", "Linear4bit", "Linear8bitLt", "LinearFP4", "LinearNF4", "SwitchBackLinearBnb",
         "Int8Params", "Params4bit", "StandardLinear", "SwitchBackLinear", "SwitchBackLinearGlobal",
         "SwitchBackLinearVectorwise"]


def test_the_18_names_and_their_signatures(bnb_ref):
    import inspect

    assert sorted(bnb.nn.__all__) == sorted(NAMES)
    for name in NAMES:
        ours, ref = getattr(bnb.nn, name), getattr(bnb_ref.nn, name)
        if isinstance(ref, functools.partial):
            assert isinstance(ours, functools.partial) and ours.keywords == ref.keywords
            continue
        target = "__new__" if name in ("Int8Params", "Params4bit") else "__init__"
        ref_params = inspect.signature(getattr(ref, target)).parameters
        our_params = inspect.signature(getattr(ours, target)).parameters
        assert list(our_params) == list(ref_params), name
        for p in ref_params:
            assert our_params[p].default == ref_params[p].default, (name, p)


@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_linear8bitlt_int8_under_moves_and_half(threshold, gen):
    layer = bnb.nn.Linear8bitLt(32, 64, threshold=threshold, has_fp16_weights=False).to("cpu").half()
    assert layer.weight.device.type == "cpu" and layer.weight.dtype == torch.int8
    x = torch.randn(16, 8, 32, generator=gen).half()
    for _ in range(2):
        out = layer(x)
    assert layer.state.CB is not None and out.dtype == torch.float16
    assert layer.weight.SCB is None  # moved into state by the first forward, as bitsandbytes
    if threshold:
        assert layer.state.idx is not None


def test_bias_dtype_is_never_retyped(gen):
    """Fixed: bitsandbytes re-types the bias to the input dtype at forward (docs/deviations.md#quirks: the bias)."""
    for layer in (bnb.nn.Linear8bitLt(32, 64, has_fp16_weights=False).to("cpu"), bnb.nn.LinearNF4(32, 64).to("cpu")):
        assert layer.weight.dtype in (torch.int8, torch.uint8) and layer.bias.dtype == torch.float32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = layer(torch.randn(2, 32, generator=gen).half())
        assert out.dtype == torch.float16 and layer.bias.dtype == torch.float32
    assert bnb.nn.LinearNF4(32, 64, bias=False).to("cpu").bias is None


@pytest.mark.parametrize("make", [
    lambda: bnb.nn.Linear8bitLt(32, 32, has_fp16_weights=False),
    lambda: bnb.nn.Linear4bit(32, 32),
    lambda: bnb.nn.LinearFP4(32, 32, compress_statistics=False),
    lambda: bnb.nn.LinearNF4(32, 32, compute_dtype=torch.bfloat16),
])
def test_kbit_backprop_matches_float_reference(make, gen):
    """Gradient of a preceding float Linear through the quantized layer equals the float reference's (test_kbit_backprop)."""
    torch.manual_seed(0)
    pre, kbit = torch.nn.Linear(32, 32), make()
    ref = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    ref[0].load_state_dict(pre.state_dict())
    kbit.to("cpu")
    w = (bnb.functional.dequantize_4bit(kbit.weight.data, kbit.weight.quant_state)
         if kbit.weight.dtype == torch.uint8 else kbit.weight.float() * kbit.weight.SCB[:, None] / 127)
    ref[1].weight.data, ref[1].bias.data = w.float(), kbit.bias.data.clone()
    x = torch.randn(16, 32, generator=gen)
    model = torch.nn.Sequential(pre, kbit)
    out, out_ref = model(x), ref(x)
    out.mean().backward()
    out_ref.mean().backward()
    torch.testing.assert_close(pre.weight.grad, ref[0].weight.grad, atol=0.008, rtol=0.05)
    torch.testing.assert_close(pre.bias.grad, ref[0].bias.grad, atol=0.008, rtol=0.05)
    model.zero_grad()
    assert pre.weight.grad is None or pre.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("cls", [bnb.nn.Embedding8bit, bnb.nn.EmbeddingFP4, bnb.nn.EmbeddingNF4])
@pytest.mark.parametrize("dim", [64, 65])
@pytest.mark.parametrize("ids_shape", [(10,), (10, 10), (10, 10, 10)])
def test_embeddings_reproduce_ones_exactly(cls, dim, ids_shape, gen):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = cls(100, dim)
    emb = torch.nn.Embedding(100, dim)
    emb.weight.data = torch.randint(0, 2, (100, dim), generator=gen).float() * 2 - 1
    layer.load_state_dict(emb.state_dict())
    layer.to("cpu")
    ids = torch.randint(0, 100, ids_shape, generator=gen)
    torch.testing.assert_close(layer(ids), emb(ids), atol=0, rtol=0)
    emb.weight.data = torch.rand(100, dim, generator=gen)
    layer2 = cls(100, dim) if dim == 64 else None
    if layer2 is not None:
        layer2.load_state_dict(emb.state_dict())
        layer2.to("cpu")
        atol = 0.05 if cls is bnb.nn.Embedding8bit else 0.2
        torch.testing.assert_close(layer2(ids), emb(ids), atol=atol, rtol=0)


def test_linear4bit_fp16_warnings_once_per_layer_no_global_filter(gen):
    """Fixed: bitsandbytes installs process-wide ignore filters after its first warning (docs/deviations.md)."""
    layers = [bnb.nn.Linear4bit(64, 64, quant_type="nf4").to("cpu") for _ in range(3)]
    with pytest.warns(UserWarning, match="inference or training") as multi:
        layers[0](torch.randn(10, 64, generator=gen).half())
        layers[0](torch.randn(10, 64, generator=gen).half())  # same layer: no second warning
    with pytest.warns(UserWarning, match=r"inference\.$") as single:
        layers[1](torch.randn(1, 64, generator=gen).half())
    with pytest.warns(UserWarning, match="inference or training"):  # not silenced by a global filter
        layers[2](torch.randn(10, 64, generator=gen).half())
    assert len([w for w in multi if "Linear4bit" in str(w.message)]) == 1
    assert len([w for w in single if "Linear4bit" in str(w.message)]) == 1
    assert not any("inference" in str(f[1].pattern if f[1] else "") for f in warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnb.nn.LinearNF4(64, 64, compute_dtype=torch.float32).to("cpu")(torch.randn(2, 64).half())


def test_embedding4bit_size_warning():
    with pytest.warns(UserWarning, match="inference."):
        bnb.nn.Embedding4bit(128, 65, quant_type="nf4")


def test_fsdp_fix_restores_quant_state(gen):
    for layer, x in ((bnb.nn.Linear4bit(64, 64).to("cpu"), torch.randn(2, 64, generator=gen)),
                     (bnb.nn.Embedding4bit(10, 64).to("cpu"), torch.tensor([1, 2]))):
        expected = layer(x)
        layer.weight.quant_state = None
        torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
        assert layer.weight.quant_state is layer.quant_state


def test_unquantized_4bit_forward_warns_then_asserts(gen):
    layer = bnb.nn.Linear4bit(64, 64)
    with pytest.warns(UserWarning, match="FP4 quantization state not initialized"), pytest.raises(AssertionError):
        layer(torch.randn(2, 64, generator=gen))


def test_quantization_happens_on_first_move_and_dtype_is_ignored():
    layer = bnb.nn.LinearNF4(64, 32)
    assert layer.weight.dtype == torch.float32 and not layer.weight.bnb_quantized
    layer.to("cpu", torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.dtype == torch.float32
    assert layer.weight.shape == (64 * 32 // 2, 1) and layer.quant_state is layer.weight.quant_state
    half_first = bnb.nn.LinearNF4(64, 32).half().to("cpu")
    assert half_first.weight.quant_state.dtype == torch.float16
    int8 = bnb.nn.Int8Params(torch.randn(4, 8), has_fp16_weights=True).to("cpu")
    assert int8.dtype == torch.float32


def test_linear4bit_moved_to_cpu_again_keeps_working(gen):
    layer = bnb.nn.LinearNF4(64, 32).to("cpu")
    x = torch.randn(3, 64, generator=gen)
    y = layer(x)
    layer.cpu().to("cpu")
    torch.testing.assert_close(layer(x), y, atol=0, rtol=0)


def test_embedding_and_stable_embedding(gen):
    emb = bnb.nn.Embedding(20, 8, padding_idx=3)
    assert emb.weight[3].abs().sum() == 0 and emb.weight.abs().max() <= (6 / 28) ** 0.5
    stable = bnb.nn.StableEmbedding(20, 8, device="cpu", dtype=torch.float16)  # fixed: honoured, not frozen
    assert stable.weight.dtype == torch.float16 and stable.weight.requires_grad
    out = stable(torch.tensor([[1, 2]]))
    assert out.dtype == torch.float16 and out.shape == (1, 2, 8)
    torch.testing.assert_close(out.float().mean(-1), torch.zeros(1, 2), atol=1e-3, rtol=0)


def test_outlier_aware_linear_calls_forward_with_outliers(gen):
    """Fixed: bitsandbytes' forward returns None (docs/int8.md#outlier-aware)."""
    class Clipped(bnb.nn.OutlierAwareLinear):
        def quantize_weight(self, w, outlier_idx):
            return w.clamp(-0.1, 0.1)

        def forward_with_outliers(self, x, outlier_idx):
            return torch.nn.functional.linear(x, self.weight, self.bias) * 0 + (
                -1 if outlier_idx is None else outlier_idx.numel())

    model = torch.nn.Sequential(Clipped(16, 16), Clipped(16, 16))
    bnb.utils.OutlierTracer.get_instance().initialize(model)
    x = torch.randn(4, 16, generator=gen)
    x[:, 3] = 10.0  # a hidden dim with |x| > 6
    model(x)  # tracing pass (forward pre-hooks)
    out = model[0](x)
    assert out is not None and out.shape == (4, 16)
    assert model[0].is_quantized and model[0].weight.abs().max() <= 0.1
    assert 3 in bnb.utils.OutlierTracer.get_instance().get_outliers(model[0].weight).tolist()
    with pytest.raises(NotImplementedError, match="quantize_weights"):
        bnb.nn.OutlierAwareLinear(4, 4)(torch.randn(1, 4))


def test_outlier_tracer_and_find_outlier_dims_match_bnb(bnb_ref, gen):
    w = torch.randn(64, 32, generator=gen)
    w[:, 7] *= 20
    assert torch.equal(bnb.utils.find_outlier_dims(w), bnb_ref.utils.find_outlier_dims(w))
    assert torch.equal(bnb.utils.find_outlier_dims(w, topk=3), bnb_ref.utils.find_outlier_dims(w, topk=3))
    with pytest.raises(RuntimeError, match="get_instance"):
        bnb.utils.OutlierTracer()
    d = {"a": 1, "b": [1, 2]}
    assert torch.equal(bnb.utils.pack_dict_to_tensor(d), bnb_ref.utils.pack_dict_to_tensor(d))
    assert bnb.utils.unpack_tensor_to_dict(bnb.utils.pack_dict_to_tensor(d)) == d
    assert bnb.utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING == bnb_ref.utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING


def test_matmullt_state(bnb_ref):
    import dataclasses

    assert [f.name for f in dataclasses.fields(bnb.MatmulLtState)] == [
        f.name for f in dataclasses.fields(bnb_ref.MatmulLtState)]
    state = bnb.MatmulLtState()
    state.CB = torch.ones(2)
    state.reset_grads()
    assert state.CB is None and state == bnb.MatmulLtState()
    with pytest.raises(ValueError, match="tile_indices"):
        state.tile_indices
