"""Sharded quantized models on 8 CPU devices: Linen and NNX tensor parallelism, QLoRA training, shard_map.

Each test builds a float model with sharding annotations (or rules), quantizes it, places the
variables with ``qflax.sharding`` and compares with the same computation on one device; the
compiled programs never all-gather a quantized (uint8/int8) array.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qflax import linen as qnn
from qflax import nnx as qnnx
from qflax import ops
from qflax import sharding as qs

# Every Dense kernel to LLM.int8 rows (the default rules quantize them to NF4).
INT8 = qnn.Rule("*", layers="dense", format="8bit")
M, K, H = 4, 256, 256  # x (M, K) -> up (K -> H), column-parallel -> down (H -> K), row-parallel


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "tp"))


def x_data(dtype=jnp.float32):
    return jax.random.normal(jax.random.key(7), (M, K), jnp.float32).astype(dtype)


def gathers(compiled) -> list[str]:
    """Result types of the all-gathers of a compiled program that gather quantized (integer) arrays."""
    found = re.findall(r"= (\S+) all-gather(?:-start)?\(", compiled.as_text())
    return [shape for shape in found if shape.startswith(("u8", "s8"))]


def check_reductions(compiled, int8: bool) -> None:
    """The forward's all-reduces: the down layer's psum of its (M / dp, K) output and, for LLM.int8,
    per-row statistics of the activations over the devices (rows are quantized whole: their absmax,
    and whether they hold a non-finite value)."""
    reduced = re.findall(r"= \w+(\[[\d,]*\])\S* all-reduce(?:-start)?\(", compiled.as_text())
    assert reduced.count(f"[{M // 2},{K}]") == 1, reduced
    rows = [shape for shape in reduced if shape != f"[{M // 2},{K}]"]
    assert rows == [f"[{M // 2}]"] * len(rows) and (len(rows) >= 1) == int8, reduced


def close(got, want, rtol=2e-5):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


class FloatMLP(nn.Module):
    """Megatron annotations: the up kernel (in, out) split on out, the down kernel on in."""

    @nn.compact
    def __call__(self, x):
        up = nn.Dense(H, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "tp")),
                      bias_init=nn.with_partitioning(nn.initializers.normal(), ("tp",)), name="up")
        return nn.Dense(K, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("tp", None)),
                        name="down")(jax.nn.relu(up(x)))


class QuantMLP(nn.Module):
    dense: type = qnn.DenseNF4

    @nn.compact
    def __call__(self, x):
        return self.dense(K, name="down")(jax.nn.relu(self.dense(H, name="up")(x)))


def test_linen_tensor_parallel_nf4_and_int8_from_annotations(mesh):
    annotated = FloatMLP().init(jax.random.key(0), x_data())["params"]
    rules = qs.rules_from_annotations(annotated)
    float_params = nn.meta.unbox(annotated)
    x = x_data()
    for dense, variables in ((qnn.DenseNF4, qs.to_row_view(qnn.quantize_params(float_params))),
                             (qnn.Dense8bitLt, qnn.quantize_params(float_params, INT8))):
        apply = jax.jit(QuantMLP(dense).apply)
        want = apply(variables, x)
        shardings = qs.quantized_shardings(variables, rules, mesh)
        placed = jax.device_put(variables, shardings)
        compiled = apply.lower(placed, jax.device_put(x, NamedSharding(mesh, P("dp")))).compile()
        close(compiled(placed, jax.device_put(x, NamedSharding(mesh, P("dp")))), want)
        assert gathers(compiled) == []
        check_reductions(compiled, int8=dense is qnn.Dense8bitLt)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(K, H, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "tp")),
                             rngs=rngs)
        self.down = nnx.Linear(H, K, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("tp", None)),
                               rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


@pytest.mark.parametrize("rule", [qnnx.Rule("*", layers="dense"), INT8], ids=["nf4", "int8"])
def test_nnx_tensor_parallel_from_annotations(mesh, rule):
    with jax.set_mesh(mesh):
        annotated, model = NNXMLP(nnx.Rngs(0)), NNXMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(qnnx.quantize_model(model, rule))
    state = jax.device_get(qs.to_row_view(state))

    @jax.jit
    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    x = x_data()
    want = apply(state, x)
    placed = jax.device_put(state, qs.quantized_shardings(state, annotated, mesh))
    up = placed["up"]["weight"].get_value()
    int8 = rule is INT8
    assert isinstance(model.up, qnnx.Dense8bitLt if int8 else qnnx.DenseNF4)
    assert (up.codes if int8 else up.packed).sharding.spec == P("tp")
    x_placed = jax.device_put(x, NamedSharding(mesh, P("dp")))
    compiled = apply.lower(placed, x_placed).compile()
    close(compiled(placed, x_placed), want)
    assert gathers(compiled) == []
    check_reductions(compiled, int8=int8)


class LoRAMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        lora = functools.partial(qnn.LoRADense4bit, lora_rank=4, lora_alpha=8.0)
        return lora(K, name="down")(jax.nn.relu(lora(H, name="up")(x)))


@pytest.mark.parametrize("adapters", ["sharded", "replicated"])
def test_qlora_step_with_sharded_nf4_base_matches_one_device(mesh, adapters):
    model, x = LoRAMLP(), x_data()
    variables = LoRAMLP().init(jax.random.key(0), x)
    # lora_b starts at zero: perturb it so the adapters' gradients and the update are not trivial.
    params = jax.tree.map(lambda p: p + 0.01, variables["params"])
    quantized = qs.to_row_view(variables["quantized"])
    target = jax.random.normal(jax.random.key(1), (M, K))
    tx = optax.adam(1e-2)

    def step(params, opt_state, quantized, x, target):
        def loss(params):
            y = model.apply({"params": params, "quantized": quantized}, x)
            return jnp.mean((y - target) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes float and int32
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    want = jax.jit(step)(params, tx.init(params), quantized, x, target)
    rules = [("up/weight", P("tp", None)), ("up/bias", P("tp")), ("down/weight", P(None, "tp"))]
    if adapters == "sharded":  # each adapter split like the features it touches
        rules += [("up/lora_b", P(None, "tp")), ("down/lora_a", P("tp", None))]
    p_shard = qs.quantized_shardings(params, rules, mesh)
    q_shard = qs.quantized_shardings(quantized, rules, mesh)
    params_d, quantized_d = jax.device_put(params, p_shard), jax.device_put(quantized, q_shard)
    # The same rules place Adam's state: "0/mu/up/lora_b" matches "up/lora_b"; the step count is replicated.
    state_shard = qs.quantized_shardings(jax.eval_shape(tx.init, params), rules, mesh)
    opt_state = jax.jit(tx.init, out_shardings=state_shard)(params_d)
    batch = NamedSharding(mesh, P("dp"))
    args = (params_d, opt_state, quantized_d, jax.device_put(x, batch), jax.device_put(target, batch))
    # The user's choice of shardings holds across steps: the step returns params and state as they came.
    compiled = jax.jit(step, out_shardings=(p_shard, state_shard, None), donate_argnums=(0, 1)).lower(*args).compile()
    new_params, new_state, value = compiled(*args)
    close(value, want[2], rtol=1e-5)
    for got, expected in zip(jax.tree.leaves(new_params), jax.tree.leaves(want[0])):
        close(got, expected, rtol=1e-4)
    assert gathers(compiled) == []
    lora_b = new_params["up"]["lora_b"]
    assert lora_b.sharding.spec == (P(None, "tp") if adapters == "sharded" else P())
    assert new_state[0].mu["up"]["lora_b"].sharding.spec == lora_b.sharding.spec  # Adam's moments follow


def test_shard_map_helpers_match_one_device(mesh):
    float_params = nn.meta.unbox(FloatMLP().init(jax.random.key(0), x_data())["params"])
    nf4 = qs.to_row_view(qnn.quantize_params(float_params))["quantized"]
    int8 = qnn.quantize_params(float_params, INT8)["quantized"]
    bias, out_bias = float_params["up"]["bias"], float_params["down"]["bias"]
    rules = [("up/weight", P("tp", None)), ("down/weight", P(None, "tp"))]
    x, ids = x_data(), jnp.array([[0, 3, 255], [9, 128, 256]])
    specs4, specs8 = qs.quantized_partition_specs(nf4, rules, mesh), qs.quantized_partition_specs(int8, rules, mesh)

    def local(x, ids, nf4, int8, bias, out_bias):
        h = jax.nn.relu(qs.matmul_4bit_local(x, nf4["up"]["weight"], P("tp", None), bias))
        y4 = qs.matmul_4bit_local(h, nf4["down"]["weight"], P(None, "tp"), out_bias)
        # up: no threshold (the op itself on its shard); down: outliers and the rows split over "dp".
        h8 = jax.nn.relu(qs.matmul_8bit_local(x, int8["up"]["weight"], P("tp", None), bias))
        y8 = qs.matmul_8bit_local(h8, int8["down"]["weight"], P(None, "tp"), out_bias, threshold=2.0,
                                  batch_axes="dp")
        e4 = qs.embed_4bit_local(ids, nf4["up"]["weight"], P("tp", None))
        e8 = qs.embed_8bit_local(ids, int8["up"]["weight"], P("tp", None))
        return y4, y8, e4, e8

    def single(x, ids, nf4, int8, bias, out_bias):
        h = jax.nn.relu(ops.matmul_4bit(x, nf4["up"]["weight"], bias))
        y8 = ops.matmul_8bit(jax.nn.relu(ops.matmul_8bit(x, int8["up"]["weight"], bias)),
                             int8["down"]["weight"], out_bias, threshold=2.0)
        return (ops.matmul_4bit(h, nf4["down"]["weight"], out_bias), y8, ops.embed_4bit(ids, nf4["up"]["weight"]),
                ops.embed_8bit(ids, int8["up"]["weight"]))

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("dp"), P(), specs4, specs8, P("tp"), P()),
                                    out_specs=(P("dp"), P("dp"), P(), P())))
    args = (nf4, int8, bias, out_bias)
    got, want = sharded(x, ids, *args), jax.jit(single)(x, ids, *args)
    for g, w in zip(got, want):
        close(g, w, rtol=1e-5) if np.isfinite(np.asarray(w)).all() else np.testing.assert_array_equal(
            np.isnan(np.asarray(g)), np.isnan(np.asarray(w)))
    assert np.isnan(np.asarray(got[2])[1, 2]).all() and np.isfinite(np.asarray(got[2])[0]).all()
    # Differentiable through the helpers (input gradient of both products).
    def loss(fn):
        return lambda x, ids: sum(jnp.sum(y ** 2) for y in fn(x, ids, *args)[:2])

    close(jax.jit(jax.grad(loss(sharded)))(x, ids), jax.jit(jax.grad(loss(single)))(x, ids), rtol=1e-4)
