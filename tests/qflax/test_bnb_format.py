"""qflax.bnb_format: round trips, bitsandbytes interop for 8-bit keys, malformed state dicts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import bnb_format, quant


def _q(nested=True, quant_type="nf4", shape=(48, 64), dtype=jnp.bfloat16):
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    return quant.quantize_4bit(x, 64, quant_type, compress_statistics=nested)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_is_byte_identical(nested, quant_type):
    q = _q(nested, quant_type)
    sd = bnb_format.to_bnb_state_dict(q, prefix="layer.weight")
    back = bnb_format.from_bnb_state_dict(sd, prefix="layer.weight")
    assert jax.tree.structure(back) == jax.tree.structure(q)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    again = bnb_format.to_bnb_state_dict(back, prefix="layer.weight")
    assert {k: v.tobytes() for k, v in again.items()} == {k: v.tobytes() for k, v in sd.items()}


def test_other_weights_in_the_dict_are_ignored():
    sd = {**bnb_format.to_bnb_state_dict(_q(), "a.weight"), **bnb_format.to_bnb_state_dict(_q(False), "b.weight")}
    sd["a.bias"] = np.zeros(48, np.float32)
    assert bnb_format.from_bnb_state_dict(sd, "a.weight").nested
    assert not bnb_format.from_bnb_state_dict(sd, "b.weight").nested


def test_float_quant_storage_is_read_as_bytes():
    q = _q(False)
    sd = bnb_format.to_bnb_state_dict(q)
    sd["weight"] = sd["weight"].reshape(-1).view(np.float32).reshape(-1, 1)  # quant_storage=float32
    back = bnb_format.from_bnb_state_dict(sd)
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(q.packed))


def test_stored_maps_are_honoured():
    q = _q(True)
    sd = bnb_format.to_bnb_state_dict(q)
    sd["weight.nested_quant_map"][0] = -1.0  # what bitsandbytes' CPU path saves
    sd["weight.quant_map"] = sd["weight.quant_map"] * 2
    back = bnb_format.from_bnb_state_dict(sd)
    assert float(back.nested_quant_map[0]) == -1.0
    np.testing.assert_allclose(
        np.asarray(quant.dequantize_4bit(back), np.float32), 2 * np.asarray(quant.dequantize_4bit(q), np.float32)
    )


@pytest.mark.parametrize("missing", ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax"])
def test_missing_key(missing):
    sd = bnb_format.to_bnb_state_dict(_q())
    del sd[missing]
    with pytest.raises(KeyError, match=f"missing the key '{missing}'"):
        bnb_format.from_bnb_state_dict(sd)


def test_missing_quant_state():
    sd = bnb_format.to_bnb_state_dict(_q())
    del sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(KeyError, match="exactly one key weight.quant_state.bitsandbytes__nf4"):
        bnb_format.from_bnb_state_dict(sd)


def test_bad_json():
    sd = bnb_format.to_bnb_state_dict(_q())
    sd["weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b"{not json", np.uint8)
    with pytest.raises(ValueError, match="is not valid UTF-8 JSON"):
        bnb_format.from_bnb_state_dict(sd)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("quant_type", "fp4", "says quant_type 'fp4' but its key names 'nf4'"),
        ("blocksize", 48, "blocksize \\(checkpoint\\) must be one of"),
        ("dtype", "int8", "dtype \\(checkpoint\\) must be one of"),
        ("shape", [48, 65], "weight' must be uint8 of shape \\(1560, 1\\)"),
    ],
)
def test_inconsistent_json(field, value, message):
    sd = bnb_format.to_bnb_state_dict(_q(False))
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"]))
    meta[field] = value
    sd["weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with pytest.raises(ValueError, match=message):
        bnb_format.from_bnb_state_dict(sd)


def test_shape_mismatch_of_absmax_and_unknown_keys():
    sd = bnb_format.to_bnb_state_dict(_q(False))
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(ValueError, match="'weight.absmax' must be float32 of shape \\(48,\\)"):
        bnb_format.from_bnb_state_dict(sd)
    sd = bnb_format.to_bnb_state_dict(_q(False))
    sd["weight.surprise"] = np.zeros(1)
    with pytest.raises(ValueError, match="unexpected keys under 'weight'"):
        bnb_format.from_bnb_state_dict(sd)


def test_int8_round_trip_and_checks():
    w = jax.random.normal(jax.random.key(2), (8, 16), jnp.float32)
    q = quant.quantize_rows(w)
    sd = bnb_format.to_bnb_int8_state_dict(q, "fc.")
    assert sd["fc.weight"].dtype == np.int8 and sd["fc.SCB"].dtype == np.float32
    assert sd["fc.weight_format"].shape == () and sd["fc.weight_format"].dtype == np.uint8
    back = bnb_format.from_bnb_int8_state_dict(sd, "fc.")
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(q.scale))
    with pytest.raises(ValueError, match="Expected supported weight format - got 7"):
        bnb_format.from_bnb_int8_state_dict({**sd, "fc.weight_format": np.array(7, np.uint8)}, "fc.")
    with pytest.raises(ValueError, match="Only 'row' weight format is supported, got col32"):
        bnb_format.from_bnb_int8_state_dict({**sd, "fc.weight_format": np.array(1, np.uint8)}, "fc.")
    with pytest.raises(ValueError, match="'fc.SCB' must be float32 of shape \\(8,\\)"):
        bnb_format.from_bnb_int8_state_dict({**sd, "fc.SCB": sd["fc.SCB"][:5]}, "fc.")
    with pytest.raises(KeyError, match="missing the key 'fc.SCB'"):
        bnb_format.from_bnb_int8_state_dict({"fc.weight": sd["fc.weight"]}, "fc.")
