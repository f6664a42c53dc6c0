"""The previous release's converter names: each warns (DeprecationWarning) and still does what it did."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import linen as ql
from qflax import nnx as qn
from qflax import quant

IDS = jnp.array([[1, 2, 3]])


class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(50, 64, name="tok")(ids)
        h = nn.relu(nn.Dense(128, name="fc1")(h))
        return nn.Dense(8, name="head")(h)


@pytest.fixture(scope="module")
def params():
    return jax.jit(Model().init)(jax.random.key(0), IDS)["params"]


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_quantize_params_4bit_is_dense_and_embed_rules(params):
    with pytest.warns(DeprecationWarning, match="quantize_params_4bit is deprecated"):
        old = ql.quantize_params_4bit(params, quant_type="fp4", keep_float=lambda path: path == ("head",))
    rules = ql.QuantRules(ql.Rule("head", keep_float=True), ql.Rule("*", quant_type="fp4"))
    _same(old, ql.quantize_params(params, rules))
    assert set(old["quantized"]) == {"tok", "fc1"} and not old["quantized"]["tok"]["weight"].nested


def test_quantize_params_8bit_is_the_8bit_dense_rule(params):
    with pytest.warns(DeprecationWarning, match="quantize_params_8bit is deprecated"):
        old = ql.quantize_params_8bit(params)
    _same(old, ql.quantize_params(params, ql.Rule("*", layers="dense", format="8bit")))
    assert isinstance(old["quantized"]["head"]["weight"], quant.Int8Rows) and "tok" in old["params"]


def test_4bit_checkpoint_aliases_keep_only_4bit_layers(params, tmp_path):
    variables = ql.quantize_params(params, ql.QuantRules(ql.Rule("head", format="8bit"), ql.Rule("*")))
    with pytest.warns(DeprecationWarning, match="to_bnb_4bit_state_dict is deprecated"):
        state = ql.to_bnb_4bit_state_dict(variables)
    full = ql.to_bnb_checkpoint(variables)
    assert "head.SCB" in full and not any(k.startswith("head.") for k in state)
    assert all(state[k].tobytes() == full[k].tobytes() for k in state)
    with pytest.warns(DeprecationWarning, match="save_bnb_4bit is deprecated"):
        ql.save_bnb_4bit(tmp_path / "m.safetensors", variables)
    with pytest.warns(DeprecationWarning, match="load_bnb_4bit is deprecated"):
        loaded = ql.load_bnb_4bit(tmp_path / "m.safetensors")
    _same(loaded["quantized"], {k: variables["quantized"][k] for k in ("tok", "fc1")})
    with pytest.raises(KeyError, match="no 'quantized' collection"), pytest.warns(DeprecationWarning):
        ql.to_bnb_4bit_state_dict({"params": {}})


def test_8bit_layer_aliases(params):
    layer = ql.quantize_params(params["fc1"], ql.Rule(format="8bit"))
    with pytest.warns(DeprecationWarning, match="to_bnb_state_dict_8bit is deprecated"):
        state = ql.to_bnb_state_dict_8bit(layer, "fc.")
    assert sorted(state) == ["fc.SCB", "fc.bias", "fc.weight", "fc.weight_format"]
    with pytest.warns(DeprecationWarning, match="from_bnb_state_dict_8bit is deprecated"):
        back = ql.from_bnb_state_dict_8bit(state, "fc.")
    _same(back, layer)
    trainable = {"params": {"kernel": params["fc1"]["kernel"], "bias": params["fc1"]["bias"]}}
    with pytest.warns(DeprecationWarning):
        float_state = ql.to_bnb_state_dict_8bit(trainable)
    with pytest.warns(DeprecationWarning):
        kernel = ql.from_bnb_state_dict_8bit(float_state)["params"]["kernel"]
    np.testing.assert_array_equal(kernel, params["fc1"]["kernel"])
    with pytest.raises(ValueError, match="must be a 2-D int8 array when .SCB. is present"), pytest.warns(DeprecationWarning):
        ql.from_bnb_state_dict_8bit({"weight": float_state["weight"], "SCB": state["fc.SCB"]})


def test_nnx_aliases_and_deprecated_quantize_model_arguments():
    model = qn.DenseNF4(64, 8, rngs=nnx.Rngs(0))
    with pytest.warns(DeprecationWarning, match="to_bnb_state_dict is deprecated"):
        state = qn.to_bnb_state_dict(model)
    assert state.keys() == qn.to_bnb_checkpoint(model).keys()
    other = qn.DenseNF4(64, 8, rngs=nnx.Rngs(1))
    with pytest.warns(DeprecationWarning, match="load_bnb_state_dict is deprecated"):
        qn.load_bnb_state_dict(other, state)
    np.testing.assert_array_equal(other.weight.get_value().packed, model.weight.get_value().packed)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.tok, self.fc = nnx.Embed(10, 64, rngs=rngs), nnx.Linear(64, 64, rngs=rngs)
            self.head = nnx.Linear(64, 4, rngs=rngs)

    with pytest.warns(DeprecationWarning, match="quantize_model.dense=, embed=, exclude=. is deprecated"):
        net = qn.quantize_model(Net(nnx.Rngs(0)), dense=qn.DenseFP4, embed=qn.Embed8bit, exclude=("head",))
    assert isinstance(net.fc, qn.DenseFP4) and isinstance(net.tok, qn.Embed8bit) and isinstance(net.head, nnx.Linear)
    with pytest.raises(TypeError, match="dense"), pytest.warns(DeprecationWarning):
        qn.quantize_model(net, dense=nnx.Linear)
    with pytest.raises(TypeError, match="exclude"), pytest.warns(DeprecationWarning):
        qn.quantize_model(net, exclude="head")
