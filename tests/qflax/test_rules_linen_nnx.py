"""One rule object quantizes a Linen params tree and an NNX model to the same bytes and the same checkpoint."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import QuantRules, Rule
from qflax import linen as ql
from qflax import nnx as qn
from qflax import quant

IDS = jnp.array([[1, 5, 19], [0, 2, 3]], jnp.int32)


class LinenLM(nn.Module):
    """An embedding, an MLP and a head; ``layers`` says which class each named layer is."""

    layers: dict = None

    @nn.compact
    def __call__(self, ids):
        make = {"embed": functools.partial(nn.Embed, 20, 64), "fc1": functools.partial(nn.Dense, 128),
                "fc2": functools.partial(nn.Dense, 64), "head": functools.partial(nn.Dense, 20)}
        make.update(self.layers or {})
        h = make["embed"](name="embed")(ids)
        h = nn.LayerNorm(name="norm")(h)
        h = make["fc2"](name="fc2")(jax.nn.relu(make["fc1"](name="fc1")(h)))
        return make["head"](name="head")(h)


class NnxLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(20, 64, rngs=rngs)
        self.norm = nnx.LayerNorm(64, rngs=rngs)
        self.fc1 = nnx.Linear(64, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 64, rngs=rngs)
        self.head = nnx.Linear(64, 20, rngs=rngs)

    def __call__(self, ids):
        h = self.norm(self.embed(ids))
        return self.head(self.fc2(jax.nn.relu(self.fc1(h))))


@pytest.fixture(scope="module")
def float_params():
    params = LinenLM().init(jax.random.key(0), IDS)["params"]
    # A non-trivial LayerNorm, so that its export is checked against values that differ from the init.
    return {**params, "norm": {"scale": jnp.linspace(0.5, 1.5, 64), "bias": jnp.linspace(-1, 1, 64)}}


def _nnx_twin(float_params):
    return qn.from_linen_variables(NnxLM(nnx.Rngs(1)), {"params": float_params})


def _assert_same_checkpoints(linen_variables, nnx_model):
    linen_sd = ql.to_bnb_checkpoint(linen_variables)
    nnx_sd = qn.to_bnb_checkpoint(nnx_model)
    assert linen_sd.keys() == nnx_sd.keys()
    for key in linen_sd:
        assert linen_sd[key].dtype == nnx_sd[key].dtype, key
        assert linen_sd[key].tobytes() == nnx_sd[key].tobytes(), key
    return linen_sd


RULES = QuantRules(
    Rule("head", keep_float=True),
    Rule("*", layers="embed", format="8bit"),
    Rule("fc2", quant_type="fp4", blocksize=128, compress_statistics=False),
    Rule("*", layers="dense"),
)


def test_one_rule_object_gives_the_same_bytes_in_linen_and_nnx(float_params):
    linen_variables = ql.quantize_params(float_params, RULES)
    nnx_model = qn.quantize_model(_nnx_twin(float_params), RULES)
    assert isinstance(nnx_model.embed, qn.Embed8bit) and isinstance(nnx_model.fc1, qn.DenseNF4)
    assert isinstance(nnx_model.fc2, qn.DenseFP4) and isinstance(nnx_model.head, nnx.Linear)
    # Every quantized leaf is the same array in both, byte for byte.
    nnx_variables = qn.to_linen_variables(nnx_model)
    for name in ("embed", "fc1", "fc2"):
        ours, theirs = linen_variables["quantized"][name]["weight"], nnx_variables["quantized"][name]["weight"]
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            assert np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # fc1 is what quantize_4bit makes of the transposed kernel (an independent path to the bytes).
    want = quant.quantize_4bit(float_params["fc1"]["kernel"].T, 64, "nf4", True)
    np.testing.assert_array_equal(linen_variables["quantized"]["fc1"]["weight"].packed, want.packed)
    sd = _assert_same_checkpoints(linen_variables, nnx_model)
    assert sd["embed.weight"].dtype == np.int8 and "embed.SCB" in sd
    assert "fc2.weight.quant_state.bitsandbytes__fp4" in sd and "fc2.weight.nested_absmax" not in sd
    np.testing.assert_array_equal(sd["head.weight"], np.asarray(float_params["head"]["kernel"]).T)
    np.testing.assert_array_equal(sd["norm.weight"], np.asarray(float_params["norm"]["scale"]))
    # And the two models compute the same function.
    linen_model = LinenLM(layers={
        "embed": functools.partial(ql.Embed8bit, 20, 64), "fc1": functools.partial(ql.DenseNF4, 128),
        "fc2": functools.partial(ql.DenseFP4, 64, blocksize=128, compress_statistics=False),
    })
    np.testing.assert_allclose(linen_model.apply(linen_variables, IDS), nnx_model(IDS), rtol=1e-6, atol=1e-6)


def test_excluded_layers_convert_the_same_way(float_params):
    rules = QuantRules(Rule("fc*", keep_float=True), Rule("*", format="4bit"))
    linen_variables = ql.quantize_params(float_params, rules)
    nnx_model = qn.quantize_model(_nnx_twin(float_params), rules)
    assert set(linen_variables["quantized"]) == {"embed", "head"}
    assert isinstance(nnx_model.fc1, nnx.Linear) and isinstance(nnx_model.fc2, nnx.Linear)
    assert isinstance(nnx_model.embed, qn.EmbedNF4) and isinstance(nnx_model.head, qn.DenseNF4)
    sd = _assert_same_checkpoints(linen_variables, nnx_model)
    np.testing.assert_array_equal(sd["fc1.weight"], np.asarray(float_params["fc1"]["kernel"]).T)
    assert not ql.from_bnb_checkpoint(sd)["quantized"]["embed"]["weight"].nested  # Embed4bit's default
    assert ql.from_bnb_checkpoint(sd)["quantized"]["head"]["weight"].nested  # Dense4bit's default


def test_rules_resolve_first_match_with_per_kind_defaults():
    rules = QuantRules(Rule("enc.*", layers="embed", keep_float=True), Rule("enc.*", format="8bit", threshold=6.0),
                       Rule("*"))
    assert rules.resolve("enc.tok", "embed") is None
    int8 = rules.resolve("enc.fc", "dense")
    assert (int8.format, int8.threshold) == ("8bit", 6.0)
    dense, table = rules.resolve("dec.fc", "dense"), rules.resolve("dec.tok", "embed")
    assert (dense.format, dense.quant_type, dense.blocksize, dense.compress_statistics) == ("4bit", "nf4", 64, True)
    assert table.compress_statistics is False
    assert QuantRules().resolve("fc", "dense") is None  # no rule: float
    assert QuantRules.default().resolve("tok", "embed") is None
    assert QuantRules.default() == QuantRules(Rule("*", layers="dense"))
