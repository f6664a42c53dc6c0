"""Checkpoints cross both ways with bitsandbytes 0.49.2; state-dict keys/dtypes/shapes; pickle and copies."""

import copy
import io
import pickle

import pytest
import torch

import torch_compat as tc


def _quantized_pair(bnb_ref, ref_cls, our_cls, gen, **kw):
    ref, ours = ref_cls(128, 40, **kw), our_cls(128, 40, **kw)
    w, b = torch.randn(40, 128, generator=gen), torch.randn(40, generator=gen)
    for layer in (ref, ours):
        layer.weight.data, layer.bias.data = w.clone(), b.clone()
        layer.to("cpu")
    return ref, ours


@pytest.mark.parametrize("compress", [True, False])
def test_4bit_state_dict_keys_dtypes_shapes_and_bytes(bnb_ref, gen, compress):
    ref, ours = _quantized_pair(bnb_ref, bnb_ref.nn.LinearNF4, tc.nn.LinearNF4, gen, compress_statistics=compress)
    sd_ref, sd = ref.state_dict(), ours.state_dict()
    assert list(sd) == list(sd_ref)
    for key in sd:
        assert sd[key].dtype == sd_ref[key].dtype and sd[key].shape == sd_ref[key].shape, key
    json_key = "weight.quant_state.bitsandbytes__nf4"
    assert sd[json_key].device.type == "cpu"
    same = ["weight", "bias", "weight.absmax", "weight.quant_map"]
    if not compress:
        same.append(json_key)  # byte-identical packed JSON
    else:
        # Nested: same uint8 absmax codes and nested absmax; bitsandbytes' CPU run wrote -1.0 into entry 0 of its
        # dynamic map (docs/blockwise.md#dynamic-map) and its offset may differ in the last float32 bit (README).
        same.append("weight.nested_absmax")
        torch.testing.assert_close(sd["weight.nested_quant_map"][1:], sd_ref["weight.nested_quant_map"][1:],
                                   atol=0, rtol=0)
        assert sd["weight.nested_quant_map"][0] == torch.tensor(-0.99296874)
        offset, ref_offset = ours.weight.quant_state.offset, ref.weight.quant_state.offset
        assert abs(offset.item() - ref_offset.item()) <= 2 * torch.finfo(torch.float32).eps * abs(ref_offset.item())
    for key in same:
        assert torch.equal(sd[key], sd_ref[key]), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [True, False])
def test_4bit_checkpoint_bnb_to_ours_fresh_module(bnb_ref, gen, quant_type, compress):
    ref, _ = _quantized_pair(bnb_ref, bnb_ref.nn.Linear4bit, tc.nn.Linear4bit, gen, quant_type=quant_type,
                             compress_statistics=compress)
    ref.train()
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    fresh = tc.nn.Linear4bit(128, 40, quant_type=quant_type, compress_statistics=compress)  # never moved
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(3, 128, generator=gen)
    torch.testing.assert_close(fresh(x), ref(x), atol=1e-4, rtol=1e-4)
    assert torch.equal(fresh.weight.data, ref.weight.data)


def test_4bit_checkpoint_into_used_module_updates_quant_state(bnb_ref, gen):
    """bitsandbytes copies only the bytes here and keeps the stale quant state (docs/state_dict.md); we load both."""
    ref, ours = _quantized_pair(bnb_ref, bnb_ref.nn.LinearNF4, tc.nn.LinearNF4, gen)
    other, _ = _quantized_pair(bnb_ref, bnb_ref.nn.LinearNF4, tc.nn.LinearNF4, gen)
    x = torch.randn(2, 128, generator=gen)
    ours(x)
    ours.load_state_dict(other.state_dict())
    other.train()
    torch.testing.assert_close(ours(x), other(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compress", [True, False])
def test_4bit_checkpoint_ours_to_bnb(bnb_ref, gen, compress):
    _, ours = _quantized_pair(bnb_ref, bnb_ref.nn.LinearNF4, tc.nn.LinearNF4, gen, compress_statistics=compress)
    sd = ours.state_dict()
    x = torch.randn(3, 128, generator=gen)
    expected = ours(x)
    # bitsandbytes' supported path: Params4bit.from_prequantized
    target = bnb_ref.nn.LinearNF4(128, 40, compress_statistics=compress)
    weight = sd.pop("weight")
    target.bias.data = sd.pop("bias")
    target.weight = bnb_ref.nn.Params4bit.from_prequantized(data=weight, quantized_stats=dict(sd), device="cpu",
                                                            module=target)
    target.train()
    torch.testing.assert_close(target(x), expected, atol=1e-4, rtol=1e-4)
    # and our own from_prequantized gives the same state back
    ours2 = tc.nn.LinearNF4(128, 40, compress_statistics=compress)
    ours2.weight = tc.nn.Params4bit.from_prequantized(weight, sd, device="cpu", module=ours2)
    ours2.bias.data = target.bias.data
    assert ours2.weight.quant_state == ours.weight.quant_state
    torch.testing.assert_close(ours2(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_checkpoint_both_ways(bnb_ref, gen, threshold):
    ref, ours = _quantized_pair(bnb_ref, bnb_ref.nn.Linear8bitLt, tc.nn.Linear8bitLt, gen, has_fp16_weights=False,
                                threshold=threshold)
    sd_ref, sd = ref.state_dict(), ours.state_dict()
    assert list(sd) == list(sd_ref) == ["weight", "bias", "SCB", "weight_format"]
    for key in sd:
        assert sd[key].dtype == sd_ref[key].dtype and sd[key].shape == sd_ref[key].shape
        assert torch.equal(sd[key], sd_ref[key]), key
    # fp16 input: bitsandbytes' activation dtype, so both quantize the same values (README: fp32 inputs are
    # quantized in fp32 by qflax); tolerances are a few fp16 ulps
    x = torch.randn(4, 128, generator=gen).half()
    ref.eval()
    # bitsandbytes -> fresh torch_compat module (bitsandbytes itself raises RuntimeError here, docs/state_dict.md)
    fresh = tc.nn.Linear8bitLt(128, 40, has_fp16_weights=False, threshold=threshold)
    fresh.load_state_dict(sd_ref)
    torch.testing.assert_close(fresh(x), ref(x), atol=2e-2, rtol=2e-3)
    # ... and into a module that already ran forward passes (bitsandbytes raises RuntimeError)
    used = tc.nn.Linear8bitLt(128, 40, has_fp16_weights=False, threshold=threshold).to("cpu")
    used(x)
    used.load_state_dict(sd_ref)
    torch.testing.assert_close(used(x), fresh(x), atol=0, rtol=0)
    # torch_compat -> bitsandbytes (quantized module, as bitsandbytes requires)
    target = bnb_ref.nn.Linear8bitLt(128, 40, has_fp16_weights=False, threshold=threshold).to("cpu")
    target.load_state_dict(ours.state_dict())
    target.eval()
    torch.testing.assert_close(target(x), ours(x), atol=2e-2, rtol=2e-3)


def test_int8_state_dict_before_quantization_is_float(gen):
    layer = tc.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
    assert list(layer.state_dict()) == ["weight", "bias"] and layer.state_dict()["weight"].dtype == torch.float32


def test_embedding_4bit_and_8bit_save_and_load(gen):
    """Fixed: bitsandbytes raises NotImplementedError from state_dict() of both (docs/embeddings.md)."""
    ids = torch.tensor([[0, 5, 9]])
    for cls in (tc.nn.EmbeddingNF4, tc.nn.Embedding8bit):
        src = cls(10, 64).to("cpu")
        dst = cls(10, 64)
        dst.load_state_dict(src.state_dict())
        torch.testing.assert_close(dst(ids), src(ids), atol=0, rtol=0)


def _whole_module_roundtrip(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("make", [
    lambda: tc.nn.LinearNF4(64, 32),
    lambda: tc.nn.LinearFP4(64, 32, compress_statistics=False, quant_storage=torch.float32),
    lambda: tc.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0),
])
@pytest.mark.parametrize("run_first", [False, True])
def test_pickle_and_torch_save_whole_module(gen, make, run_first):
    layer = make().to("cpu")
    x = torch.randn(3, 64, generator=gen, requires_grad=True)
    if run_first:
        layer(x)
    restored = _whole_module_roundtrip(layer)
    restored2 = pickle.loads(pickle.dumps(layer))
    y = layer(x)
    for other in (restored, restored2):
        x2 = x.detach().clone().requires_grad_(True)
        y2 = other(x2)
        torch.testing.assert_close(y2, y, atol=0, rtol=0)
        y2.sum().backward()
        assert type(other.weight) is type(layer.weight)
    x.grad = None
    y.sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)


@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [True, False])
def test_params4bit_copy_deepcopy_pickle(gen, blocksize, quant_type, compress):
    param = tc.nn.Params4bit(torch.randn(32, 64, generator=gen), blocksize=blocksize, quant_type=quant_type,
                             compress_statistics=compress).to("cpu")
    shallow = copy.copy(param)
    assert shallow.quant_state is param.quant_state and shallow.data_ptr() == param.data_ptr()
    deep = copy.deepcopy(param)
    assert deep.quant_state is not param.quant_state and deep.data_ptr() != param.data_ptr()
    assert deep.quant_state == param.quant_state and torch.equal(deep.data, param.data)
    assert deep.__dict__.keys() == param.__dict__.keys()
    unpickled = pickle.loads(pickle.dumps(param))
    assert torch.equal(unpickled.data, param.data) and unpickled.requires_grad is False
    assert (unpickled.quant_type, unpickled.blocksize, unpickled.compress_statistics) == (
        quant_type, blocksize, compress)
    assert unpickled.quant_state == param.quant_state and unpickled.__dict__.keys() == param.__dict__.keys()


def test_params4bit_chunk_and_split_keep_attributes(gen):
    param = tc.nn.Params4bit(torch.randn(32, 64, generator=gen), quant_type="nf4").to("cpu")
    for parts in (torch.chunk(param, 4), torch.split(param, 256)):
        assert isinstance(parts, tuple) and all(isinstance(p, tc.nn.Params4bit) for p in parts)
        assert all(p.quant_type == "nf4" and p.quant_state is param.quant_state for p in parts)


def test_int8_module_copies(gen):
    layer = tc.nn.Linear8bitLt(32, 16, has_fp16_weights=False).to("cpu")
    shallow = copy.copy(layer)
    assert shallow.weight is layer.weight and shallow.bias is layer.bias
    deep = copy.deepcopy(layer)
    assert deep.weight.data_ptr() != layer.weight.data_ptr() and torch.equal(deep.weight, layer.weight)
    assert deep.state == layer.state
    assert torch.equal(deep.weight.SCB, layer.weight.SCB) and torch.equal(deep.weight.CB, layer.weight.CB)
    x = torch.randn(2, 32, generator=gen)
    torch.testing.assert_close(deep(x), layer(x), atol=0, rtol=0)


def _saved_size(state_dict) -> int:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getbuffer().nbytes


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_serialization_roundtrip_and_size(gen, quant_storage, quant_type):
    """bitsandbytes' test_linear4bit serialization (docs/state_dict.md): 300 -> 400, from_prequantized, file < 29 %."""
    linear = torch.nn.Linear(300, 400, dtype=torch.float16)
    layer = tc.nn.Linear4bit(300, 400, quant_type=quant_type, quant_storage=quant_storage, device="meta")
    layer.weight = tc.nn.Params4bit(data=linear.weight.data, quant_type=quant_type, quant_storage=quant_storage,
                                    module=layer)
    layer.bias = torch.nn.Parameter(linear.bias.data)
    layer = layer.to("cpu")
    assert layer.weight.dtype == quant_storage
    sd = layer.state_dict()
    assert _saved_size(sd) < 0.29 * _saved_size(linear.state_dict())
    bias = sd.pop("bias")
    weight = sd.pop("weight")
    reloaded = tc.nn.Linear4bit(300, 400, quant_type=quant_type, quant_storage=quant_storage)
    reloaded.weight = tc.nn.Params4bit.from_prequantized(data=weight, quantized_stats=sd, device="cpu",
                                                         module=reloaded)
    reloaded.bias = torch.nn.Parameter(bias)
    # compare bytes: packed codes viewed as floats can be NaN patterns
    assert torch.equal(reloaded.weight.data.view(torch.uint8), layer.weight.data.view(torch.uint8))
    assert reloaded.weight.dtype == quant_storage
    assert reloaded.weight.quant_state == layer.weight.quant_state
    x = torch.randn(3, 300, generator=gen)
    torch.testing.assert_close(reloaded(x), layer(x), atol=0, rtol=0)


def test_int8_state_dict_size(gen):
    layer = tc.nn.Linear8bitLt(256, 256, has_fp16_weights=False)
    fp32_size = _saved_size(layer.state_dict())
    assert _saved_size(layer.to("cpu").state_dict()) < 0.5 * fp32_size
