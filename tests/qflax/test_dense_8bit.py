"""Dense8bitLt vs float Dense and bitsandbytes 0.49.2's Linear8bitLt; conversions; training."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_f
from qflax import linen as qnn
from qflax import quant

INT8 = qnn.Rule("*", layers="dense", format="8bit")


def _torch_linear(in_features, out_features, seed):
    """A torch nn.Linear's default init (U(-1/sqrt(in), 1/sqrt(in))), with fp16-representable values."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    w = linear.weight.detach().half().float().numpy()
    b = linear.bias.detach().half().float().numpy()
    return w, b


def _frozen_layer(threshold, w, b):
    layer = qnn.Dense8bitLt(w.shape[0], threshold=threshold)
    variables = qnn.quantize_params({"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}, INT8)
    return layer, variables


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_spec12_bound_vs_fp16_dense_1024_to_3072(threshold):
    w, b = _torch_linear(1024, 3072, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 1024)).astype(np.float16)
    layer, variables = _frozen_layer(threshold, w, b)
    x_j = jnp.asarray(x)
    y = layer.apply(variables, x_j)
    assert y.dtype == jnp.float16 and y.shape == (3, 3072)
    # The fp16 reference layer: fp16 operands, float32 accumulation, fp16 result (torch CPU half linear).
    ref = (x.astype(np.float32) @ w.T + b).astype(np.float16).astype(np.float32)
    diff = np.abs(np.asarray(y, np.float32) - ref)
    assert np.mean(diff > 0.02) < 2.5e-4
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.03, rtol=1e-5)

    proj = np.random.default_rng(1).standard_normal((3, 3072)).astype(np.float32)
    gx = jax.grad(lambda x: jnp.mean(layer.apply(variables, x).astype(jnp.float32) * proj))(x_j)
    gx_ref = (proj / proj.size) @ w  # d mean(out * proj) / dx of the float layer
    assert gx.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(gx, np.float32), gx_ref, atol=0.01)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_matches_bitsandbytes_linear8bitlt_on_cpu(threshold):
    w, b = _torch_linear(64, 48, seed=1)
    x = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float16)
    x[0, 1, 9] = 20.0
    x[1, 3, 30] = -11.0
    bnb_layer = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=threshold)
    bnb_layer.load_state_dict({"weight": torch.from_numpy(w), "bias": torch.from_numpy(b)})
    bnb_layer = bnb_layer.to("cpu").eval()  # quantizes; eval = the int8 path on CPU (docs/int8.md#linear8bitlt)
    sd = {k: v.clone() for k, v in bnb_layer.state_dict().items()}
    with torch.no_grad():
        y_bnb = bnb_layer(torch.from_numpy(x)).float().numpy()

    variables = qnn.from_bnb_checkpoint(sd)
    ours = qnn.int8_weight_from_kernel(jnp.asarray(w.T))
    np.testing.assert_array_equal(np.asarray(variables["quantized"]["weight"].codes), np.asarray(ours.codes))
    np.testing.assert_array_equal(np.asarray(variables["quantized"]["weight"].scale), np.asarray(ours.scale))
    y = qnn.Dense8bitLt(48, threshold=threshold).apply(variables, jnp.asarray(x))
    # Same codes and scales; bitsandbytes' CPU epilogue constant is 1.8e-5 relatively larger than
    # 1/127², and it rounds the outlier product to fp16 before adding: a few fp16 ulps apart.
    np.testing.assert_allclose(np.asarray(y, np.float32), y_bnb, rtol=4e-3, atol=4e-3)


def test_int8_codes_equal_bitsandbytes_quantizer():
    w, _ = _torch_linear(96, 40, seed=3)
    ca, scb, _ = bnb_f.int8_vectorwise_quant(torch.from_numpy(w).half())
    for convert in (qnn.int8_weight_from_kernel, jax.jit(qnn.int8_weight_from_kernel)):
        q = convert(jnp.asarray(w.T))
        np.testing.assert_array_equal(np.asarray(q.codes), ca.numpy())
        np.testing.assert_array_equal(np.asarray(q.scale), scb.numpy())


def test_bnb_state_dict_round_trip():
    w, b = _torch_linear(32, 16, seed=4)
    variables = qnn.quantize_params({"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}, INT8)
    sd = qnn.to_bnb_checkpoint(variables, rename=lambda path: "fc")  # the root layer is torch's "fc"
    assert sorted(sd) == ["fc.SCB", "fc.bias", "fc.weight", "fc.weight_format"]
    assert sd["fc.weight"].dtype == np.int8 and sd["fc.weight"].shape == (16, 32)
    assert sd["fc.SCB"].dtype == np.float32 and sd["fc.weight_format"].shape == ()

    bnb_layer = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False).to("cpu")
    bnb_layer.load_state_dict({k[len("fc."):]: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
    np.testing.assert_array_equal(bnb_layer.weight.data.numpy(), sd["fc.weight"])
    np.testing.assert_array_equal(bnb_layer.weight.SCB.numpy(), sd["fc.SCB"])

    back = qnn.from_bnb_checkpoint(sd, rename=lambda name: "" if name == "fc" else name)
    np.testing.assert_array_equal(np.asarray(back["quantized"]["weight"].codes), sd["fc.weight"])
    np.testing.assert_array_equal(np.asarray(back["params"]["bias"]), b)


def test_trainable_state_dict_is_float_weight_out_in():
    w, b = _torch_linear(12, 6, seed=5)
    variables = {"params": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}}
    sd = qnn.to_bnb_checkpoint(variables)
    assert sorted(sd) == ["bias", "weight"]
    np.testing.assert_array_equal(sd["weight"], w)
    bnb_layer = bnb.nn.Linear8bitLt(12, 6, has_fp16_weights=True)
    bnb_layer.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    # A float layer is read through a template (shapes of Dense8bitLt(has_fp16_weights=True).init).
    template = qnn.Dense8bitLt(6, has_fp16_weights=True).init(jax.random.key(0), jnp.ones((1, 12)))
    back = qnn.from_bnb_checkpoint({k: v.detach() for k, v in bnb_layer.state_dict().items()}, template)
    np.testing.assert_array_equal(np.asarray(back["params"]["kernel"]), w.T)
    np.testing.assert_array_equal(np.asarray(back["params"]["bias"]), b)


def test_bad_state_dicts_raise_clear_errors():
    w, b = _torch_linear(8, 4, seed=6)
    sd = qnn.to_bnb_checkpoint(qnn.quantize_params({"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}, INT8))
    with pytest.raises(ValueError, match="Expected supported weight format - got 7"):
        qnn.from_bnb_checkpoint({**sd, "weight_format": np.array(7, np.uint8)})
    with pytest.raises(ValueError, match="Only 'row' weight format is supported, got col32"):
        qnn.from_bnb_checkpoint({**sd, "weight_format": np.array(1, np.uint8)})
    with pytest.raises(ValueError, match=r"SCB.*\(4,\)"):
        qnn.from_bnb_checkpoint({**sd, "SCB": np.ones(3, np.float32)})
    template = qnn.Dense8bitLt(4).init(jax.random.key(0), jnp.ones((1, 8)))
    with pytest.raises(KeyError, match="SCB"):
        qnn.from_bnb_checkpoint({"weight": sd["weight"], "bias": sd["bias"]}, template)
    with pytest.raises(KeyError, match="weight"):
        qnn.from_bnb_checkpoint({"bias": sd["bias"]}, template)
    with pytest.raises(ValueError, match="must be a 2-D int8 array when .SCB. is present"):
        qnn.from_bnb_checkpoint({"weight": w, "SCB": sd["SCB"]})


def test_bad_module_inputs_raise_clear_errors():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        qnn.Dense8bitLt(4, threshold=-1.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        qnn.Dense8bitLt(4, threshold=-1.0, has_fp16_weights=True).init(jax.random.key(0), x)
    layer = qnn.Dense8bitLt(4)
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16, got int32"):
        layer.apply(variables, jnp.ones((2, 8), jnp.int32))
    bad = {**variables, "quantized": {"weight": quant.Int8Rows(
        codes=variables["quantized"]["weight"].codes, scale=jnp.ones(5, jnp.float32))}}
    with pytest.raises(ValueError, match=r"SCB\) must be float32 of shape \(4,\)"):
        layer.apply(bad, x)


def test_frozen_layer_keeps_weight_out_of_params():
    layer = qnn.Dense8bitLt(6, threshold=6.0, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (3, 10))
    variables = layer.init(jax.random.key(1), x)
    assert set(variables["params"]) == {"bias"}
    weight = variables["quantized"]["weight"]
    assert weight.codes.shape == (6, 10) and weight.codes.dtype == jnp.int8
    assert layer.apply(variables, x).dtype == jnp.bfloat16
    grads = jax.grad(lambda p: jnp.sum(layer.apply({**variables, "params": p}, x).astype(jnp.float32)))(
        variables["params"]
    )
    np.testing.assert_allclose(np.asarray(grads["bias"]), np.full(6, 3.0))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_trainable_kernel_gradient_within_1_percent_of_exact(threshold):
    layer = qnn.Dense8bitLt(24, threshold=threshold, has_fp16_weights=True)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 16, 40)).astype(np.float32)
    x[:, :, 3] *= 10.0  # an outlier feature
    proj = rng.standard_normal((2, 16, 24)).astype(np.float32)  # non-uniform: not a mean() loss
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    assert set(variables["params"]) == {"kernel", "bias"} and "quantized" not in variables

    def loss(params):
        return jnp.sum(layer.apply({"params": params}, jnp.asarray(x)) * proj)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    exact = x.reshape(-1, 40).astype(np.float64).T @ proj.reshape(-1, 24)  # dL/dkernel = X^T G
    rel = np.linalg.norm(np.asarray(grads["kernel"], np.float64) - exact) / np.linalg.norm(exact)
    assert rel < 0.01
    np.testing.assert_allclose(np.asarray(grads["bias"]), proj.reshape(-1, 24).sum(0), rtol=1e-5, atol=1e-5)


class _MLP(nn.Module):
    dense: type

    @nn.compact
    def __call__(self, x):
        # Explicit names: the float and the int8 model then share variable paths.
        return self.dense(4, name="out")(nn.relu(self.dense(32, name="hidden")(x)))


def _train(model, x, y, steps=150):
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int32 and float
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
    return float(jnp.mean((model.apply({"params": params}, x) - y) ** 2))


def test_mlp_with_trainable_int8_weights_reaches_float_loss():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((256, 16)), jnp.float32)
    teacher_w = rng.standard_normal((16, 4)).astype(np.float32)
    y = jnp.asarray(np.tanh(np.asarray(x) @ teacher_w) + 0.3 * rng.standard_normal((256, 4)), jnp.float32)
    loss_float = _train(_MLP(nn.Dense), x, y)
    loss_int8 = _train(_MLP(functools.partial(qnn.Dense8bitLt, has_fp16_weights=True, threshold=6.0)), x, y)
    assert loss_float < 0.2  # the float MLP did learn (the initial loss is about 0.9)
    assert abs(loss_int8 - loss_float) / loss_float < 0.05


def test_quantize_params_8bit_converts_a_float_model():
    x = jax.random.normal(jax.random.key(2), (5, 16))
    float_vars = _MLP(nn.Dense).init(jax.random.key(3), x)
    int8_vars = qnn.quantize_params(float_vars["params"], INT8)
    assert set(int8_vars["params"]["hidden"]) == {"bias"}
    assert isinstance(int8_vars["quantized"]["hidden"]["weight"], quant.Int8Rows)
    y8 = _MLP(qnn.Dense8bitLt).apply(int8_vars, x)
    y = _MLP(nn.Dense).apply(float_vars, x)
    np.testing.assert_allclose(np.asarray(y8), np.asarray(y), atol=0.05)
    kernel = float_vars["params"]["hidden"]["kernel"]
    back = qnn.dense_kernel_from_int8(int8_vars["quantized"]["hidden"]["weight"])
    # Each weight row (a kernel column) is off by at most its absmax / 254.
    bound = np.max(np.abs(np.asarray(kernel)), axis=0) / 254 + 1e-7
    assert np.all(np.abs(np.asarray(back) - np.asarray(kernel)) <= bound[None, :])


def test_planted_outliers_error_with_and_without_threshold():
    rng = np.random.default_rng(9)
    w, b = _torch_linear(256, 128, seed=9)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:, [7, 100, 200]] *= 30.0  # three outlier features, |x| up to ~100
    ref = x.astype(np.float64) @ w.T + b
    errors = {}
    for threshold in (0.0, 6.0):
        layer, variables = _frozen_layer(threshold, w, b)
        errors[threshold] = np.abs(np.asarray(layer.apply(variables, jnp.asarray(x))) - ref).mean()
    assert errors[6.0] < errors[0.0] / 2
