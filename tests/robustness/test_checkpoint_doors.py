"""Every door a quantized checkpoint enters by, fed the tampered checkpoints of ``tampering.py``.

A tampered checkpoint must raise the named exception type with a message naming the key, and
leave the target unchanged; the untampered checkpoint must load and decode exactly as the
reference (the qflax weight it was written from).
"""

import numpy as np
import pytest
import torch

import torch_compat as bnb
from flax import nnx
from qflax import bnb_format, quant
from qflax import nnx as qnnx
from qflax.linen import from_bnb_checkpoint
from tests.robustness.tampering import CASES_4BIT, CASES_INT8, IN, OUT, good_4bit, good_int8


def _torch(sd: dict) -> dict:
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def _weight_keys(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("weight")}


def _bnb_format(sd):
    return bnb_format.from_bnb_state_dict(sd)


def _linen(sd):
    return from_bnb_checkpoint(sd)["quantized"]["weight"]


def _nnx(sd):
    model = qnnx.DenseNF4(IN, OUT, compress_statistics="weight.nested_absmax" in sd, rngs=nnx.Rngs(0))
    before = qnnx.to_bnb_checkpoint(model)
    try:
        qnnx.from_bnb_checkpoint(model, sd)
    except Exception:
        after = qnnx.to_bnb_checkpoint(model)
        assert all(np.array_equal(before[k], after[k]) for k in before), "a failed load changed the model"
        raise
    return model.weight.get_value()


def _torch_module(sd):
    layer = bnb.nn.LinearNF4(IN, OUT).to("cpu")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        layer.load_state_dict(_torch(sd))
    except Exception:
        after = layer.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        raise
    return layer.quant_state.to_packed4bit(layer.weight)


def _from_dict(sd):
    stats = _torch({k: v for k, v in sd.items() if k.startswith("weight.")})  # prefixes are allowed
    state = bnb.functional.QuantState.from_dict(stats, device="cpu")
    return state.to_packed4bit(_torch(sd)["weight"]) if "weight" in sd else None


def _from_prequantized(sd):
    t = _torch(sd)
    stats = {k: v for k, v in t.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(t["weight"], stats, device="cpu")
    return param.quant_state.to_packed4bit(param)


DOORS_4BIT = {
    "bnb_format.from_bnb_state_dict": _bnb_format,
    "linen.from_bnb_checkpoint": _linen,
    "nnx.from_bnb_checkpoint": _nnx,
    "torch_compat.load_state_dict": _torch_module,
    "QuantState.from_dict": _from_dict,
    "Params4bit.from_prequantized": _from_prequantized,
}
# Doors that never see the packed data itself (only the statistics).
_STATS_ONLY = {"QuantState.from_dict"}


@pytest.mark.parametrize("door", DOORS_4BIT)
@pytest.mark.parametrize("nested", [False, True])
def test_good_checkpoint_loads_exactly(door, nested):
    sd = good_4bit(nested)
    reference = bnb_format.from_bnb_state_dict(sd)
    loaded = DOORS_4BIT[door](sd)
    np.testing.assert_array_equal(np.asarray(quant.dequantize_4bit(loaded)), np.asarray(quant.dequantize_4bit(reference)))


@pytest.mark.parametrize("door", DOORS_4BIT)
@pytest.mark.parametrize("case", CASES_4BIT, ids=[c[0] for c in CASES_4BIT])
def test_tampered_4bit_checkpoint_raises(door, case):
    name, nested, edit, exc, key = case
    sd = edit(good_4bit(nested))
    if door in _STATS_ONLY and name.startswith("packed"):
        pytest.skip("this door reads only the statistics; the packed data is checked where it is used")
    if door == "Params4bit.from_prequantized" and name == "packed missing":
        pytest.skip("the packed data is this door's argument")
    if door in ("torch_compat.load_state_dict", "QuantState.from_dict", "Params4bit.from_prequantized") and (
        name == "quant state missing"
    ):
        exc, key = ValueError, "found neither"  # bitsandbytes' own message
    if door == "linen.from_bnb_checkpoint" and name == "quant state missing":
        exc = ValueError  # "no 4-bit weights in the checkpoint: expected keys like ...quant_state..."
    if door == "torch_compat.load_state_dict" and name == "packed missing":
        exc = RuntimeError  # torch's load_state_dict error, naming the key
    if door in ("nnx.from_bnb_checkpoint",) and name == "blocksize 128":
        exc = ValueError
    with pytest.raises(exc) as info:
        DOORS_4BIT[door](sd)
    assert key in str(info.value), f"{door}: {info.value!r} does not name {key!r}"


@pytest.mark.parametrize("door", ["linen.from_bnb_checkpoint", "nnx.from_bnb_checkpoint", "torch_compat.load_state_dict"])
def test_bias_of_wrong_length_or_dtype_is_refused(door):
    biases = [np.zeros(OUT + 1, np.float32)]
    if door != "torch_compat.load_state_dict":  # torch's load_state_dict casts a bias' dtype, as for any parameter
        biases.append(np.zeros(OUT, np.int32))
    for bias in biases:
        sd = good_4bit(False)
        sd["bias"] = bias
        with pytest.raises((ValueError, TypeError, RuntimeError), match="bias"):
            DOORS_4BIT[door](sd)


@pytest.mark.parametrize("nested", [False, True])
def test_target_settings_must_match(nested):
    sd = good_4bit(nested)
    for layer in (bnb.nn.LinearFP4(IN, OUT), bnb.nn.LinearNF4(IN, OUT + 1)):
        with pytest.raises(RuntimeError, match="quant_type|size mismatch"):
            layer.load_state_dict(_torch(sd))
    for model in (qnnx.DenseFP4(IN, OUT, compress_statistics=nested, rngs=nnx.Rngs(0)),
                  qnnx.DenseNF4(IN, OUT, compress_statistics=not nested, rngs=nnx.Rngs(0)),
                  qnnx.DenseNF4(IN, OUT, blocksize=128, compress_statistics=nested, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match="weight"):
            qnnx.from_bnb_checkpoint(model, sd)


def test_rename_collision_is_refused():
    sd = {f"a.{k}": v for k, v in good_4bit(False).items()}
    sd.update({f"b.{k}": v for k, v in good_4bit(True).items()})
    with pytest.raises(ValueError, match="rename maps both 'a.weight' and 'b.weight'"):
        from_bnb_checkpoint(sd, rename=lambda name: "layer")
    assert set(from_bnb_checkpoint(sd)["quantized"]) == {"a", "b"}


# ----------------------------------------------------------------------------------------------
# 8-bit


def _int8_bnb_format(sd):
    return bnb_format.from_bnb_int8_state_dict(sd)


def _int8_linen(sd):
    return from_bnb_checkpoint(sd)["quantized"]["weight"]


def _int8_nnx(sd):
    model = qnnx.Dense8bitLt(IN, OUT, rngs=nnx.Rngs(0))
    before = qnnx.to_bnb_checkpoint(model)
    try:
        qnnx.from_bnb_checkpoint(model, sd)
    except Exception:
        after = qnnx.to_bnb_checkpoint(model)
        assert all(np.array_equal(before[k], after[k]) for k in before)
        raise
    return model.weight.get_value()


def _int8_torch(sd):
    layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False).to("cpu")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        layer.load_state_dict(_torch(sd))
    except Exception:
        after = layer.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        raise
    return quant.Int8Rows(codes=np.asarray(layer.weight.data), scale=np.asarray(layer._int8_scale()))


DOORS_INT8 = {
    "bnb_format.from_bnb_int8_state_dict": _int8_bnb_format,
    "linen.from_bnb_checkpoint": _int8_linen,
    "nnx.from_bnb_checkpoint": _int8_nnx,
    "torch_compat.load_state_dict": _int8_torch,
}


@pytest.mark.parametrize("door", DOORS_INT8)
def test_good_int8_checkpoint_loads_exactly(door):
    sd = good_int8()
    loaded = DOORS_INT8[door](sd)
    np.testing.assert_array_equal(np.asarray(loaded.codes), sd["weight"])
    np.testing.assert_array_equal(np.asarray(loaded.scale), sd["SCB"])


@pytest.mark.parametrize("door", DOORS_INT8)
@pytest.mark.parametrize("case", CASES_INT8, ids=[c[0] for c in CASES_INT8])
def test_tampered_int8_checkpoint_raises(door, case):
    name, edit, exc, key = case
    sd = edit(good_int8())
    if door == "linen.from_bnb_checkpoint" and name == "int8 weight without SCB":
        key = "SCB"
    with pytest.raises(exc) as info:
        DOORS_INT8[door](sd)
    assert key in str(info.value), f"{door}: {info.value!r} does not name {key!r}"
