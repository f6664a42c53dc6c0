"""The per-shard programs of the kernels' partitioning rules, with the real Triton kernels (interpreter).

The partitioning rules (``qflax.ops.fourbit_partitioning``, ``int8_partitioning``) hand the SPMD
partitioner one function per kernel call (``forward_shard``, ``grad_shard``, ``llm_int8_shard``)
that every device runs on its shard. On CPU these cannot run inside a partitioned ``jit`` (the interpreter's host callback is lost
there, see tests/qflax/kernel_standins.py), so they run here under ``shard_map``, the same
program on the same shards, against the single-device XLA reference.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from qflax import ops
from qflax import sharding as qs
from qflax.ops import fourbit_partitioning, int8_partitioning
from qflax.quant import quantize_4bit, quantize_rows

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests run where no GPU is present (CI)")


def _mesh(*shape_names):
    shape, names = zip(*shape_names)
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def _close(got, want, rtol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()  # outputs are poisoned with NaN: every element was written
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def _weight_specs(q, spec):
    """in_specs of the weight arrays as partitioning passes them (offset as (1,))."""
    leaves = qs.quantized_partition_specs({"w": q}, [("w", spec)], _mesh((2, "tp")))["w"]
    return (leaves.packed, leaves.absmax, P()) + ((P(), P(), P()) if q.nested else ())


@pytest.mark.parametrize("spec,shape", [(P("tp", None), (256, 128)), (P(None, "tp"), (64, 256))],
                         ids=["column-nested-kept", "row-absmax-decoded"])
def test_4bit_shard_programs_match_one_device(spec, shape):
    mesh = _mesh((2, "tp"))
    n, k = shape
    w = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    # Column: each half is 128 rows x 2 blocks = 256 blocks (its own nested block); row: 2 x 64 blocks a row.
    q = qs.to_row_view(quantize_4bit(w, blocksize=64, compress_statistics=True))
    x = jax.random.normal(jax.random.key(1), (3, k), jnp.float32)
    g = jax.random.normal(jax.random.key(2), (3, n), jnp.float32)
    bias = jax.random.normal(jax.random.key(3), (n,), jnp.float32)
    out_axes, in_axes = (("tp",), ()) if spec == P("tp", None) else ((), ("tp",))
    static = fourbit_partitioning._static(q, True, "float32")
    arrays = fourbit_partitioning._weight_arrays(q)
    weight_specs = _weight_specs(q, spec)
    forward = jax.shard_map(functools.partial(fourbit_partitioning.forward_shard, static, out_axes, in_axes), mesh=mesh,
                            in_specs=(P(None, spec[1]), *weight_specs, P(spec[0])), out_specs=P(None, spec[0]))
    static_grad = fourbit_partitioning._static(q, False, "float32")
    grad = jax.shard_map(functools.partial(fourbit_partitioning.grad_shard, static_grad, out_axes, in_axes), mesh=mesh,
                         in_specs=(P(None, spec[0]), *weight_specs), out_specs=P(None, spec[1]))
    _close(jax.jit(forward)(x, *arrays, bias), ops.matmul_4bit(x, q, bias, backend="xla"), 1e-5)
    want_grad = jax.vjp(lambda x: ops.matmul_4bit(x, q, backend="xla"), x)[1](g)[0]
    _close(jax.jit(grad)(g, *arrays), want_grad, 1e-5)


@pytest.mark.parametrize("spec", [P("tp", None), P(None, "tp")], ids=["column", "row"])
def test_llm_int8_shard_program_with_outliers_and_split_rows(spec):
    mesh = _mesh((2, "dp"), (2, "tp"))
    w = quantize_rows(jax.random.normal(jax.random.key(0), (64, 128), jnp.float32))
    x = jax.random.normal(jax.random.key(1), (4, 128), jnp.float32).at[1, 5].set(30.0).at[2, 70].set(-25.0)
    bias = jax.random.normal(jax.random.key(2), (64,), jnp.float32)
    out_axes, in_axes = (("tp",), ()) if spec == P("tp", None) else ((), ("tp",))
    static = int8_partitioning._StaticInt8(6.0, True)
    shard = functools.partial(int8_partitioning.llm_int8_shard, static, ("dp",), in_axes)
    program = jax.shard_map(shard, mesh=mesh, in_specs=(P("dp", spec[1]), spec, P(spec[0]), P(spec[0])),
                            out_specs=P("dp", spec[0]))
    want = ops.matmul_8bit(x, w, bias, threshold=6.0, backend="xla")
    _close(jax.jit(program)(x, w.codes, w.scale, bias), want, 2e-5)
