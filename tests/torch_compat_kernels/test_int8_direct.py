"""Linear8bitLt's direct path (the ``qflax::`` LLM.int8 ops on the torch tensors) vs the DLPack paths.

The forward runs the same quantizer and GEMM launches as JAX's kernel path, so outputs are
bit-identical to it (outlier columns included: found on the device, in the same order); the
backward products are torch ops computing what the XLA reference computes, so gradients agree
to rounding. Kernels run in Triton's interpreter on CPU tensors.
"""

import os

import pytest
import torch

import torch_compat as tc
from tests.torch_compat_kernels import paths
from torch_compat import direct_path

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the direct path runs on CPU only in Triton's interpreter")

OP = direct_path.LINEAR_8BIT
N, K = 40, 96
TOLERANCE = {torch.float16: 3e-3, torch.float32: 1e-5}


def make_layer(threshold, has_fp16_weights=False, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = tc.nn.Linear8bitLt(K, N, bias=bias, has_fp16_weights=has_fp16_weights, threshold=threshold)
    return layer.to("cpu")


def make_input(rows, dtype, gen, outliers=(3, 50)):
    x = torch.randn(rows, K, generator=gen)
    for col in outliers:  # planted outlier features, as in LLM activations
        x[0, col] = 12.0 + col
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_frozen_forward_matches_the_jax_kernel_bit_for_bit(threshold, rows, dtype, gen):
    layer = make_layer(threshold, bias=rows == 7)
    x = make_input(rows, dtype, gen).requires_grad_()
    g = torch.randn(rows, N, generator=gen).to(dtype)
    ours = paths.direct(layer, x, OP, g)
    ours_idx = layer.state.idx
    (ours_grad,) = paths.grads(x)
    theirs = paths.jax_kernel(layer, x, OP)
    assert ours.dtype == dtype and ours.shape == (rows, N) and torch.isfinite(ours).all()
    assert torch.equal(ours, theirs)
    reference = paths.jax_xla(layer, x, OP, g)
    (reference_grad,) = paths.grads(x)
    assert paths.relative_error(ours, reference) < TOLERANCE[dtype]
    assert paths.relative_error(ours_grad, reference_grad) < TOLERANCE[dtype]
    if threshold:
        assert ours_idx.tolist() == [3, 50] and torch.equal(ours_idx, layer.state.idx)


@pytest.mark.parametrize("rows", [1, 400])
def test_eager_forward_takes_idx_from_the_quantizer_kernel(rows, gen):
    # Without autograd the direct path calls the op's body, whose quantizer kernel lists the
    # outlier columns (found in the kernel for 1 row; from the mask for 400 rows, too many for one
    # program); idx must still be bitsandbytes' sorted indices and the output the JAX kernel path's.
    layer = make_layer(6.0)
    x = make_input(rows, torch.float16, gen, outliers=(50, 3, 95))
    with torch.no_grad():
        ours = paths.direct(layer, x, OP)
        assert isinstance(layer.state.__dict__["_idx_columns"], tuple)  # the kernel's columns, not a mask
        idx = layer.state.idx
        theirs = paths.jax_kernel(layer, x, OP)
    assert idx.dtype == torch.int64 and idx.tolist() == [3, 50, 95]
    assert torch.equal(ours, theirs)


def test_outliers_change_the_result(gen):
    # the outlier columns' float product is really taken: without it the error is far larger
    x = make_input(5, torch.float32, gen)
    with_outliers = paths.direct(make_layer(6.0), x, OP)
    without = paths.direct(make_layer(0.0), x, OP)
    torch.manual_seed(0)
    truth = torch.nn.Linear(K, N)(x).detach()  # the float layer make_layer quantized (same seed, same init)
    assert paths.relative_error(with_outliers, truth) < 0.5 * paths.relative_error(without, truth)


def test_bias_and_input_gradients_with_leading_dims(gen):
    layer = make_layer(6.0)
    layer.bias.requires_grad_(True)
    x = make_input(6, torch.float32, gen).reshape(2, 3, K).requires_grad_()
    g = torch.randn(2, 3, N, generator=gen)
    ours = paths.direct(layer, x, OP, g)
    ours_grads = paths.grads(x, layer.bias)
    reference = paths.jax_xla(layer, x, OP, g)
    reference_grads = paths.grads(x, layer.bias)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grads[1], g.sum((0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_trainable_weight_forward_and_gradients(threshold, gen):
    layer = make_layer(threshold, has_fp16_weights=True)
    x = make_input(5, torch.float32, gen).requires_grad_()
    g = torch.randn(5, N, generator=gen)
    ours = paths.direct(layer, x, OP, g)
    ours_grads = paths.grads(x, layer.weight, layer.bias)
    assert torch.equal(ours, paths.jax_kernel(layer, x, OP))
    reference = paths.jax_xla(layer, x, OP, g)
    reference_grads = paths.grads(x, layer.weight, layer.bias)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the weight gradient is the exact G^T X (not bitsandbytes' int8 estimate)
    torch.testing.assert_close(ours_grads[1], g.T @ x.detach(), rtol=1e-5, atol=1e-5)


def test_in_place_write_of_the_codes_is_seen(gen):
    layer = make_layer(0.0)
    x = make_input(3, torch.float32, gen, outliers=())
    before = paths.direct(layer, x, OP)
    with torch.no_grad():
        layer.weight.neg_()
    torch.testing.assert_close(paths.direct(layer, x, OP), 2 * layer.bias - before, rtol=1e-5, atol=1e-5)


def test_state_dict_is_unchanged_by_direct_calls(gen):
    layer = make_layer(6.0)
    paths.direct(layer, make_input(2, torch.float32, gen), OP)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    paths.direct(layer, make_input(4, torch.float32, gen), OP)
    after = layer.state_dict()
    assert before.keys() == after.keys() and {"weight", "SCB", "weight_format", "bias"} <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
