"""OutlierAwareDense: the tracer finds planted outlier dims; keeping them in float beats plain int8."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax import linen as qnn

PLANTED = [5, 33, 90]


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = qnn.OutlierAwareDense(128, name="fc1")(x)
        return qnn.OutlierAwareDense(16, name="fc2")(nn.gelu(h))


def _samples(n_batches=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        x = rng.standard_normal((32, 128)).astype(np.float32)
        x[:, PLANTED] *= 25.0  # systematic outlier features, as in large language models
        out.append(jnp.asarray(x))
    return out


def test_tracer_finds_exactly_the_planted_dims():
    model = _Net()
    variables = model.init(jax.random.key(0), _samples()[0])
    dims = qnn.find_outlier_dims(model, variables, _samples(), threshold=6.0)
    assert set(dims) == {("fc1",), ("fc2",)}
    assert dims[("fc1",)].tolist() == PLANTED
    # fc2's inputs are the gelu of fc1's outputs; recompute them independently over all samples.
    hidden = np.concatenate(
        [np.asarray(nn.gelu(nn.Dense(128).apply({"params": variables["params"]["fc1"]}, x))) for x in _samples()]
    )
    assert dims[("fc2",)].tolist() == np.nonzero(np.abs(hidden).max(0) >= 6.0)[0].tolist()


def test_zscore_criterion_finds_a_high_variance_dim_below_threshold():
    model = _Net()
    x = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32) * 0.5
    x[:, 70] *= 8.0  # std 4 among stds of 0.5, but |x| mostly below 6
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    dims = qnn.find_outlier_dims(model, variables, jnp.asarray(x), threshold=0.0, zscore=4.0)
    assert dims[("fc1",)].tolist() == [70]


def test_outlier_aware_output_error_is_smaller_than_plain_int8():
    model = _Net()
    samples = _samples()
    variables = model.init(jax.random.key(0), samples[0])
    dims = qnn.find_outlier_dims(model, variables, samples, threshold=6.0)
    quantized = qnn.quantize_outlier_aware(model, variables, dims, samples[0])
    assert "kernel" not in quantized["params"]["fc1"]
    assert quantized["outliers"]["fc1"]["idx"].tolist() == PLANTED

    x = _samples(n_batches=1, seed=7)[0]  # unseen data with the same outlier features
    kernel = variables["params"]["fc1"]["kernel"]
    exact = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(variables["params"]["fc1"]["bias"])
    fc1 = qnn.OutlierAwareDense(128)
    fc1_vars = {k: quantized[k]["fc1"] for k in ("params", "outliers", "quantized")}
    err_aware = np.abs(np.asarray(fc1.apply(fc1_vars, x)) - exact).mean()
    plain = qnn.Dense8bitLt(128, threshold=0.0)
    plain_vars = qnn.quantize_params(variables["params"]["fc1"], qnn.Rule(format="8bit"))
    err_plain = np.abs(np.asarray(plain.apply(plain_vars, x)) - exact).mean()
    assert err_aware < err_plain / 4

    # The whole quantized model runs under jit and is differentiable in its remaining params.
    y = jax.jit(model.apply)(quantized, x)
    assert y.shape == (32, 16) and y.dtype == jnp.float32
    grads = jax.grad(lambda p: jnp.sum(model.apply({**quantized, "params": p}, x)))(quantized["params"])
    assert set(grads["fc1"]) == {"bias"}


def test_before_quantization_the_layer_is_a_float_dense():
    x = _samples(n_batches=1)[0]
    layer = qnn.OutlierAwareDense(8)
    variables = layer.init(jax.random.key(0), x)
    assert set(variables) == {"params", "outliers"}
    expected = nn.Dense(8).apply({"params": variables["params"]}, x)
    np.testing.assert_allclose(np.asarray(layer.apply(variables, x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


class _KeepFloat(qnn.OutlierAwareDense):
    """A subclass whose hooks keep the whole weight in float: the output must equal the float layer."""

    def quantize_weight(self, w, outlier_idx):
        return {"w": w, "n": jnp.asarray(outlier_idx.shape[0], jnp.int32)}

    def forward_with_outliers(self, x, outlier_idx):
        weight = self.get_variable("quantized", "weight")
        return x @ weight["w"].T + self.get_variable("params", "bias")


def test_subclass_hooks_are_used():
    x = _samples(n_batches=1)[0]
    layer = _KeepFloat(8)
    variables = layer.init(jax.random.key(0), x)
    quantized = qnn.quantize_outlier_aware(layer, variables, {(): np.array(PLANTED)}, x)
    assert int(quantized["quantized"]["weight"]["n"]) == len(PLANTED)
    expected = x @ variables["params"]["kernel"] + variables["params"]["bias"]
    np.testing.assert_allclose(np.asarray(layer.apply(quantized, x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = _Net()
    x = _samples(n_batches=1)[0]
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        qnn.find_outlier_dims(model, variables, x, threshold=-1.0)
    with pytest.raises(ValueError, match="samples must hold at least one input"):
        qnn.find_outlier_dims(model, variables, [])
    with pytest.raises(ValueError, match="no layer of type"):
        qnn.find_outlier_dims(model, variables, x, layer_types=(nn.Dense,))
    with pytest.raises(ValueError, match=r"outliers\['idx'\] must lie in \[0, 128\)"):
        qnn.quantize_outlier_aware(model, variables, {("fc1",): np.array([3, 200])}, x)
    with pytest.raises(TypeError, match="x must have dtype"):
        model.apply(variables, jnp.ones((2, 128), jnp.int32))
