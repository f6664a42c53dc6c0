"""4-bit matmul speed on the GPU, per BENCHMARKS.md: ours vs bf16 (XLA and torch) vs bitsandbytes.

Each timed call applies the layer to L distinct weights (> 200 MB in total for every format,
bf16 included) inside one jitted function / CUDA graph; the median over repeats is divided
by L. The bf16 baseline is the faster of XLA ``x @ W.T`` and torch ``F.linear`` in a CUDA
graph, both in this process on the same weights.

Usage (GPU machine):
  python benchmarks/bench_4bit.py --out results.json [--budget-s 280] [--dtypes bfloat16,float16]
Tile tuning is benchmarks/tune_4bit_tiles.py (torch tensors, no JAX in the loop).
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from cuda_graph_timing import time_graph  # noqa: E402

from qflax.quant import fourbit  # noqa: E402
from qflax_kernels import fourbit_jax, fourbit_plan  # noqa: E402

SHAPES = ((8192, 8192), (4096, 14336), (4096, 4096), (14336, 4096), (8192, 28672))  # (K, N)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
MIN_BYTES = 256 * 2**20  # distinct weight bytes per timed call, every format


def time_jax(fn, *args, repeats=5, target_s=0.015):
    """Median seconds per call of a jitted fn (async dispatch keeps the GPU busy)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    reps = max(2, int(target_s / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_graph(lambda: dst.copy_(src))
    del src, dst
    return 2 * 2**30 / seconds


def versions():
    import triton

    out = dict(jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
               triton=triton.__version__, torch=torch.__version__, python=platform.python_version())
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception as err:  # recorded, not fatal: the peer is optional
        out["bitsandbytes"] = f"unavailable: {err}"
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        out["driver"] = None
    return out


def kernel_args(q):
    return dict(packed=q.packed, absmax=q.absmax, quant_map=q.quant_map, shape=q.shape, blocksize=q.blocksize,
                nested_absmax=q.nested_absmax, nested_quant_map=q.nested_quant_map, nested_offset=q.nested_offset)


def weight_bytes(q):
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(q))


class Layers:
    """L distinct random-normal weights of one shape, in bf16 (torch + JAX views) and NF4."""

    def __init__(self, k, n, dtype, nested_too=True):
        self.k, self.n = k, n
        per_4bit = n * k // 2 + n * k // 64 * 4
        self.count_4bit = max(4, math.ceil(MIN_BYTES / per_4bit))
        self.count_bf16 = max(2, math.ceil(MIN_BYTES / (n * k * 2)))
        gen = torch.Generator(device="cuda").manual_seed(k * 7 + n)
        count = max(self.count_4bit, self.count_bf16)
        self.torch_w = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for _ in range(self.count_bf16)]
        self.jax_w = [jax.dlpack.from_dlpack(w) for w in self.torch_w]
        quantize = jax.jit(lambda w, nested: fourbit.quantize_4bit(w, 64, "nf4", nested), static_argnums=1)
        sources = [self.jax_w[i % self.count_bf16] * (1 + i // self.count_bf16) for i in range(count)]
        self.q = [quantize(w, False) for w in sources[: self.count_4bit]]
        self.q_nested = [quantize(w, True) for w in sources[: self.count_4bit]] if nested_too else None
        self.bytes_4bit = weight_bytes(self.q[0])


def ours_fn(override=None):
    return jax.jit(lambda x, qs: [fourbit_jax.matmul_4bit(x, plan_override=override, **kernel_args(q)) for q in qs])


def xla_reference_fn():
    # The XLA path of matmul_4bit: dequantize into x's dtype, then one dot.
    return jax.jit(lambda x, qs: [jnp.dot(x, fourbit.dequantize_4bit(q).astype(x.dtype).T) for q in qs])


def xla_bf16_fn():
    return jax.jit(lambda x, ws: [jnp.dot(x, w.T) for w in ws])


def xla_gemm_kind(x, w):
    text = jax.jit(lambda x, w: jnp.dot(x, w.T)).lower(x, w).compile().as_text()
    for marker in ("__cublas$lt", "__cublas$gemm", "__triton_gemm", "triton"):
        if marker in text:
            return marker
    return "fusion"


def bnb_layers(layers, dtype):
    """bitsandbytes Linear4bit modules (NF4, blocksize 64, no double quant) on the same weights."""
    import bitsandbytes as bnb

    modules = []
    for i in range(layers.count_4bit):
        w = layers.torch_w[i % layers.count_bf16] * (1 + i // layers.count_bf16)
        lin = bnb.nn.Linear4bit(layers.k, layers.n, bias=False, compute_dtype=dtype, quant_type="nf4",
                                compress_statistics=False, device="meta")
        lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                                       compress_statistics=False).to("cuda")
        modules.append(lin)
    return modules


def bench_shape(k, n, rows, dtype_name, bandwidth, results, deadline):
    dtype = getattr(torch, dtype_name)
    layers = Layers(k, n, dtype)
    try:
        modules = bnb_layers(layers, dtype)
        bnb_error = None
    except Exception as err:  # bitsandbytes may not load on this card/driver: record why
        modules, bnb_error = None, repr(err)
    ours, reference, bf16 = ours_fn(), xla_reference_fn(), xla_bf16_fn()
    for m in rows:
        if time.time() > deadline:
            print(f"budget reached: skipped {k}x{n} M={m}", flush=True)
            results["skipped"].append(dict(K=k, N=n, M=m, dtype=dtype_name))
            continue
        try:
            x_torch = torch.randn(m, k, device="cuda", dtype=dtype)
            x = jax.dlpack.from_dlpack(x_torch)
            t_ours = time_jax(ours, x, layers.q) / layers.count_4bit
            t_ref = time_jax(reference, x, layers.q) / layers.count_4bit if m <= 1024 else None
            t_xla = time_jax(bf16, x, layers.jax_w) / layers.count_bf16
            t_torch = time_graph(lambda: [torch.nn.functional.linear(x_torch, w) for w in layers.torch_w])
            t_torch /= layers.count_bf16
            t_bnb = t_gemv = None
            if modules is not None and m <= 1024:
                with torch.no_grad():
                    t_bnb = time_graph(lambda: [lin(x_torch) for lin in modules]) / layers.count_4bit
                    if m == 1:
                        import bitsandbytes as bnb

                        states = [(lin.weight, lin.weight.quant_state) for lin in modules]
                        t_gemv = time_graph(lambda: [bnb.functional.gemv_4bit(x_torch, w.t(), state=s)
                                                     for w, s in states]) / layers.count_4bit
            baseline, t_base = ("xla_dot", t_xla) if t_xla < t_torch else ("torch_f_linear_cuda_graph", t_torch)
            plan = fourbit_plan.plan_matmul(m, n, k, 64, dtype_name, fourbit_jax._sm_count())
            row = dict(op="matmul_4bit", quant="nf4", blocksize=64, M=m, K=k, N=n, dtype=dtype_name,
                       ours_us=t_ours * 1e6, baseline=baseline, baseline_us=t_base * 1e6, ratio=t_base / t_ours,
                       path=f"triton:{plan.kernel}", plan=dataclasses.asdict(plan),
                       xla_bf16_us=t_xla * 1e6, torch_bf16_us=t_torch * 1e6,
                       xla_reference_4bit_us=None if t_ref is None else t_ref * 1e6,
                       ratio_vs_xla_reference=None if t_ref is None else t_ref / t_ours,
                       bnb_linear4bit_us=None if t_bnb is None else t_bnb * 1e6,
                       bnb_gemv_4bit_us=None if t_gemv is None else t_gemv * 1e6,
                       weight_bytes_4bit=layers.bytes_4bit,
                       bandwidth_fraction=layers.bytes_4bit / t_ours / bandwidth,
                       layers_4bit=layers.count_4bit, layers_bf16=layers.count_bf16, bnb_error=bnb_error)
            if m in (1, 16, 256) and layers.q_nested is not None:
                t_nested = time_jax(ours, x, layers.q_nested) / layers.count_4bit
                row["ours_double_quant_us"] = t_nested * 1e6
                row["double_quant_cost"] = t_nested / t_ours - 1
            results["rows"].append(row)
            print(f"{dtype_name} K={k:5d} N={n:5d} M={m:4d} ours {t_ours*1e6:8.1f}us  ref4 "
                  f"{(t_ref or 0)*1e6:8.1f}  xla {t_xla*1e6:8.1f}  torch {t_torch*1e6:8.1f}  bnb "
                  f"{(t_bnb or 0)*1e6:8.1f} gemv {(t_gemv or 0)*1e6:6.1f}  ratio {t_base/t_ours:5.2f} "
                  f"bw {row['bandwidth_fraction']:.2f} dq {row.get('double_quant_cost', float('nan')):+.3f}",
                  flush=True)
        except Exception as err:  # one failing point must not lose the run: record it
            print(f"K={k} N={n} M={m} failed: {type(err).__name__}: {err}", flush=True)
            results["errors"].append(dict(K=k, N=n, M=m, dtype=dtype_name, error=repr(err)[:500]))
    results["xla_gemm"][f"{k}x{n}"] = xla_gemm_kind(jnp.zeros((1, k), jnp.bfloat16), layers.jax_w[0])
    del layers, modules


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results JSON path")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,...")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--budget-s", type=float, default=280.0)
    parser.add_argument("--grid", default=None, help="KxN:m,m,...;KxN:... (overrides --shapes/--rows)")
    args = parser.parse_args()
    deadline = time.time() + args.budget_s
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = [int(v) for v in args.rows.split(",")]
    grid = [(shape, rows) for shape in shapes]
    if args.grid:
        grid = [(tuple(int(v) for v in part.split(":")[0].split("x")), [int(v) for v in part.split(":")[1].split(",")])
                for part in args.grid.split(";")]
    device = jax.devices()[0].device_kind
    results = dict(device=device, versions=versions(), date=datetime.date.today().isoformat(),
                   command=" ".join([os.path.basename(sys.executable)] + sys.argv), rows=[], skipped=[], errors=[],
                   xla_gemm={})
    results["plans"] = dict(mma_tiles=[list(r) for r in fourbit_plan.MMA_TILES],
                            float32_tile_table=[list(r) for r in fourbit_plan.TILE_TABLE])
    results["copy_bandwidth_GBps"] = copy_bandwidth() / 1e9
    print(f"{device}: copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s", flush=True)
    for dtype_name in args.dtypes.split(","):
        for (k, n), shape_rows in grid:
            bench_shape(k, n, shape_rows, dtype_name, results["copy_bandwidth_GBps"] * 1e9, results, deadline)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
