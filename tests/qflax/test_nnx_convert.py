"""Float NNX models -> quantized (quantize_model with QuantRules) and Linen variables <-> NNX state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qflax import linen as ql
from qflax import nnx as qn
from qflax import quant

K = 64


class FloatLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(20, K, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(K, K, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(K, rngs=rngs)
        self.adapter = nnx.LoRA(K, 4, K, base_module=nnx.Linear(K, K, rngs=rngs), rngs=rngs)
        self.head = nnx.Linear(K, 20, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = jax.nn.relu(block(h))
        return self.head(self.adapter(self.norm(h)))


IDS = jnp.array([[1, 5, 19], [0, 2, 3]], jnp.int32)


def test_quantize_model_replaces_layers_with_the_quantized_weights():
    model = FloatLM(nnx.Rngs(0))
    kernel = np.asarray(model.blocks[1].kernel[...])
    bias = np.asarray(model.blocks[1].bias[...])
    table = np.asarray(model.embed.embedding[...])
    lora_b_before = np.asarray(model.adapter.lora_b[...])
    rules = qn.QuantRules(qn.Rule("head", keep_float=True), qn.Rule("*", layers="embed", format="8bit"), qn.Rule())
    out = qn.quantize_model(model, rules)
    assert out is model
    assert isinstance(model.blocks[0], qn.DenseNF4) and isinstance(model.blocks[1], qn.DenseNF4)
    assert isinstance(model.adapter.base_module, qn.DenseNF4)  # QLoRA: the base is quantized ...
    np.testing.assert_array_equal(model.adapter.lora_b[...], lora_b_before)  # ... the adapter stays float
    assert isinstance(model.head, nnx.Linear) and isinstance(model.embed, qn.Embed8bit)
    # The stored weights are the quantization of the float ones, in bitsandbytes' (out, in) layout.
    want = quant.quantize_4bit(jnp.asarray(kernel.T), 64, "nf4", True)
    got = model.blocks[1].weight.get_value()
    assert got.shape == (K, K) and got.quant_type == "nf4" and got.nested
    np.testing.assert_array_equal(got.packed, want.packed)
    np.testing.assert_array_equal(model.blocks[1].bias[...], bias)
    x = jax.random.normal(jax.random.key(1), (3, K))
    np.testing.assert_allclose(
        model.blocks[1](x), x @ np.asarray(quant.dequantize_4bit(want)).T + bias, rtol=1e-5, atol=1e-5
    )
    rows = model.embed(IDS)
    scale = np.abs(table).max(axis=1)
    error = np.abs(np.asarray(rows) - table[np.asarray(IDS)])
    assert np.all(error <= scale[np.asarray(IDS)][..., None] / 254 * (1 + 1e-5)) and error.max() > 0
    assert model(IDS).shape == (2, 3, 20)


def test_default_rules_quantize_linear_layers_only():
    model = qn.quantize_model(FloatLM(nnx.Rngs(0)))
    assert isinstance(model.head, qn.DenseNF4) and isinstance(model.blocks[0], qn.DenseNF4)
    assert isinstance(model.embed, nnx.Embed)


def test_quantize_model_rule_settings():
    model = FloatLM(nnx.Rngs(0))
    rules = qn.QuantRules(
        qn.Rule(lambda path: path.startswith("blocks"), keep_float=True),
        qn.Rule("*", layers="dense", quant_type="fp4", blocksize=128, compress_statistics=False),
        qn.Rule("*", layers="embed"),
    )
    qn.quantize_model(model, rules)
    assert isinstance(model.blocks[0], nnx.Linear) and isinstance(model.head, qn.DenseFP4)
    weight = model.head.weight.get_value()
    assert (weight.quant_type, weight.blocksize, weight.nested, weight.shape) == ("fp4", 128, False, (20, K))
    assert isinstance(model.embed, qn.EmbedNF4) and not model.embed.weight.get_value().nested
    int8 = qn.quantize_model(FloatLM(nnx.Rngs(0)), qn.Rule("*", layers="dense", format="8bit", threshold=6.0))
    assert isinstance(int8.head, qn.Dense8bitLt) and int8.head.threshold == 6.0 and isinstance(int8.embed, nnx.Embed)
    # A model that is itself one Linear (path "") comes back converted.
    single = qn.quantize_model(nnx.Linear(K, 8, rngs=nnx.Rngs(0)), qn.Rule(quant_type="fp4"))
    assert isinstance(single, qn.DenseFP4)


def test_quantize_model_progress_bar(capsys):
    qn.quantize_model(FloatLM(nnx.Rngs(0)))
    assert "quantizing" not in capsys.readouterr().err  # small models: no bar by default
    qn.quantize_model(FloatLM(nnx.Rngs(0)), progress=True)
    assert "quantizing" in capsys.readouterr().err


def test_quantize_model_bad_arguments():
    with pytest.raises(TypeError, match="rules must be"):
        qn.quantize_model(FloatLM(nnx.Rngs(0)), "nf4")
    with pytest.raises(TypeError, match="QuantRules takes Rule objects"):
        qn.QuantRules("head")
    with pytest.raises(ValueError, match="Rule layers must be one of"):
        qn.Rule(layers="conv")
    with pytest.raises(ValueError, match="Rule format must be one of"):
        qn.Rule(format="int4")
    with pytest.raises(ValueError, match="Rule threshold must be a finite number >= 0"):
        qn.Rule(threshold=-1.0)
    with pytest.raises(TypeError, match="either rules or the deprecated"):
        with pytest.warns(DeprecationWarning):
            qn.quantize_model(FloatLM(nnx.Rngs(0)), qn.Rule(), dense=qn.DenseNF4)


def _linen_net():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = ql.Embed4bit(20, K, name="embed")(ids)
            h = ql.DenseNF4(K, name="fc")(h)
            return ql.Dense8bitLt(8, name="out")(jax.nn.relu(h))

    return Net()


class NnxNet(nnx.Module):
    def __init__(self, rngs, quant_type="nf4"):
        self.embed = qn.Embed4bit(20, K, rngs=rngs)
        self.fc = qn.Dense4bit(K, K, quant_type=quant_type, rngs=rngs)
        self.out = qn.Dense8bitLt(K, 8, rngs=rngs)

    def __call__(self, ids):
        return self.out(jax.nn.relu(self.fc(self.embed(ids))))


def test_linen_variables_to_nnx_and_back():
    net = _linen_net()
    variables = net.init(jax.random.key(0), IDS)
    model = qn.from_linen_variables(NnxNet(nnx.Rngs(1)), variables)
    np.testing.assert_array_equal(model(IDS), net.apply(variables, IDS))
    back = qn.to_linen_variables(model)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # An abstract model (nothing drawn or quantized) is filled just as well.
    abstract = nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0)))
    np.testing.assert_array_equal(qn.from_linen_variables(abstract, variables)(IDS), net.apply(variables, IDS))


def test_linen_interop_errors():
    variables = _linen_net().init(jax.random.key(0), IDS)
    quantized = {k: v for k, v in variables["quantized"].items() if k != "fc"}
    missing = {"params": variables["params"], "quantized": quantized}
    with pytest.raises(KeyError, match="quantized/fc/weight"):
        qn.from_linen_variables(NnxNet(nnx.Rngs(1)), missing)
    with pytest.raises(ValueError, match="quantized/fc/weight"):
        qn.from_linen_variables(NnxNet(nnx.Rngs(1), quant_type="fp4"), variables)
    extra = {**variables, "params": {**variables["params"], "extra": {"kernel": jnp.zeros((2, 2))}}}
    with pytest.raises(ValueError, match="params/extra/kernel"):
        qn.from_linen_variables(NnxNet(nnx.Rngs(1)), extra)


def test_embedding_tables_keep_their_32bit_optimizer_mark():
    class Tagged(nnx.Module):
        def __init__(self, rngs):
            self.tok = qn.StableEmbed(20, K, rngs=rngs)
            self.fc = qn.StandardDense(K, K, rngs=rngs)

    model = Tagged(nnx.Rngs(0))
    marked = nnx.state(model, qn.optim_32bit_filter)
    assert [tuple(p) for p, _ in nnx.to_flat_state(marked)] == [("tok", "embedding")]
    # The mark is the Linen modules' "optim_bits" collection, so Linen's optax helper reads it.
    variables = qn.to_linen_variables(model)
    assert ql.params_kept_32bit(variables) == [("tok", "embedding")]
    labels = ql.state_labels_32bit(variables)
    assert labels["tok"]["embedding"] == "32bit" and labels["fc"]["kernel"] == "default"
    # And it comes back from Linen variables into a model built without it.
    plain = Tagged(nnx.Rngs(1))
    plain.tok.embedding.set_metadata("optim_bits", None)
    qn.from_linen_variables(plain, variables)
    assert plain.tok.embedding.get_metadata()["optim_bits"] == 32
