"""SwitchBack layers vs float Dense, measured against an LLM.int8 reference (docs/switchback.md#accuracy, test_triton).

Setup as bitsandbytes' test_switchback: Dense(83 -> 332), batch 13, loss ``2^10 * mean|out|``.
For each variant, the mean absolute errors (vs a float ``flax.linen.Dense`` in the same dtype)
of the output, the input gradient, the weight gradient and the bias gradient must be within
2x the errors of the LLM.int8 reference on the same data:

* output, input gradient, bias gradient: bitsandbytes 0.49.2 ``Linear8bitLt`` on CPU in eval
  mode with ``has_fp16_weights=False`` (its int8 path, docs/int8.md#matmul);
* weight gradient (that module has none): an independent numpy LLM.int8 computation of
  ``G^T X`` from column-wise int8 ``G`` and ``X`` (int8_double_quant's column halves), with
  ``G`` the gradient of the same loss at the reference's own output.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitsandbytes as bnb
import torch

from qflax.linen import SwitchBackDense, SwitchBackDenseBnb

IN_FEATURES, OUT_FEATURES, BATCH = 83, 332, 13
DTYPES = {"float16": (jnp.float16, torch.float16), "bfloat16": (jnp.bfloat16, torch.bfloat16), "float32": (jnp.float32, torch.float32)}
LAYERS = {
    "global": lambda: SwitchBackDense(OUT_FEATURES),
    "vectorwise": lambda: SwitchBackDense(OUT_FEATURES, vector_wise_quantization=True),
    "global_mem_efficient": lambda: SwitchBackDense(OUT_FEATURES, mem_efficient=True),
    "bnb": lambda: SwitchBackDenseBnb(OUT_FEATURES),
    "bnb_threshold": lambda: SwitchBackDenseBnb(OUT_FEATURES, threshold=2.5),
}
THRESHOLDS = {"bnb_threshold": 2.5}


def _loss_scale(n):
    return np.float32(2.0**10 / n)


def _jax_errors(module, params, x, reference):
    """Output and gradients of ``2^10 mean|out|`` for a Linen layer, and their mean abs errors vs ``reference``."""

    def loss(params, x):
        out = module.apply({"params": params}, x)
        return 2.0**10 * jnp.mean(jnp.abs(out.astype(jnp.float32))), out

    (_, out), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    got = {"out": out, "grad_x": g_x, "grad_w": g_params["kernel"].T, "grad_b": g_params["bias"]}
    got = {k: np.asarray(v.astype(jnp.float32)) for k, v in got.items()}
    if reference is None:
        return got
    return {k: float(np.mean(np.abs(got[k] - reference[k]))) for k in got}


def _columnwise_int8(a):
    """Column-wise int8 quantization, numpy: round half to even of 127 * a / colmax; zero columns -> 0."""
    colmax = np.max(np.abs(a), axis=0)
    scale = np.where(colmax == 0, np.float32(0), np.float32(127) / np.where(colmax == 0, 1, colmax))
    return np.rint(a * scale[None, :]).astype(np.int8), colmax.astype(np.float32)


def _llm_int8_errors(weight, bias, x_np, torch_dtype, threshold, reference):
    """Errors of the LLM.int8 reference (bitsandbytes Linear8bitLt eval + numpy int8 weight gradient)."""
    layer = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, has_fp16_weights=False, threshold=threshold)
    w_t = torch.from_numpy(np.array(weight)).to(torch_dtype)
    layer.weight = bnb.nn.Int8Params(w_t, has_fp16_weights=False, requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.from_numpy(np.array(bias)).to(torch_dtype))
    layer = layer.to("cpu").eval()  # quantizes the weight (int8 CB, SCB)
    x_t = torch.from_numpy(np.array(x_np)).to(torch_dtype).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "inputs will be cast to float16" for bf16/fp32
        out = layer(x_t)
    (2.0**10 * out.float().abs().mean()).backward()
    # LLM.int8 weight gradient from the reference's own output gradient.
    x2 = x_t.detach().float().numpy().reshape(-1, IN_FEATURES)
    out2 = out.detach().float().numpy().reshape(-1, OUT_FEATURES)
    g = np.sign(out2) * _loss_scale(out2.size)
    g_codes, g_colmax = _columnwise_int8(g)
    x_codes, x_colmax = _columnwise_int8(x2)
    acc = g_codes.astype(np.int32).T @ x_codes.astype(np.int32)
    grad_w = acc.astype(np.float32) * (g_colmax[:, None] / 127) * (x_colmax[None, :] / 127)
    got = {
        "out": out.detach().float().numpy(),
        "grad_x": x_t.grad.float().numpy(),
        "grad_w": grad_w,
        "grad_b": layer.bias.grad.float().numpy(),
    }
    return {k: float(np.mean(np.abs(got[k] - reference[k]))) for k in got}


def measure(dtype_name, batch_shape, seed=0):
    """Mean abs errors per variant and of the LLM.int8 reference, keyed by quantity."""
    jdtype, tdtype = DTYPES[dtype_name]
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(IN_FEATURES)  # torch.nn.Linear's default init range
    weight = rng.uniform(-bound, bound, (OUT_FEATURES, IN_FEATURES)).astype(np.float32)
    bias = rng.uniform(-bound, bound, OUT_FEATURES).astype(np.float32)
    x_np = np.asarray(jnp.asarray(rng.standard_normal((*batch_shape, IN_FEATURES)), jnp.float32).astype(jdtype).astype(jnp.float32))
    x = jnp.asarray(x_np).astype(jdtype)
    params = {"kernel": jnp.asarray(weight.T).astype(jdtype), "bias": jnp.asarray(bias).astype(jdtype)}
    w_used = np.asarray(params["kernel"].T.astype(jnp.float32))
    b_used = np.asarray(params["bias"].astype(jnp.float32))

    dense = nn.Dense(OUT_FEATURES, dtype=jdtype, param_dtype=jdtype)
    reference = _jax_errors(dense, params, x, None)
    errors = {}
    for name, make in LAYERS.items():
        layer = make().copy(dtype=jdtype, param_dtype=jdtype)
        errors[name] = _jax_errors(layer, params, x, reference)
    baselines = {}
    for threshold in sorted({0.0, *THRESHOLDS.values()}):
        baselines[threshold] = _llm_int8_errors(w_used, b_used, x_np, tdtype, threshold, reference)
    return errors, baselines


@pytest.mark.parametrize("batch_shape", [(BATCH,), (3, BATCH)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_errors_within_twice_llm_int8(dtype_name, batch_shape):
    errors, baselines = measure(dtype_name, batch_shape)
    for name, errs in errors.items():
        baseline = baselines[THRESHOLDS.get(name, 0.0)]
        for quantity, err in errs.items():
            assert err < 2 * baseline[quantity], (name, quantity, err, baseline[quantity])
    # The comparison means something only if the int8 reference is measurably off.
    assert all(v > 0 for v in baselines[0.0].values()), baselines[0.0]


@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_bnb_variant_forward_and_input_grad_match_linear8bitlt(threshold):
    """SwitchBackDenseBnb's forward and grad_x are bitsandbytes' LLM.int8 ones (fp16, fixed cotangent).

    With outlier columns, bitsandbytes multiplies them with the int8-dequantized weight columns
    while we use the float ones (the intended fp16 weight, docs/switchback.md#switchbacklinearbnb): the expected
    output adds
    that difference, ``x[:, idx] @ (W - dequant(CB))[:, idx].T``, to bitsandbytes' output.
    """
    rng = np.random.default_rng(3)
    bound = 1 / np.sqrt(IN_FEATURES)
    weight = rng.uniform(-bound, bound, (OUT_FEATURES, IN_FEATURES)).astype(np.float16)
    bias = rng.uniform(-bound, bound, OUT_FEATURES).astype(np.float16)
    x_np = rng.standard_normal((BATCH, IN_FEATURES)).astype(np.float16)
    g_np = rng.standard_normal((BATCH, OUT_FEATURES)).astype(np.float16)

    layer = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(torch.from_numpy(weight.copy()), has_fp16_weights=False, requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.from_numpy(bias.copy()))
    layer = layer.to("cpu").eval()
    x_t = torch.from_numpy(x_np.copy()).requires_grad_(True)
    out_t = layer(x_t)
    out_t.backward(torch.from_numpy(g_np.copy()))
    expected = out_t.detach().float().numpy()
    if threshold > 0:
        idx = layer.state.idx.numpy()
        assert 0 < len(idx) < IN_FEATURES
        w_dequant = layer.state.CB.float().numpy() * layer.state.SCB.numpy()[:, None] / 127
        expected = expected + x_np[:, idx].astype(np.float32) @ (weight.astype(np.float32) - w_dequant)[:, idx].T

    module = SwitchBackDenseBnb(OUT_FEATURES, threshold=threshold)
    params = {"kernel": jnp.asarray(weight.T), "bias": jnp.asarray(bias)}
    out, vjp = jax.vjp(lambda x: module.apply({"params": params}, x), jnp.asarray(x_np))
    (grad_x,) = vjp(jnp.asarray(g_np))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(grad_x, np.float32), x_t.grad.float().numpy(), rtol=2e-3, atol=2e-3)


if __name__ == "__main__":
    for dt in DTYPES:
        for shape in [(BATCH,), (3, BATCH)]:
            errors, baselines = measure(dt, shape)
            print(dt, shape)
            for name, errs in {**errors, **{f"llm_int8(t={t})": b for t, b in baselines.items()}}.items():
                print(f"  {name:22s} " + " ".join(f"{k}={v:.3e}" for k, v in errs.items()))
