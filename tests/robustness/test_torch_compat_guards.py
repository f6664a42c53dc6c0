"""torch_compat: autograd against in-place edits, dtype casts of packed storage, torch.compile."""

import pytest
import torch

import torch_compat as bnb

IN, OUT = 64, 64


def _x():
    return torch.randn(4, IN, generator=torch.Generator().manual_seed(0), requires_grad=True)


READS_INPUTS = {
    "torch.nn.Linear": lambda: torch.nn.Linear(IN, OUT),
    "StandardLinear": lambda: bnb.nn.StandardLinear(IN, OUT),
    "SwitchBackLinearGlobal": lambda: bnb.nn.SwitchBackLinearGlobal(IN, OUT),
    "SwitchBackLinearVectorwise": lambda: bnb.nn.SwitchBackLinearVectorwise(IN, OUT),
    "SwitchBackLinear mem_efficient": lambda: bnb.nn.SwitchBackLinear(IN, OUT, mem_efficient=True),
    "Linear8bitLt has_fp16_weights": lambda: bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True),
    "SwitchBackLinearBnb": lambda: bnb.nn.SwitchBackLinearBnb(IN, OUT),
}
FROZEN = {
    "LinearNF4": lambda: bnb.nn.LinearNF4(IN, OUT).to("cpu"),
    "LinearFP4 nested": lambda: bnb.nn.LinearFP4(IN, OUT, compress_statistics=True).to("cpu"),
    "Linear8bitLt frozen": lambda: bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=6.0).to("cpu"),
}


@pytest.mark.parametrize("name", READS_INPUTS)
def test_in_place_edit_of_a_saved_input_raises_like_torch_linear(name):
    layer = READS_INPUTS[name]()
    x = _x() * 1.0
    x += layer(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        x.sum().backward()


@pytest.mark.parametrize("name", FROZEN)
def test_frozen_layers_allow_in_place_residuals_with_exact_gradients(name):
    layer = FROZEN[name]()
    leaf = _x()
    x = leaf * 1.0
    x += layer(x)
    x.sum().backward()
    in_place = leaf.grad.clone()
    leaf.grad = None
    x = leaf * 1.0
    (x + layer(x)).sum().backward()
    assert torch.equal(in_place, leaf.grad)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cast", ["float", "half", "bfloat16", "double", "to_float16", "to_bfloat16"])
@pytest.mark.parametrize("cls", [bnb.nn.LinearNF4, bnb.nn.EmbeddingNF4])
def test_module_dtype_casts_never_convert_packed_storage(storage, cast, cls):
    layer = cls(16, IN, quant_storage=storage).to("cpu")
    packed = layer.weight.data.clone()
    inp = torch.tensor([1, 5]) if cls is bnb.nn.EmbeddingNF4 else torch.randn(3, 16)
    before = layer(inp)
    if cast.startswith("to_"):
        layer = layer.to(getattr(torch, cast[3:]))
    else:
        layer = getattr(layer, cast)()
    assert layer.weight.dtype == storage and torch.equal(layer.weight.data.view(torch.uint8), packed.view(torch.uint8))
    if cast == "double" or cls is bnb.nn.EmbeddingNF4:
        return
    x = inp.to(layer.bias.dtype)
    after = layer(x).float()
    torch.testing.assert_close(after, before.float(), atol=0.05 * before.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("make,inp", [
    (lambda: bnb.nn.LinearNF4(IN, 16).to("cpu"), lambda: torch.randn(3, IN)),
    (lambda: bnb.nn.Linear8bitLt(IN, 16, has_fp16_weights=False).to("cpu"), lambda: torch.randn(3, IN)),
    (lambda: bnb.nn.SwitchBackLinearGlobal(IN, 16), lambda: torch.randn(3, IN)),
    (lambda: bnb.nn.EmbeddingNF4(10, IN).to("cpu"), lambda: torch.tensor([1, 2])),
])
def test_torch_compile_falls_back_with_graph_breaks(make, inp):
    torch._dynamo.reset()
    layer, x = make(), inp()
    assert torch.equal(torch.compile(layer)(x), layer(x))
