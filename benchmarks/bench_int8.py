"""int8 kernels vs bf16 on one GPU (BENCHMARKS.md): GEMM with dequant epilogue, LLM.int8, SwitchBack fwd+bwd.

Usage (GPU machine)::

    python benchmarks/bench_int8.py --out benchmarks/results [--parts gemm,llm,switchback,bnb] [--sweep]

Method: each timed call is one jitted function applying the layer to L distinct weights (L
chosen so the int8 weights of one call total >= 256 MB), calls issued back to back; the median
over repeats divided by L is the per-layer time. The bf16 baseline is the faster of XLA's dot and torch's ``F.linear``
replayed from a CUDA graph, both measured here on the same shapes; bitsandbytes 0.49.2
``Linear8bitLt`` is timed on the same card (CUDA graph where it can be captured, else eager
with CUDA events). Writes ``<out>/int8-<device>-<date>.json`` with one row per measurement.
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bench_env
import qflax.ops as ops
from qflax.ops import int8_kernels
from qflax.quant import int8 as int8_ref
from qflax_kernels import int8_launch

MB = 1 << 20
CACHE_DEFEAT_BYTES = 256 * MB


def layers_for(bytes_per_weight: int) -> int:
    return max(2, math.ceil(CACHE_DEFEAT_BYTES / bytes_per_weight))


def time_jax(fn, *args, reps=5):
    """Median seconds per call of ``fn(*args)``, calls issued back to back (``bench_env.time_jax``).

    Until 2026-12-02 this file synchronized after every call instead: at M = 2048 on the H200
    its wall times were 40-60 us per layer above the device time (XLA's bf16 dot too), a wait a
    model's step does not pay per layer.
    """
    return bench_env.time_jax(fn, *args, repeats=reps)


def time_torch(step, reps=10, graph=True):
    """Median time (s) of ``step()`` on the GPU, replayed from a CUDA graph when it can be captured."""
    import torch

    step()
    torch.cuda.synchronize()
    g = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
        except Exception as e:  # noqa: BLE001 - data-dependent code cannot be captured
            print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:80]}; timing eagerly)")
            g = None
            torch.cuda.synchronize()
    run = g.replay if g is not None else step
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), g is not None


def xla_gemm_kind(fn, *args) -> str:
    """Which GEMM implementation XLA picked (custom-call targets / fusion kinds in the compiled HLO)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    found = sorted(set(re.findall(r'custom_call_target="([^"]*(?:gemm|matmul|cublas)[^"]*)"', text)))
    if "__triton_gemm" in text or 'kind":"__triton_gemm' in text:
        found.append("triton_gemm fusion")
    return ",".join(found) or "unknown"


def torch_dtype(name):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def to_torch(a):
    import torch

    return torch.from_dlpack(a) if not isinstance(a, torch.Tensor) else a


class Results:
    """Rows so far; rewritten to the JSON file after every row, so a cut-off run still leaves its data."""

    def __init__(self, path, header):
        self.rows = []
        self.path = path
        self.header = header

    def save(self):
        with open(self.path, "w") as f:
            json.dump(dict(self.header, rows=self.rows), f, indent=1)

    def add(self, op, quant, M, K, N, dtype, ours_s, baselines: dict, path, **extra):
        base_name, base_s = min(baselines.items(), key=lambda kv: kv[1])
        row = dict(op=op, quant=quant, M=M, K=K, N=N, dtype=dtype, ours_us=round(ours_s * 1e6, 2),
                   baseline=base_name, baseline_us=round(base_s * 1e6, 2), ratio=round(base_s / ours_s, 3),
                   path=path, **{f"{k}_us": round(v * 1e6, 2) for k, v in baselines.items()}, **extra)
        self.rows.append(row)
        print(f"{op:28s} {quant:22s} M={M:6d} K={K:6d} N={N:6d} {dtype:8s} ours {row['ours_us']:10.1f} us  "
              f"{base_name} {row['baseline_us']:10.1f} us  ratio {row['ratio']:.3f}  [{path}]", flush=True)
        self.save()
        return row


def bf16_baselines(M, K, N, dtype, L, with_torch=True):
    """Per-layer times of ``x @ W.T`` in XLA and torch (CUDA graph) over L weights."""
    x = jax.random.normal(jax.random.PRNGKey(0), (M, K), jnp.float32).astype(dtype)
    ws = [jax.random.normal(jax.random.PRNGKey(i + 1), (N, K), jnp.float32).astype(dtype) for i in range(L)]
    f = jax.jit(lambda x, ws: [x @ w.T for w in ws])
    out = {"xla_dot": time_jax(f, x, ws) / L}
    kind = xla_gemm_kind(lambda x, w: x @ w.T, x, ws[0])
    if with_torch:
        import torch
        import torch.nn.functional as F

        tx = to_torch(x)
        tws = [to_torch(w) for w in ws]
        outs = [None] * L

        def step():
            for i, w in enumerate(tws):
                outs[i] = F.linear(tx, w)

        out["torch_linear_graph"] = time_torch(step)[0] / L
        del tx, tws, outs
    return out, kind


# ------------------------------------------------------------------------------------------
# 1. int8 GEMM with dequant epilogue


# Run 1 on the H100 (2026-11-25) tried 128x256x128 w8 s3/s4, 256x128x128 w8 s3, 128x128x128 w4/w8 s4,
# 128x256x64 and 256x128x64 w8 s4: 128x256x128 w8 s4 was fastest at 8192^3 and 4096^3 (default now).
# The H200 sweep adds shallower pipelines, wider groups, and tiles small enough for two programs
# per SM (one program's epilogue then overlaps the other's main loop).
GEMM_SWEEP = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=16, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=256, GROUP_M=8, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=6),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3),
]


def bench_gemm(res: Results, sizes, sweep: bool, dtype="bfloat16"):
    for M, N, K in sizes:
        L = layers_for(N * K)
        key = jax.random.PRNGKey(M + N + K)
        a = jax.random.randint(key, (M, K), -127, 128, jnp.int32).astype(jnp.int8)
        sa = jax.random.uniform(key, (M,), jnp.float32, 0.5, 4.0)
        ws = [jax.random.randint(jax.random.PRNGKey(i), (N, K), -127, 128, jnp.int32).astype(jnp.int8) for i in range(L)]
        sws = [jax.random.uniform(jax.random.PRNGKey(100 + i), (N,), jnp.float32, 0.5, 4.0) for i in range(L)]
        base, kind = bf16_baselines(M, K, N, dtype, L)
        f_xla8 = jax.jit(lambda a, sa, ws, sws: [
            int8_ref.int8_mm_dequant(int8_ref.int8_linear_matmul(a, w), sa, sw).astype(dtype) for w, sw in zip(ws, sws)])
        xla_int8 = time_jax(f_xla8, a, sa, ws, sws) / L
        configs = GEMM_SWEEP if sweep else [None]
        best = None
        for cfg in configs:
            f = jax.jit(lambda a, sa, ws, sws, cfg=cfg: [
                int8_launch.int8_matmul_dequant(a, w, sa, sw, out_dtype=dtype, config=cfg) for w, sw in zip(ws, sws)])
            try:
                t = time_jax(f, a, sa, ws, sws) / L
            except Exception as e:  # noqa: BLE001 - a config may not fit shared memory
                print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            if sweep:
                print(f"  sweep M={M} N={N} K={K} {cfg}: {t * 1e6:.1f} us  {2 * M * N * K / t / 1e12:.0f} TOP/s")
            if best is None or t < best[0]:
                best = (t, cfg)
        t, cfg = best
        # Check the timed kernel against XLA's exact int32 product once.
        got = int8_launch.int8_matmul_dequant(a, ws[0], sa, sws[0], out_dtype=jnp.float32, config=cfg)
        ref = int8_ref.int8_mm_dequant(int8_ref.int8_linear_matmul(a, ws[0]), sa, sws[0])
        err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
        res.add("int8_gemm_dequant", "int8 row x col scales", M, K, N, dtype, t, base, "triton",
                layers=L, xla_int8_dot_us=round(xla_int8 * 1e6, 2), ratio_vs_xla_int8=round(xla_int8 / t, 3),
                tops=round(2 * M * N * K / t / 1e12, 1), xla_bf16_gemm=kind, config=cfg or "default",
                max_rel_err_vs_xla=err)


# ------------------------------------------------------------------------------------------
# 2. LLM.int8 (Dense8bitLt forward) with threshold 6.0 and 0


def planted_activations(M, K, dtype, n_outlier_cols=8, seed=0):
    """Random normal activations with a few systematic outlier feature columns (|x| ~ 8), as in LLMs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    cols = rng.choice(K, n_outlier_cols, replace=False)
    x[:, cols] += 8.0 * np.sign(x[:, cols])
    return jnp.asarray(x).astype(dtype), cols


def llm_int8_fn(threshold):
    if hasattr(ops, "matmul_8bit"):
        return (lambda x, w, b: ops.matmul_8bit(x, w, b, threshold=threshold, backend="triton")), "qflax.ops.matmul_8bit"
    return (lambda x, w, b: int8_kernels.run_llm_int8(x, w.codes, w.scale, b, threshold)), "int8_kernels.run_llm_int8"


def bench_llm_int8(res: Results, shapes, dtypes, bnb: bool, batch_sizes=(2048, 4096)):
    for (K, N) in shapes:
        L = layers_for(N * K)
        wqs = [int8_ref.quantize_rows(jax.random.normal(jax.random.PRNGKey(i), (N, K), jnp.float32) * 0.02)
               for i in range(L)]
        for M in batch_sizes:
            for dtype in dtypes:
                # One input per layer (as in a model): identical inputs would let XLA merge the L
                # activation quantizations (custom calls without side effects are CSE'd).
                xs = [planted_activations(M, K, dtype, seed=i)[0] for i in range(L)]
                x, cols = planted_activations(M, K, dtype)
                base, kind = bf16_baselines(M, K, N, dtype, L)
                breakdown = {}
                if dtype == "bfloat16":
                    # Where the time goes: the row quantizer alone and the GEMM alone (pre-quantized x).
                    fq = jax.jit(lambda xs: [int8_launch.quantize_rowwise(xi, llm_int8_scale=True) for xi in xs])
                    breakdown["row_quantizer_us"] = round(time_jax(fq, xs) / L * 1e6, 2)
                    codes, absmax = int8_launch.quantize_rowwise(x, llm_int8_scale=True)
                    fg = jax.jit(lambda c, a, ws: [int8_launch.int8_matmul_dequant(c, w.codes, a, w.scale,
                                                                                   out_dtype=dtype) for w in ws])
                    breakdown["gemm_only_us"] = round(time_jax(fg, codes, absmax, wqs) / L * 1e6, 2)
                for threshold in (6.0, 0.0):
                    fn, name = llm_int8_fn(threshold)
                    f = jax.jit(lambda xs, ws: [fn(xi, w, None) for xi, w in zip(xs, ws)])
                    t = time_jax(f, xs, wqs) / L
                    path = ops.last_path("matmul_8bit") or "triton"
                    # Where the layer's device time goes (per layer): the kernels and XLA ops of one call.
                    prof = bench_env.device_time_per_call(f, xs, wqs, calls=2, top=6)
                    prof_extra = dict(device_us=round(prof["device_us"] / L, 2) if prof.get("device_us") else None,
                                      top_kernels_us=[(n, round(v / L, 2)) for n, v in prof.get("top", [])])
                    extra = {}
                    if bnb and dtype == "float16":
                        extra = bnb_linear8bitlt(x, K, N, threshold, L)
                    res.add("llm_int8_forward", f"int8 threshold={threshold}", M, K, N, dtype, t, base,
                            f"{path} ({name})", layers=L, outlier_cols=len(cols), xla_bf16_gemm=kind, **breakdown,
                            **prof_extra, **extra)


def bnb_linear8bitlt(x_jax, K, N, threshold, L):
    """bitsandbytes 0.49.2 Linear8bitLt (fp16, inference) per-layer time on the same shapes."""
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as e:  # noqa: BLE001
        return {"bnb_error": f"{type(e).__name__}: {e}"[:200]}
    try:
        layers = []
        gen = torch.Generator().manual_seed(0)
        for _ in range(L):
            # Random normal fp16 weights (CPU RNG), quantized by bitsandbytes on the move to the GPU.
            lin = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold)
            w = (torch.randn(N, K, generator=gen) * 0.02).to(torch.float16)
            lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            layers.append(lin.cuda().eval())
        x = to_torch(x_jax.astype(jnp.float16))
        outs = [None] * L

        @torch.no_grad()
        def step():
            for i, lin in enumerate(layers):
                outs[i] = lin(x)

        # With a threshold bitsandbytes finds outlier columns on the host (a sync): no graph capture.
        t, graphed = time_torch(step, graph=threshold == 0)
        return {"bnb_Linear8bitLt_us": round(t / L * 1e6, 2), "bnb_timing": "cuda graph" if graphed else "eager"}
    except Exception as e:  # noqa: BLE001
        return {"bnb_error": f"{type(e).__name__}: {e}"[:200]}


# ------------------------------------------------------------------------------------------
# 3. SwitchBack layer forward + backward


def _kernel_switchback(variant):
    """SwitchBack fwd/bwd built directly on the kernels (used only where qflax.ops lacks the op)."""

    @jax.custom_vjp
    def f(x, w, b):
        wq = int8_kernels.quantize_global(w) if variant != "vectorwise" else int8_kernels.quantize_rowwise(w)
        return int8_kernels.run_int8_matmul(x, wq[0], wq[1], b)

    def fwd(x, w, b):
        return f(x, w, b), (x, w)

    def bwd(res, g):
        x, w = res
        wt = int8_kernels.quantize_global_transpose(w) if variant != "vectorwise" else \
            int8_kernels.quantize_columnwise_and_transpose(w)
        dx = int8_kernels.run_switchback_input_grad(g, wt[0], wt[1])
        dw = jax.lax.dot_general(g, x, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(w.dtype)
        return dx, dw, jnp.sum(g.astype(jnp.float32), axis=0).astype(g.dtype)

    f.defvjp(fwd, bwd)
    return f


def switchback_fn(variant):
    if hasattr(ops, "switchback_matmul"):
        return (lambda x, w, b: ops.switchback_matmul(x, w, b, variant=variant, backend="triton")), "qflax.ops"
    return _kernel_switchback(variant), "bench composite on int8_kernels"


def bench_switchback(res: Results, tokens, dim, dtype, variants, torch_baseline=True):
    for K, N in ((dim, 4 * dim), (4 * dim, dim)):
        L = 2
        # One x and one G per layer: shared ones would let XLA merge their quantizations across layers.
        xs = [jax.random.normal(jax.random.PRNGKey(1 + i), (tokens, K), jnp.float32).astype(dtype) for i in range(L)]
        gs = [jax.random.normal(jax.random.PRNGKey(20 + i), (tokens, N), jnp.float32).astype(dtype) for i in range(L)]
        ws = [(jax.random.normal(jax.random.PRNGKey(10 + i), (N, K), jnp.float32) * 0.02).astype(dtype) for i in range(L)]
        bs = [jnp.zeros((N,), dtype) for _ in range(L)]

        def fwd_bwd(fn):
            def run(xs, gs, ws, bs):
                outs = []
                for x, g, w, b in zip(xs, gs, ws, bs):
                    y, vjp = jax.vjp(fn, x, w, b)
                    outs.append((y,) + vjp(g))
                return outs
            return jax.jit(run)

        def dense(x, w, b):
            return (jnp.matmul(x, w.T, preferred_element_type=jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)

        base = {"xla_dot": time_jax(fwd_bwd(dense), xs, gs, ws, bs, reps=5) / L}
        if torch_baseline:
            import torch
            import torch.nn.functional as F

            txs, tgs = [to_torch(x) for x in xs], [to_torch(g) for g in gs]
            tws = [to_torch(w) for w in ws]
            tbs = [to_torch(b) for b in bs]
            keep = [None] * L

            def step():
                for i, (tx, tg, w, b) in enumerate(zip(txs, tgs, tws, tbs)):
                    y = F.linear(tx, w, b)
                    keep[i] = (y, tg @ w, tg.t() @ tx, tg.sum(0))

            base["torch_linear_graph"] = time_torch(step, reps=5)[0] / L
            del txs, tgs, tws, tbs, keep
        for variant in variants:
            fn, origin = switchback_fn(variant)
            t = time_jax(fwd_bwd(fn), xs, gs, ws, bs, reps=5) / L
            path = ops.last_path("switchback_matmul") if origin == "qflax.ops" else "triton"
            res.add("switchback_fwd_bwd", f"switchback {variant}", tokens, K, N, dtype, t, base,
                    f"{path} ({origin})", layers=L)


def versions():
    out = {"python": platform.python_version(), "jax": jax.__version__}
    # Versions from the installed metadata, not by importing: importing jax_triton blanks
    # TRITON_CACHE_DIR, after which every triton.compile fails ("Could not create or locate cache dir").
    for mod in ("jaxlib", "triton", "torch", "jax-triton", "bitsandbytes", "flax"):
        try:
            out[mod.replace("-", "_")] = importlib.metadata.version(mod)
        except Exception as e:  # noqa: BLE001
            out[mod.replace("-", "_")] = f"unavailable ({type(e).__name__})"
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        out["driver"] = "unknown"
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--parts", default="gemm,llm,switchback,bnb")
    p.add_argument("--sweep", action="store_true", help="try GEMM_SWEEP's tile configs at every size and keep the fastest")
    p.add_argument("--gemm-sizes", default="all", help="'all' (M,N,K in {4096,8192}), 'big' (8192^3 and 4096^3) or MxNxK,...")
    p.add_argument("--variants", default="global,vectorwise,global_mem_efficient")
    p.add_argument("--quick", action="store_true", help="LLM.int8 at one shape (4096x4096, M=2048) only")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    device = jax.devices()[0].device_kind
    date = datetime.datetime.now(datetime.timezone.utc)
    header = dict(device=device, versions=versions(), date=date.isoformat(timespec="seconds"),
                  command=" ".join(["python"] + sys.argv),
                  method="per-layer median over repeats of one jitted call over L distinct weights (>=256 MB int8); "
                         "bf16 baseline = faster of XLA dot and torch F.linear in a CUDA graph")
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
    # A partial run (--parts) gets its own name, so it never overwrites a full run's file.
    name = "int8" if parts >= {"gemm", "llm", "switchback", "bnb"} else "int8_" + "_".join(sorted(parts))
    path = os.path.join(args.out, f"{name}-{slug}-{date.strftime('%Y-%m-%d')}.json")
    res = Results(path, header)
    if "gemm" in parts:
        dims = (4096, 8192)
        if args.gemm_sizes == "all":
            sizes = [(m, n, k) for m in dims for n in dims for k in dims]
        elif args.gemm_sizes == "big":
            sizes = [(8192, 8192, 8192), (4096, 4096, 4096)]
        else:
            sizes = [tuple(int(d) for d in size.split("x")) for size in args.gemm_sizes.split(",")
                     if re.fullmatch(r"[1-9]\d*x[1-9]\d*x[1-9]\d*", size)]
            if len(sizes) != len(args.gemm_sizes.split(",")):
                p.error(f"--gemm-sizes must be 'all', 'big' or MxNxK,... with positive integers, got {args.gemm_sizes!r}")
        bench_gemm(res, sizes, args.sweep)
    # SwitchBack before LLM.int8: the layer target should survive a cut-off run.
    if "switchback" in parts:
        bench_switchback(res, 32768, 4096, "bfloat16", args.variants.split(","))
    if "llm" in parts:
        if args.quick:
            bench_llm_int8(res, [(4096, 4096)], ["bfloat16", "float16"], "bnb" in parts, batch_sizes=(2048,))
        else:
            bench_llm_int8(res, [(4096, 4096), (4096, 14336)], ["bfloat16", "float16"], "bnb" in parts)
    res.save()
    print(f"wrote {path}")
    print("\nSUMMARY")
    for r in res.rows:
        print(f"{r['op']:20s} {r['quant']:24s} M={r['M']} K={r['K']} N={r['N']} {r['dtype']} ratio={r['ratio']}"
              + (f" bnb={r['bnb_Linear8bitLt_us']}us" if "bnb_Linear8bitLt_us" in r else ""))


if __name__ == "__main__":
    main()
