"""Checkpoints of NNX models with quantized layers: orbax and bitsandbytes' state-dict format, byte for byte."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import bnb_format
from qflax import linen as ql
from qflax import nnx as qn

K = 64


class Everything(nnx.Module):
    """One layer of every stored kind (4-bit nested/plain, int8, prepared SwitchBack, outlier split, embeddings)."""

    def __init__(self, rngs, quant_type="nf4"):
        self.embed4 = qn.Embed4bit(12, K, quant_type=quant_type, rngs=rngs)
        self.embed8 = qn.Embed8bit(12, K, rngs=rngs)
        self.stable = qn.StableEmbed(12, K, padding_idx=0, rngs=rngs)
        self.nf4 = qn.Dense4bit(K, K, quant_type=quant_type, rngs=rngs)
        self.fp4 = qn.DenseFP4(K, K, compress_statistics=False, blocksize=128, rngs=rngs)
        self.int8 = qn.Dense8bitLt(K, K, threshold=6.0, rngs=rngs)
        self.switchback = qn.SwitchBackDense(K, K, rngs=rngs)
        self.outlier = qn.OutlierAwareDense(K, 8, rngs=rngs)

    def __call__(self, ids):
        h = self.embed4(ids) + self.embed8(ids) + self.stable(ids)
        h = self.switchback(self.int8(self.fp4(self.nf4(h))))
        return self.outlier(h)


IDS = jnp.array([[1, 4, 7], [0, 11, 3]], jnp.int32)

# One compiled forward pass for every model of this structure (eager calls would recompile per model).
_forward = nnx.jit(lambda model, ids: model(ids))


def _quantized(seed, quant_type="nf4"):
    model = Everything(nnx.Rngs(seed), quant_type)
    model.switchback.prepare_for_eval()
    qn.quantize_outlier_aware(model, {"outlier": np.array([2, 9])})
    return model


@pytest.fixture(scope="module")
def saved():
    """A quantized model (never modified by the tests) and its bitsandbytes state dict."""
    model = _quantized(0)
    return model, qn.to_bnb_checkpoint(model)


def _leaf_bytes(model):
    state = nnx.state(model)
    return jax.tree.structure(state), [
        (np.asarray(a).dtype.name, np.asarray(a).shape, np.asarray(a).tobytes()) for a in jax.tree.leaves(state)
    ]


def test_orbax_round_trip_is_byte_identical(tmp_path, saved):
    model, _ = saved
    qn.save_checkpoint(str(tmp_path / "ckpt"), model)
    # Restore into an abstract model of the same structure (nothing quantized or drawn).
    abstract = nnx.eval_shape(lambda: _quantized(1))
    restored = qn.restore_checkpoint(str(tmp_path / "ckpt"), abstract)
    assert _leaf_bytes(restored) == _leaf_bytes(model)
    np.testing.assert_array_equal(_forward(restored, IDS), _forward(model, IDS))


def test_bnb_state_dict_round_trip_is_byte_identical(saved):
    model, state_dict = saved
    other = _quantized(1)
    assert _leaf_bytes(other) != _leaf_bytes(model)
    qn.from_bnb_checkpoint(other, state_dict)
    assert _leaf_bytes(other) == _leaf_bytes(model)
    np.testing.assert_array_equal(_forward(other, IDS), _forward(model, IDS))
    again = qn.to_bnb_checkpoint(other)
    assert again.keys() == state_dict.keys()
    assert all(again[k].dtype == state_dict[k].dtype and again[k].tobytes() == state_dict[k].tobytes() for k in again)


def test_bnb_state_dict_uses_bitsandbytes_names_and_layout(saved):
    model, sd = saved
    # 4-bit layers: exactly the entries of qflax.bnb_format for their Packed4bit.
    expected = bnb_format.to_bnb_state_dict(model.nf4.weight.get_value(), "nf4.weight")
    assert all(sd[k].tobytes() == v.tobytes() for k, v in expected.items())
    assert "nf4.weight.quant_state.bitsandbytes__nf4" in sd and "fp4.weight.nested_absmax" not in sd
    # int8: weight/SCB/weight_format; float kernels transposed to torch's (out, in).
    assert sd["int8.weight"].dtype == np.int8 and sd["int8.SCB"].shape == (K,) and sd["int8.weight_format"] == 0
    np.testing.assert_array_equal(sd["switchback.weight"], np.asarray(model.switchback.kernel[...]).T)
    assert sd["switchback.W_int8"].dtype == np.int8 and sd["switchback.state_W"].shape == (1,)
    np.testing.assert_array_equal(sd["stable.weight"], model.stable.embedding[...])
    np.testing.assert_array_equal(sd["stable.norm.weight"], model.stable.norm.scale[...])
    assert sd["outlier.idx"].tolist() == [2, 9]


def test_bnb_checkpoint_runs_in_bitsandbytes():
    import bitsandbytes as bnb
    import torch
    layer = qn.DenseNF4(K, 32, rngs=nnx.Rngs(3))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in qn.to_bnb_checkpoint(layer).items()}
    ref = bnb.nn.LinearNF4(K, 32)
    weight = sd.pop("weight")
    ref.bias = torch.nn.Parameter(sd.pop("bias"))
    ref.weight = bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=sd, requires_grad=False, device="cpu")
    ref.train()  # the unpacked CPU path (eval mode on AVX512-BF16 machines takes a packed bf16 path)
    x = np.array(jax.random.normal(jax.random.key(0), (4, K)))  # a writable copy for torch.from_numpy
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_bnb_load_errors(saved):
    _, sd = saved
    target = _quantized(1)
    missing = {k: v for k, v in sd.items() if k != "int8.SCB"}
    with pytest.raises(KeyError, match="int8.SCB"):
        qn.from_bnb_checkpoint(target, missing)
    with pytest.raises(KeyError, match="stable.norm.weight"):
        qn.from_bnb_checkpoint(target, {k: v for k, v in sd.items() if k != "stable.norm.weight"})
    wrong_shape = dict(sd, **{"switchback.bias": np.zeros(K + 1, np.float32)})
    with pytest.raises(ValueError, match="switchback.bias"):
        qn.from_bnb_checkpoint(target, wrong_shape)
    # An FP4 checkpoint does not load into NF4 layers (and the model is left untouched).
    before = _leaf_bytes(target)
    fp4_sd = qn.to_bnb_checkpoint(_quantized(2, quant_type="fp4"))
    with pytest.raises(ValueError, match="nf4"):
        qn.from_bnb_checkpoint(target, fp4_sd)
    assert _leaf_bytes(target) == before


class SmallNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = qn.Embed4bit(12, K, rngs=rngs)
        self.fc = qn.DenseNF4(K, K, rngs=rngs)
        self.out = qn.Dense8bitLt(K, 8, rngs=rngs)


def test_bnb_state_dict_matches_the_linen_exporters():
    model = SmallNet(nnx.Rngs(4))
    variables = qn.to_linen_variables(model)
    sd = qn.to_bnb_checkpoint(model)
    linen_sd = ql.to_bnb_checkpoint(variables)
    assert sd.keys() == linen_sd.keys()
    for key, value in sd.items():
        assert value.dtype == linen_sd[key].dtype and value.tobytes() == linen_sd[key].tobytes(), key
    # And a Linen-side load of the NNX export gives back the same variables.
    loaded = ql.from_bnb_checkpoint(sd, variables)
    other = qn.from_linen_variables(SmallNet(nnx.Rngs(5)), loaded)
    assert _leaf_bytes(other) == _leaf_bytes(model)
    # Template-free, the Linen loader finds the 4-bit and the 8-bit layers by their keys.
    quantized_only = ql.from_bnb_checkpoint(sd)
    assert set(quantized_only["quantized"]) == {"embed", "fc", "out"} and set(quantized_only["params"]) == {"fc", "out"}
