"""Bad input: clear exceptions, with bitsandbytes' exception types where docs/deviations.md#errors keeps them."""

import pytest
import torch

import torch_compat as bnb


@pytest.mark.parametrize("make", [
    lambda: bnb.nn.Linear4bit(64, 32, quant_type="int4"),
    lambda: bnb.nn.Embedding4bit(10, 64, quant_type="af4"),
    lambda: bnb.nn.Params4bit(torch.randn(4, 4), quant_type="nf8"),
    lambda: bnb.functional.quantize_4bit(torch.randn(64), quant_type="int4"),
])
def test_unknown_quant_type(make):
    with pytest.raises(ValueError, match="quant_type"):
        make()


def test_unknown_4bit_type_name():
    with pytest.raises(NotImplementedError, match="not supported"):
        bnb.functional.get_4bit_type("int4")


@pytest.mark.parametrize("make", [
    lambda: bnb.nn.LinearNF4(64, 32).to("cpu"),
    lambda: bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu"),
    lambda: bnb.nn.Linear8bitLt(64, 32).to("cpu"),
    lambda: bnb.nn.SwitchBackLinearGlobal(64, 32),
    lambda: bnb.nn.StandardLinear(64, 32),
])
def test_wrong_input_width(make):
    """RuntimeError, the type torch (and so bitsandbytes) raises for a shape mismatch, naming in_features."""
    with pytest.raises(RuntimeError, match="in_features=64"):
        make()(torch.randn(3, 48))


def test_4bit_checkpoint_missing_quant_state_entry():
    src = bnb.nn.LinearNF4(64, 32).to("cpu")
    sd = src.state_dict()
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="quant_state"):
        bnb.nn.LinearNF4(64, 32).load_state_dict(sd)
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    with pytest.raises(ValueError, match="quant_state"):
        bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")


def test_4bit_checkpoint_of_another_shape():
    sd = bnb.nn.LinearNF4(64, 32).to("cpu").state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        bnb.nn.LinearNF4(64, 64).load_state_dict(sd)


@pytest.mark.parametrize("value,message", [
    (torch.tensor(1, dtype=torch.uint8), "Only 'row' weight format is supported, got col32"),
    (torch.tensor(7, dtype=torch.uint8), "Expected supported weight format - got 7"),
    ("col_ampere", "Only 'row' weight format is supported, got col_ampere"),
])
def test_wrong_weight_format(value, message, bnb_ref):
    sd = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False).to("cpu").state_dict()
    sd["weight_format"] = value
    for cls in (bnb.nn.Linear8bitLt, bnb_ref.nn.Linear8bitLt):  # the same ValueError as bitsandbytes
        with pytest.raises(ValueError, match=message):
            cls(16, 8, has_fp16_weights=False).to("cpu").load_state_dict(dict(sd))


def test_quantize_bad_dtype_and_blocksize():
    with pytest.raises(RuntimeError, match="16/32-bit floats"):
        bnb.functional.quantize_4bit(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        bnb.functional.quantize_4bit(torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="float64"):
        bnb.nn.LinearNF4(64, 32).to("cpu")(torch.randn(2, 64, dtype=torch.float64))


def test_unquantized_embedding8bit_raises_the_intended_error():
    """Fixed: bitsandbytes meant RuntimeError but raises AttributeError (docs/embeddings.md#embedding8bit)."""
    with pytest.raises(RuntimeError, match="not quantized"):
        bnb.nn.Embedding8bit(10, 8)(torch.tensor([1]))


def test_embedding_index_out_of_range():
    layer = bnb.nn.EmbeddingNF4(10, 64).to("cpu")
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        layer(torch.tensor([10]))
    with pytest.raises(TypeError, match="integer"):
        layer(torch.tensor([1.0]))


def test_gemv_without_state():
    q, _ = bnb.functional.quantize_4bit(torch.randn(8, 64), quant_type="nf4")
    with pytest.raises(ValueError, match="state cannot be None"):
        bnb.functional.gemv_4bit(torch.randn(1, 64), q.t())


def test_int8_matmul_without_scales():
    CB = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="SCB"):
        bnb.matmul(torch.randn(2, 8), CB)
