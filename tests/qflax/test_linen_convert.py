"""Getting weights in and out of Linen models: quantize_params (with QuantRules), to/from_bnb_checkpoint.

bitsandbytes 0.49.2 runs on CPU in .train() mode (its eval mode takes a bf16 packed path,
docs/deviations.md#cpu-packed-path).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitsandbytes as bnb
import torch

from qflax.linen import (
    Dense4bit,
    Dense8bitLt,
    DenseNF4,
    Embed4bit,
    QuantRules,
    Rule,
    from_bnb_checkpoint,
    quantize_params,
    to_bnb_checkpoint,
)
from qflax.quant import dequantize_4bit, quantize_4bit, quantize_rows

# Dense and Embed layers in NF4; the head stays float.
RULES = QuantRules(Rule("head", keep_float=True), Rule("*"))


class Model(nn.Module):
    """A model whose layer classes are swappable; explicit names keep the variable paths equal."""

    dense: type = nn.Dense
    embed: type = nn.Embed

    @nn.compact
    def __call__(self, ids):
        h = self.embed(50, 64, name="tok")(ids)
        h = nn.LayerNorm(name="ln")(h)
        h = nn.relu(self.dense(128, name="fc1")(h))
        return nn.Dense(8, name="head")(h)  # stays float


def test_quantize_params_maps_dense_and_embed_layers():
    ids = jnp.array([[1, 2, 3], [4, 5, 49]])
    float_params = jax.jit(Model().init)(jax.random.key(0), ids)["params"]
    variables = quantize_params(float_params, RULES)
    quantized = variables["quantized"]
    assert set(quantized) == {"tok", "fc1"}
    expected = jax.jit(quantize_4bit, static_argnums=(1, 2, 3))(float_params["fc1"]["kernel"].T, 64, "nf4", True)
    np.testing.assert_array_equal(np.asarray(quantized["fc1"]["weight"].packed), np.asarray(expected.packed))
    np.testing.assert_array_equal(np.asarray(quantized["fc1"]["weight"].absmax), np.asarray(expected.absmax))
    assert not quantized["tok"]["weight"].nested  # Embed4bit's default: no double quantization
    assert set(variables["params"]) == {"ln", "fc1", "head"}
    assert set(variables["params"]["fc1"]) == {"bias"}

    four_bit = Model(dense=DenseNF4, embed=Embed4bit)
    y4 = jax.jit(four_bit.apply)(variables, ids)
    # Same model in float with the dequantized weights substituted: the mapping is exact.
    dequantized = jax.tree_util.tree_map(lambda x: x, float_params)
    dequantized["fc1"]["kernel"] = dequantize_4bit(quantized["fc1"]["weight"]).T
    dequantized["tok"]["embedding"] = dequantize_4bit(quantized["tok"]["weight"])
    y_ref = jax.jit(Model().apply)({"params": dequantized}, ids)
    np.testing.assert_allclose(np.asarray(y4), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    y_float = jax.jit(Model().apply)({"params": float_params}, ids)
    assert 0 < float(jnp.linalg.norm(y4 - y_float) / jnp.linalg.norm(y_float)) < 0.3


def test_default_rules_quantize_dense_kernels_only():
    ids = jnp.array([[1, 2, 3]])
    float_params = jax.jit(Model().init)(jax.random.key(0), ids)["params"]
    variables = quantize_params(float_params)
    assert set(variables["quantized"]) == {"fc1", "head"}
    assert variables["quantized"]["fc1"]["weight"].nested and variables["quantized"]["fc1"]["weight"].blocksize == 64
    np.testing.assert_array_equal(variables["params"]["tok"]["embedding"], float_params["tok"]["embedding"])


def test_rules_choose_format_and_settings_per_layer():
    params = {
        "tok": {"embedding": jax.random.normal(jax.random.key(0), (50, 64))},
        "fc1": {"kernel": jax.random.normal(jax.random.key(1), (64, 128)), "bias": jnp.ones(128)},
        "head": {"kernel": jax.random.normal(jax.random.key(2), (128, 8))},
    }
    rules = QuantRules(
        Rule("fc*", format="4bit", quant_type="fp4", blocksize=128, compress_statistics=False),
        Rule("head", format="8bit"),
        Rule("*", layers="embed", format="8bit"),
    )
    variables = quantize_params(params, rules)
    fc1 = variables["quantized"]["fc1"]["weight"]
    assert (fc1.quant_type, fc1.blocksize, fc1.nested, fc1.shape) == ("fp4", 128, False, (128, 64))
    want = quantize_4bit(params["fc1"]["kernel"].T, 128, "fp4", False)
    np.testing.assert_array_equal(fc1.packed, want.packed)
    for name, table in (("head", params["head"]["kernel"].T), ("tok", params["tok"]["embedding"])):
        np.testing.assert_array_equal(variables["quantized"][name]["weight"].codes, quantize_rows(table).codes)
    assert list(variables["params"]) == ["fc1"] and list(variables["params"]["fc1"]) == ["bias"]
    # The 8-bit head runs in Dense8bitLt: rows of ones quantize exactly, so y = x @ dequant(W).T.
    x = jnp.ones((2, 128))
    weight = variables["quantized"]["head"]["weight"]
    y = Dense8bitLt(8, use_bias=False).apply({"params": {}, "quantized": {"weight": weight}}, x)
    dequantized = np.asarray(weight.codes, np.float32) * np.asarray(weight.scale)[:, None] / 127
    np.testing.assert_allclose(y, np.ones((2, 128)) @ dequantized.T, rtol=1e-5, atol=1e-4)


def test_quantize_params_progress_bar(capsys):
    params = {"a": {"kernel": jnp.ones((64, 8))}, "b": {"kernel": jnp.ones((64, 8)), "bias": jnp.zeros(8)}}
    quantize_params(params, progress=True)
    assert "quantizing" in capsys.readouterr().err
    quantize_params(params)  # small tree: no bar by default
    assert "quantizing" not in capsys.readouterr().err


def test_quantize_params_bad_input():
    # NaN is a value, not an error: the README rule (its blocks decode to NaN) holds here too.
    q = quantize_params({"fc": {"kernel": jnp.full((64, 4), jnp.nan)}})["quantized"]["fc"]["weight"]
    assert np.isnan(np.asarray(dequantize_4bit(q))).all()
    with pytest.raises(TypeError, match="params/fc/kernel must have dtype float32, float16 or bfloat16"):
        quantize_params({"fc": {"kernel": jnp.ones((64, 4), jnp.int32)}})
    with pytest.raises(ValueError, match="quant_type must be one of"):
        Rule(quant_type="int4")
    with pytest.raises(TypeError, match="params must be a mapping"):
        quantize_params([jnp.ones((4, 4))])
    with pytest.raises(TypeError, match="rules must be"):
        quantize_params({}, rules="nf4")


def _bnb_linear(in_features, out_features, quant_type, nested, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, quant_type=quant_type, compress_statistics=nested)
    if bias:
        torch.nn.init.normal_(layer.bias)
    return layer.to("cpu").train()  # .to quantizes; train mode keeps bitsandbytes off its packed bf16 path


def _bnb_from_state_dict(state, in_features, out_features, prefix=""):
    """A bitsandbytes Linear4bit rebuilt the supported way: Params4bit.from_prequantized."""
    entries = {k[len(prefix) :]: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith(prefix)}
    layer = bnb.nn.Linear4bit(in_features, out_features, bias="bias" in entries)
    weight = entries.pop("weight")
    bias = entries.pop("bias", None)
    stats = {k[len("weight.") :]: v for k, v in entries.items()}
    layer.weight = bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=stats, device="cpu", module=layer)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias)
    return layer.train()


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_bitsandbytes_checkpoint_loads_and_exports_with_equal_outputs(quant_type, nested):
    layer = _bnb_linear(192, 40, quant_type, nested)
    x = torch.randn(2, 3, 192)
    with torch.no_grad():
        y_bnb = layer(x).numpy()
    variables = from_bnb_checkpoint(layer.state_dict())
    model = Dense4bit(40, quant_type=quant_type, compress_statistics=nested)
    y_ours = np.asarray(model.apply(variables, jnp.asarray(x.numpy())))
    np.testing.assert_allclose(y_ours, y_bnb, rtol=1e-5, atol=1e-5)

    # Our weights (freshly quantized by qflax, not by bitsandbytes) run in bitsandbytes.
    fresh = jax.jit(model.init)(jax.random.key(1), jnp.ones((1, 192)))
    fresh["params"]["bias"] = jax.random.normal(jax.random.key(2), (40,))
    state = to_bnb_checkpoint(fresh)
    rebuilt = _bnb_from_state_dict(state, 192, 40)
    with torch.no_grad():
        y_rebuilt = rebuilt(x).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(fresh, jnp.asarray(x.numpy()))), y_rebuilt, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_match_bitsandbytes():
    layer = _bnb_linear(128, 32, "nf4", True)
    x = torch.randn(4, 128).to(torch.bfloat16)
    with torch.no_grad():
        y_bnb = layer(x).float().numpy()  # bf16 first input: bitsandbytes computes in bf16
    variables = from_bnb_checkpoint(layer.state_dict())
    y = DenseNF4(32).apply(variables, jnp.asarray(x.float().numpy()).astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), y_bnb, rtol=2e-2, atol=2e-2 * np.abs(y_bnb).max())


class TorchNet(torch.nn.Module):
    # In-features are multiples of 64: bitsandbytes 0.49.2's CPU dequantize_4bit decodes some
    # other shapes wrongly (e.g. (16, 96): error 2.0 vs 0.47 for the same codes decoded by qflax).

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.fc1 = bnb.nn.Linear4bit(64, 128, quant_type="nf4")
        self.norm = torch.nn.LayerNorm(128)  # a float layer: not part of the 4-bit variables
        self.head = bnb.nn.Linear4bit(128, 16, bias=False, quant_type="fp4", compress_statistics=False)

    def forward(self, x):
        return self.head(torch.relu(self.encoder.fc1(x)))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Encoder(nn.Module):
            @nn.compact
            def __call__(self, h):
                return DenseNF4(128, name="fc1")(h)

        h = nn.relu(Encoder(name="encoder")(x))
        return Dense4bit(16, quant_type="fp4", use_bias=False, compress_statistics=False, name="head")(h)


def test_whole_model_checkpoint_with_many_prefixes_and_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = TorchNet().to("cpu").train()
    x = torch.randn(5, 64)
    with torch.no_grad():
        y_torch = net(x).numpy()
    path = tmp_path / "bnb_model.safetensors"
    save_file(net.state_dict(), str(path))
    variables = from_bnb_checkpoint(path)
    assert set(variables["quantized"]) == {"encoder", "head"} and "norm" not in variables["params"]
    y = np.asarray(FlaxNet().apply(variables, jnp.asarray(x.numpy())))
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)

    # Export back: the same bytes as bitsandbytes saved, through a file of our own.
    ours = tmp_path / "qflax_model.safetensors"
    to_bnb_checkpoint(variables, ours)
    reread = from_bnb_checkpoint(ours)
    ref_state = {k: v.numpy() for k, v in net.state_dict().items() if not k.startswith("norm.")}
    out_state = to_bnb_checkpoint(reread)
    assert set(out_state) == set(ref_state)
    for key, value in ref_state.items():
        np.testing.assert_array_equal(out_state[key], value, err_msg=key)

    # With a template, the float LayerNorm loads too (torch "weight" is Flax "scale").
    norm = {"scale": jnp.zeros(128), "bias": jnp.zeros(128)}
    full = from_bnb_checkpoint(path, {**variables, "params": {**variables["params"], "norm": norm}})
    np.testing.assert_array_equal(full["params"]["norm"]["scale"], net.norm.weight.detach().numpy())
    np.testing.assert_array_equal(full["params"]["norm"]["bias"], net.norm.bias.detach().numpy())
    assert set(to_bnb_checkpoint(full)) == set(net.state_dict())


def test_rename_maps_torch_names_to_flax_paths_and_back():
    variables = {"params": {}, "quantized": {"layers_0": {"fc": {"weight": quantize_4bit(jnp.ones((8, 64)))}}}}
    state = to_bnb_checkpoint(variables)
    assert "layers_0.fc.weight" in state
    torch_state = {k.replace("layers_0", "layers.0"): v for k, v in state.items()}
    to_flax = lambda name: name.replace("layers.", "layers_")  # noqa: E731
    loaded = from_bnb_checkpoint(torch_state, rename=to_flax)
    assert "fc" in loaded["quantized"]["layers_0"]
    back = to_bnb_checkpoint(loaded, rename=lambda name: name.replace("layers_", "layers."))
    assert set(back) == set(torch_state)
    # A template names Flax paths; rename still runs torch -> Flax.
    templated = from_bnb_checkpoint(torch_state, variables, rename=to_flax)
    packed = templated["quantized"]["layers_0"]["fc"]["weight"].packed
    np.testing.assert_array_equal(packed, state["layers_0.fc.weight"])


def test_bad_checkpoints_raise_clear_errors():
    state = {k: v.numpy() for k, v in _bnb_linear(64, 16, "nf4", True).state_dict().items()}
    variables = from_bnb_checkpoint(state)
    missing = {k: v for k, v in state.items() if k != "weight.absmax"}
    with pytest.raises(KeyError, match="missing the key 'weight.absmax'"):
        from_bnb_checkpoint(missing)
    with pytest.raises(KeyError, match="missing the key 'weight'"):
        from_bnb_checkpoint({k: v for k, v in state.items() if k != "weight"})
    truncated = dict(state, weight=state["weight"][:-2])
    with pytest.raises(ValueError, match="'weight' must be uint8 of shape"):
        from_bnb_checkpoint(truncated)
    with pytest.raises(ValueError, match=r"weight has shape \(16, 64\), but this layer needs \(24, 64\)"):
        DenseNF4(24).apply(variables, jnp.ones((1, 64)))
    with pytest.raises(ValueError, match="inputs have 32 features but the weight"):
        DenseNF4(16).apply(variables, jnp.ones((1, 32)))
    with pytest.raises(ValueError, match="the quantized weight is 'nf4' but the layer's quant_type is 'fp4'"):
        Dense4bit(16, quant_type="fp4").apply(variables, jnp.ones((1, 64)))
    relabelled = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in state.items()}
    with pytest.raises(ValueError, match="says quant_type 'nf4' but its key names 'fp4'"):
        from_bnb_checkpoint(relabelled)
    with pytest.raises(ValueError, match="no quantized weights in the checkpoint"):
        from_bnb_checkpoint({"fc.weight": np.ones((4, 4), np.float32)})
    with pytest.raises(TypeError, match="source must be a state dict"):
        from_bnb_checkpoint(42)
    # With a template: a float entry of the wrong shape is named.
    template = {"params": {"fc": {"kernel": jnp.zeros((4, 3))}}}
    with pytest.raises(ValueError, match="fc.weight does not fit the variable params/fc/kernel"):
        from_bnb_checkpoint({"fc.weight": np.ones((4, 4), np.float32)}, template)
    with pytest.raises(KeyError, match="missing the key 'fc.weight'"):
        from_bnb_checkpoint({}, template)
