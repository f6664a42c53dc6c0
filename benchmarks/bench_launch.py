"""Per-call launch cost inside one jit (BENCHMARKS.md §Method 8): each op chained L times, µs per call.

``y = op(y)`` is applied L = 224 times (the linears of the Llama-3-8B-shaped stack) in one jitted
function on a 256x256 layer with one row of bfloat16, so each call's own work is tiny and the
cost measured is the launch: what XLA does around the kernel, and whether its command buffers
capture it. Baselines in the same process: an XLA elementwise op (an optimization barrier between
calls keeps them apart), a Pallas kernel on the Triton backend, a bare jax-triton ``triton_call``
(legacy custom call) when jax-triton is installed, and the same trivial kernel through qflax's
``triton_call`` primitive on both of its custom-call targets. The kernels launched per call (from
a profiler trace) are recorded next to each figure.

Usage (GPU machine):
  python benchmarks/bench_launch.py [--out PATH] [--chain 224]
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python benchmarks/bench_launch.py --tag no-command-buffers
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import bench_env  # noqa: E402
from qflax import ops  # noqa: E402
from qflax.quant import fourbit  # noqa: E402
from qflax.quant import int8 as int8_quant  # noqa: E402
from qflax_kernels import triton_call as qtc  # noqa: E402
from qflax_kernels.launch import Output, make_launch  # noqa: E402

DIM = 256


@triton.jit
def scale_kernel(x_ptr, out_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, (x.to(tl.float32) * 1.0001 + 0.5).to(out_ptr.dtype.element_ty), mask=mask)


def chained(op, chain):
    def run(y, *weights):
        for _ in range(chain):
            y = op(y, *weights)
        return y

    return jax.jit(run)


def baselines():
    """(name, op, weights) of the reference launch paths."""
    def xla(y):
        return jax.lax.optimization_barrier(y * jnp.bfloat16(1.0001) + jnp.bfloat16(0.5))

    spec = make_launch(scale_kernel, (1,), num_warps=4, num_stages=1, constexprs=dict(N=DIM, BLOCK=DIM),
                       outputs=(Output((1, DIM), "bfloat16"),), name="bench_scale")
    rows = [("xla_elementwise", xla, ())]
    for target in ("ffi", "legacy", "xla"):
        rows.append((f"qflax_triton_call_{target}", ("target", target, lambda y: qtc.triton_call(spec, y)[0]), ()))
    try:
        cache_dir = os.environ.get("TRITON_CACHE_DIR")
        import jax_triton as jt

        # jax-triton blanks TRITON_CACHE_DIR on import, which breaks triton.compile's cache.
        if cache_dir is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = cache_dir

        rows.append(("jax_triton_triton_call", lambda y: jt.triton_call(
            y, kernel=scale_kernel, out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype), grid=(1,), N=DIM, BLOCK=DIM), ()))
    except Exception as err:  # noqa: BLE001 - an optional peer
        print(f"jax-triton unavailable: {err!r}", flush=True)
    try:
        from jax.experimental import pallas as pl

        def pallas_kernel(x_ref, o_ref):
            o_ref[...] = (x_ref[...].astype(jnp.float32) * 1.0001 + 0.5).astype(o_ref.dtype)

        params = _pallas_triton_params()
        rows.append(("pallas_triton", lambda y: pl.pallas_call(
            pallas_kernel, out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype), compiler_params=params)(y), ()))
    except Exception as err:  # noqa: BLE001 - an optional peer
        print(f"pallas unavailable: {err!r}", flush=True)
    return rows


def _pallas_triton_params():
    try:
        from jax.experimental.pallas import triton as plt

        return plt.CompilerParams(num_warps=4, num_stages=1)
    except (ImportError, AttributeError):
        from jax.experimental.pallas import gpu as plgpu

        return plgpu.TritonCompilerParams(num_warps=4, num_stages=1)


def qflax_ops(key):
    """(name, op, weights) of the qflax ops on a DIM x DIM layer."""
    w = jax.random.normal(key, (DIM, DIM), jnp.float32) * 0.05
    rows = []
    for name, nested, quant in (("matmul_4bit_nf4", False, "nf4"), ("matmul_4bit_nf4_dq", True, "nf4"),
                                ("matmul_4bit_fp4", False, "fp4")):
        q = fourbit.quantize_4bit(w, 64, quant, nested)
        rows.append((name, lambda y, q: ops.matmul_4bit(y, q), (q,)))
        # The same op with XLA compiling the kernel's Triton IR itself (custom call __gpu$xla.gpu.triton).
        rows.append((f"{name}[xla_triton]", ("target", "xla", lambda y, q: ops.matmul_4bit(y, q)), (q,)))
    rows.append(("matmul_4bit_nf4_xla", lambda y, q: ops.matmul_4bit(y, q, backend="xla"),
                 (fourbit.quantize_4bit(w, 64, "nf4", False),)))
    w8 = int8_quant.quantize_rows(w)
    for threshold in (0.0, 6.0):
        rows.append((f"matmul_8bit_t{threshold:g}", lambda y, w8, t=threshold: ops.matmul_8bit(y, w8, threshold=t),
                     (w8,)))
    rows.append(("matmul_8bit_t0[xla_triton]", ("target", "xla", lambda y, w8: ops.matmul_8bit(y, w8)), (w8,)))
    wb = w.astype(jnp.bfloat16)
    for variant in ("global", "vectorwise"):
        rows.append((f"switchback_{variant}", lambda y, wb, v=variant: ops.switchback_matmul(y, wb, variant=v), (wb,)))
    from qflax.quant import switchback as sb

    codes, scale = sb.quantize_global(wb)
    rows.append(("switchback_global_prepared",
                 lambda y, c, s: ops.switchback_matmul_prepared(y, c, s, variant="global"), (codes, scale)))
    return rows


def measure(name, op, weights, y, chain):
    if isinstance(op, tuple):  # ("target", which, fn): lower with that custom-call target
        _, target, op = op
        os.environ[qtc.CUSTOM_CALL_ENV] = target
    else:
        os.environ.pop(qtc.CUSTOM_CALL_ENV, None)
    fn = chained(op, chain)
    seconds = bench_env.time_jax(fn, y, *weights, target_s=0.1)
    prof = bench_env.device_time_per_call(fn, y, *weights, calls=2)
    os.environ.pop(qtc.CUSTOM_CALL_ENV, None)
    return dict(op=name, quant=name, M=1, K=DIM, N=DIM, dtype="bfloat16", chain=chain,
                ours_us=seconds * 1e6 / chain, step_us=seconds * 1e6,
                kernels_per_call=(prof.get("kernels") or 0) / chain,
                device_us_per_call=(prof.get("device_us") or 0) / chain, top_kernels=prof.get("top"))


def path_of(name: str) -> str:
    """The path the op of row ``name`` took when it was traced."""
    for prefix, op_name in (("matmul_4bit", "matmul_4bit"), ("matmul_8bit", "matmul_8bit"),
                            ("switchback_global_prepared", "switchback_matmul_prepared"),
                            ("switchback", "switchback_matmul")):
        if name.startswith(prefix):
            return ops.last_path(op_name) or "?"
    return "xla" if name.startswith("xla") else "triton"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", type=int, default=224)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = bench_env.results_header()
    results["tag"] = args.tag
    path = args.out or bench_env.results_path("launch" + (f"_{args.tag}" if args.tag else ""))
    y = jax.random.normal(jax.random.key(0), (1, DIM), jnp.float32).astype(jnp.bfloat16)
    rows = baselines() + qflax_ops(jax.random.key(1))
    for name, op, weights in rows:
        try:
            row = measure(name, op, weights, y, args.chain)
        except Exception as err:  # noqa: BLE001 - recorded, the other rows still run
            results.setdefault("errors", []).append(dict(op=name, error=repr(err)[:1500]))
            print(f"{name}: FAILED {err!r}"[:1500], flush=True)
            continue
        row["path"] = path_of(name)
        results["rows"].append(row)
        bench_env.save_results(results, path)
        print(f"{name:30s} {row['ours_us']:7.2f} us/call  kernels/call {row['kernels_per_call']:.2f}  "
              f"device {row['device_us_per_call']:.2f} us/call", flush=True)
    xla = next((r["ours_us"] for r in results["rows"] if r["op"] == "xla_elementwise"), None)
    for row in results["rows"]:
        row["baseline"], row["baseline_us"] = "xla_elementwise", xla
        row["ratio"] = (xla / row["ours_us"]) if xla else None
    bench_env.save_results(results, path)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
