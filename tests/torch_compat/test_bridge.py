"""The DLPack bridge: zero copy, non-contiguous inputs, bool/uint8, cache invalidation, JAX vjp in backward."""

import jax.numpy as jnp
import pytest
import torch

import torch_compat as tc
from torch_compat import bridge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.bool, torch.int8])
def test_round_trip_is_zero_copy_on_cpu(dtype):
    t = (torch.arange(64) % 3).to(dtype).reshape(8, 8)
    a = bridge.to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    back = bridge.to_torch(a)
    assert back.data_ptr() == t.data_ptr() and back.dtype == dtype and torch.equal(back, t)


def test_bool_and_uint8_values_survive_a_jax_computation():
    mask = torch.tensor([True, False, True, True])
    codes = torch.tensor([0, 7, 200, 255], dtype=torch.uint8)
    out = bridge.to_torch(jnp.where(bridge.to_jax(mask), bridge.to_jax(codes), jnp.uint8(1)))
    assert out.dtype == torch.uint8 and out.tolist() == [0, 1, 200, 255]


def test_int64_indices_are_narrowed_and_float64_refused():
    assert bridge.to_jax(torch.arange(5)).dtype == jnp.int32
    with pytest.raises(TypeError, match="float64"):
        bridge.to_jax(torch.zeros(2, dtype=torch.float64))


def test_non_contiguous_inputs(gen):
    layer = tc.nn.LinearNF4(64, 16).to("cpu")
    base = torch.randn(64, 10, generator=gen)
    x_t = base.T  # (10, 64), not contiguous
    assert not x_t.is_contiguous()
    torch.testing.assert_close(layer(x_t), layer(x_t.contiguous()), atol=0, rtol=0)
    x_slice = torch.randn(10, 128, generator=gen)[:, ::2]
    torch.testing.assert_close(layer(x_slice), layer(x_slice.contiguous()), atol=0, rtol=0)


def test_weight_changed_in_place_is_picked_up(gen):
    layer = tc.nn.StandardLinear(8, 4)
    x = torch.randn(2, 8, generator=gen)
    with torch.no_grad():
        layer.weight.mul_(2)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    # a frozen 4-bit weight: in-place load of other bytes (load_state_dict's copy_) is seen by the cache
    q = tc.nn.LinearNF4(64, 16, compress_statistics=False).to("cpu")
    x = torch.randn(2, 64, generator=gen)
    q(x)
    other = tc.nn.LinearNF4(64, 16, compress_statistics=False).to("cpu")
    with torch.no_grad():
        q.weight.copy_(other.weight)
        q.weight.quant_state.absmax.copy_(other.weight.quant_state.absmax)
        q.bias.copy_(other.bias)
    torch.testing.assert_close(q(x), other(x), atol=0, rtol=0)
    # int8: an in-place change of the codes is seen
    i8 = tc.nn.Linear8bitLt(64, 16, has_fp16_weights=False).to("cpu")
    before = i8(x)
    with torch.no_grad():
        i8.weight.neg_()
    torch.testing.assert_close(i8(x), 2 * i8.bias - before, atol=1e-5, rtol=1e-5)


def test_weight_cache_converts_once(gen, monkeypatch):
    layer = tc.nn.LinearNF4(64, 16).to("cpu")
    calls = []
    original = type(layer.weight.quant_state).to_packed4bit

    def counting(self, packed):
        calls.append(1)
        return original(self, packed)

    monkeypatch.setattr(type(layer.weight.quant_state), "to_packed4bit", counting)
    x = torch.randn(1, 64, generator=gen)
    for _ in range(3):
        layer(x)
    assert len(calls) == 1


def test_one_jax_op_per_configuration():
    from torch_compat import forwards

    assert bridge.jax_op(forwards.linear_4bit, compute_dtype=None) is bridge.jax_op(forwards.linear_4bit,
                                                                                      compute_dtype=None)
    assert bridge.jax_op(forwards.linear_4bit, compute_dtype="bfloat16") is not bridge.jax_op(
        forwards.linear_4bit, compute_dtype=None)


def test_backward_runs_the_jax_vjp(gen):
    layer = tc.nn.StandardLinear(16, 8)
    ref = torch.nn.Linear(16, 8)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 16, generator=gen)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(3, 4, 8, generator=gen)
    layer(x1).backward(g)
    ref(x2).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)


def test_no_autograd_node_without_grad(gen):
    layer = tc.nn.LinearNF4(64, 16).to("cpu")
    layer.bias.requires_grad_(False)
    y = layer(torch.randn(2, 64, generator=gen))
    assert y.grad_fn is None
    with torch.no_grad():
        layer.bias.requires_grad_(True)
        assert layer(torch.randn(2, 64, generator=gen)).grad_fn is None


@pytest.mark.parametrize("preset", [None, "true"])
def test_preallocation_off_unless_the_user_set_it(preset):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    if preset is not None:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = preset
    code = "import os, torch_compat; print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (preset or "false")


@pytest.mark.gpu
def test_cuda_tensors_stay_on_the_gpu():
    layer = tc.nn.LinearNF4(64, 32).to("cuda")
    x = torch.randn(4, 64, device="cuda", requires_grad=True)
    y = layer(x)
    assert y.device.type == "cuda"
    y.sum().backward()
    assert x.grad.device.type == "cuda"
    a = bridge.to_jax(x.detach())
    assert a.unsafe_buffer_pointer() == x.data_ptr()
    w = tc.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(y, x @ w.T + layer.bias, atol=1e-4, rtol=1e-4)
