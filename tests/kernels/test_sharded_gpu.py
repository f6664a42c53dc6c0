"""The kernels' partitioning rules on real GPUs (2 or more): tensor-parallel NF4 and LLM.int8 with the Triton kernels.

Run on a multi-GPU machine: ``pytest -m gpu tests/kernels/test_sharded_gpu.py``. Each compiled
program must launch the kernels on shards (the custom calls' operands have the shard shapes),
gather nothing, and agree with one GPU's XLA path.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qflax import ops
from qflax import sharding as qs
from qflax.quant import quantize_4bit, quantize_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 or more GPUs")]

M, K, H = 16, 4096, 8192


def _mlp(matmul):
    def apply(x, up, down):
        return matmul(jax.nn.silu(matmul(x, up)), down)

    return apply


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_megatron_mlp_runs_the_kernels_on_shards(kind):
    devices = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w_up = jax.random.normal(k1, (H, K), jnp.float32) * 0.02
    w_down = jax.random.normal(k2, (K, H), jnp.float32) * 0.02
    x = jax.random.normal(k3, (M, K), jnp.float32).astype(jnp.bfloat16)
    if kind == "nf4":
        weights = {n: qs.to_row_view(quantize_4bit(w, 64, "nf4", True)) for n, w in (("up", w_up), ("down", w_down))}
        matmul = lambda backend: lambda x, w: ops.matmul_4bit(x, w, backend=backend)  # noqa: E731
    else:
        weights = {n: quantize_rows(w) for n, w in (("up", w_up), ("down", w_down))}
        matmul = lambda backend: lambda x, w: ops.matmul_8bit(x, w, threshold=6.0, backend=backend)  # noqa: E731
    want = jax.jit(_mlp(matmul("xla")))(x, weights["up"], weights["down"])
    shardings = qs.quantized_shardings(weights, [("up", P("tp", None)), ("down", P(None, "tp"))], mesh)
    placed = jax.device_put(weights, shardings)
    xs = jax.device_put(x, NamedSharding(mesh, P()))
    compiled = jax.jit(_mlp(matmul("triton"))).lower(xs, placed["up"], placed["down"]).compile()
    got = compiled(xs, placed["up"], placed["down"])
    text = compiled.as_text()
    assert "all-gather" not in text and "triton" in text  # the kernels' custom calls, not XLA's dot
    assert len(re.findall(r"all-reduce(?:-start)?\(", text)) >= 1  # the down projection's psum
    # The partitioned program only ever holds shards: no array of a whole weight's shape.
    whole = [f"u8[{H},{K // 2}]", f"u8[{H * K // 2}]", f"u8[{K},{H // 2}]"] if kind == "nf4" else [f"s8[{H},{K}]",
                                                                                                     f"s8[{K},{H}]"]
    assert not [shape for shape in whole if shape in text], devices
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=5e-2,
                               atol=5e-2 * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
