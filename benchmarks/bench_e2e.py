"""The headline benchmark: a Llama-3-8B-shaped decoder stack, one jitted step, every qflax format vs bf16.

Decode and prefill: rows M = 1, 16, 64, 512 through the 32-layer stack of ``llama_stack`` (224
linears), one ``jax.jit`` per step, steps issued back to back with each step's output feeding the
next (a decode loop's dependency), median of repeats. Formats: bf16 (XLA), NF4 with and without
double quantization, FP4, LLM.int8 threshold 0 and 6. The bf16 baseline is the faster of XLA and
torch ``F.linear`` (the same weights through DLPack, the same stack, one CUDA graph per step).
Next to each wall time: the summed device time of the step's kernels (profiler trace), so host
overhead shows as the gap. Training: one QLoRA step (16 layers, 2048 tokens, forward + backward
w.r.t. the adapters, remat per layer), ``LoRADense4bit`` NF4 against the same adapters over bf16.

Usage (GPU machine):
  python benchmarks/bench_e2e.py [--kinds bf16,nf4_dq,...] [--rows 1,16,64,512] [--no-qlora] [--out PATH]
"""

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_env  # noqa: E402
import llama_stack as ls  # noqa: E402
from qflax import ops  # noqa: E402

ROWS = (1, 16, 64, 512)
QLORA_LAYERS, QLORA_TOKENS = 16, 2048


def _x(rows, hidden, seed=1):
    return jax.random.normal(jax.random.key(seed), (rows, hidden), jnp.float32).astype(jnp.bfloat16)


def _paths_used(kind):
    if kind.startswith("int8"):
        return ops.last_path("matmul_8bit")
    if kind == "bf16":
        return "xla"
    return ops.last_path("matmul_4bit")


def time_step(model, variables, x, profile=True):
    """(wall seconds per step, device profile) of ``model.apply`` jitted, steps chained."""
    step = jax.jit(model.apply)
    seconds = bench_env.time_jax(step, variables, x, chain=lambda args, out: (args[0], out))
    prof = bench_env.device_time_per_call(step, variables, x) if profile else {}
    return seconds, prof


def torch_bf16_step_seconds(weights, shape, x_jax):
    """Seconds per step of the same stack in torch (F.linear, cuBLAS) captured in one CUDA graph."""
    import torch
    import torch.nn.functional as F
    from cuda_graph_timing import time_graph

    w = {k: torch.utils.dlpack.from_dlpack(v) for k, v in weights.items()}
    heads, kvh, d = shape.hidden // shape.head_dim, shape.kv // shape.head_dim, shape.head_dim

    def norm(x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)

    def stack(x):
        for i in range(shape.layers):
            h = norm(x)
            q, k, v = (F.linear(h, w[(i, p)]) for p in ("q_proj", "k_proj", "v_proj"))
            m = x.shape[0]
            qg = q.view(m, kvh, heads // kvh, d).float()
            score = (qg * k.view(m, kvh, 1, d).float()).sum(-1, keepdim=True) / d ** 0.5
            attn = (torch.sigmoid(score).to(v.dtype) * v.view(m, kvh, 1, d)).reshape(m, shape.hidden)
            x = x + F.linear(attn, w[(i, "o_proj")])
            h = norm(x)
            x = x + F.linear(F.silu(F.linear(h, w[(i, "gate_proj")])) * F.linear(h, w[(i, "up_proj")]),
                             w[(i, "down_proj")])
        return norm(x)

    x = torch.utils.dlpack.from_dlpack(x_jax).clone()
    with torch.no_grad():
        return time_graph(lambda: stack(x), target_s=0.1)


def record_outlier_columns(results, model, variables, x, threshold=6.0):
    """Store and print, per projection, the min / median / max over layers of its outlier columns."""
    per_layer = ls.outlier_columns(model, variables, x, threshold)
    summary = {p: dict(min=min(c), median=sorted(c)[len(c) // 2], max=max(c)) for p, c in per_layer.items()}
    results.setdefault("outlier_columns", {})[str(x.shape[0])] = dict(threshold=threshold, **summary)
    print(f"outlier columns (|x| >= {threshold}) M={x.shape[0]}, median [max] over layers: "
          + ", ".join(f"{p} {v['median']} [{v['max']}]" for p, v in summary.items()), flush=True)


def bench_inference(results, shape, kinds, rows, path, deadline, gains=None):
    """Time every kind at every row count; ``gains``: build_variables' outlier/norm gain arguments."""
    gains = gains or {}
    key = jax.random.key(0)
    weights = {(i, p): ls.bf16_weight(key, shape, i, p) for i in range(shape.layers) for p in ls.PROJECTIONS}
    baselines = {}
    for m in rows:
        x = _x(m, shape.hidden)
        try:
            baselines[("torch", m)] = torch_bf16_step_seconds(weights, shape, x)
        except Exception as err:  # noqa: BLE001 - the torch peer is optional
            print(f"torch baseline M={m} failed: {err!r}"[:400], flush=True)
    for spec in kinds:
        # "kind@backend" forces a dispatch backend ("nf4@xla": the XLA path of the same model).
        kind, _, backend = spec.partition("@")
        variables = ls.build_variables(kind, shape, weights=weights, **gains)
        model = ls.Decoder(shape, kind)
        for m in rows:
            if time.time() > deadline:
                print("budget reached", flush=True)
                return
            x = _x(m, shape.hidden)
            try:
                with ops.use_backend(backend or "auto"):
                    seconds, prof = time_step(model, variables, x)
            except Exception as err:  # noqa: BLE001 - recorded, the other points still run
                results.setdefault("errors", []).append(dict(kind=spec, M=m, error=repr(err)[:1500]))
                print(f"{spec} M={m}: FAILED {err!r}"[:1500], flush=True)
                continue
            if spec == "bf16":
                baselines[("xla", m)] = seconds
                if any(k.startswith("int8_t6") for k in kinds):  # the inputs LLM.int8 sees, counted
                    record_outlier_columns(results, model, variables, x)
            base_name, base = min(((n, baselines[(n, m)]) for n in ("xla", "torch") if (n, m) in baselines),
                                  key=lambda nb: nb[1], default=("none", float("nan")))
            row = dict(op="decoder_step", quant=spec, M=m, K=shape.hidden, N=shape.hidden, dtype="bfloat16",
                       layers=shape.layers, ours_us=seconds * 1e6, baseline=f"bf16_{base_name}",
                       baseline_us=base * 1e6, ratio=base / seconds, path=_paths_used(kind),
                       xla_bf16_us=baselines.get(("xla", m), float("nan")) * 1e6,
                       torch_bf16_graph_us=baselines.get(("torch", m), float("nan")) * 1e6,
                       device_us=prof.get("device_us"), kernels_per_step=prof.get("kernels"),
                       wall_over_device=(seconds * 1e6 / prof["device_us"]) if prof.get("device_us") else None,
                       top_kernels=prof.get("top"))
            results["rows"].append(row)
            bench_env.save_results(results, path)
            print(f"{spec:8s} M={m:4d}: {seconds*1e3:7.3f} ms  device {row['device_us'] or 0:9.1f} us  "
                  f"{row['baseline']} {base*1e3:7.3f} ms  ratio {row['ratio']:.2f}  path {row['path']}", flush=True)
        del variables


def bench_qlora(results, path, shape):
    x = _x(QLORA_TOKENS if shape.hidden >= 1024 else 64, shape.hidden, seed=2)
    key = jax.random.key(0)
    weights = {(i, p): ls.bf16_weight(key, shape, i, p) for i in range(shape.layers) for p in ls.PROJECTIONS}
    times = {}
    for kind in ("lora_bf16", "lora_nf4"):
        variables = ls.build_variables(kind, shape, weights=weights)
        model = ls.Decoder(shape, kind, remat=True)
        params = variables["params"]
        frozen = {k: v for k, v in variables.items() if k != "params"}

        def loss(params, frozen, x):
            y = model.apply({"params": params, **frozen}, x)
            return jnp.mean(jnp.square(y.astype(jnp.float32)))

        step = jax.jit(jax.value_and_grad(loss))
        seconds = bench_env.time_jax(step, params, frozen, x, target_s=0.3)
        prof = bench_env.device_time_per_call(step, params, frozen, x, calls=2)
        times[kind] = seconds
        print(f"{kind}: {seconds*1e3:.2f} ms per QLoRA step (device {prof.get('device_us') or 0:.0f} us)", flush=True)
        results["rows"].append(dict(op="qlora_step", quant=kind, M=QLORA_TOKENS, K=shape.hidden, N=shape.hidden,
                                    dtype="bfloat16", layers=shape.layers, ours_us=seconds * 1e6,
                                    baseline="lora_bf16", baseline_us=None, ratio=None,
                                    path=ops.last_path("matmul_4bit") if kind == "lora_nf4" else "xla",
                                    grad_input_path=ops.last_path("matmul_4bit_grad_input") if kind == "lora_nf4"
                                    else None, device_us=prof.get("device_us"), top_kernels=prof.get("top")))
        del variables, params, frozen
    for row in results["rows"]:
        if row["op"] == "qlora_step":
            row["baseline_us"] = times["lora_bf16"] * 1e6
            row["ratio"] = times["lora_bf16"] / (row["ours_us"] / 1e6)
    bench_env.save_results(results, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(ls.KINDS))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--no-qlora", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 256-wide stack (a CPU smoke run)")
    parser.add_argument("--budget-s", type=float, default=500)
    parser.add_argument("--out", default=None)
    parser.add_argument("--outlier-features", type=int, default=0,
                        help="plant this many systematic outlier features (RMSNorm gains, llama_stack.build_variables)")
    parser.add_argument("--outlier-gain", type=float, default=ls.OUTLIER_FEATURE_GAIN,
                        help="the planted features' RMSNorm gain")
    parser.add_argument("--norm-gain", type=float, default=1.0,
                        help="every other RMSNorm gain in front of a projection (below 1: fewer chance outliers)")
    args = parser.parse_args()
    deadline = time.time() + args.budget_s
    results = bench_env.results_header()
    path = args.out or bench_env.results_path("e2e")
    shape = ls.Shape(layers=2, hidden=256, kv=64, mlp=512, head_dim=32) if args.tiny else ls.Shape(layers=args.layers)
    # The planted outlier features' columns (RMSNorm gains of every kind's model), [] for none.
    results["outlier_features"] = ls.outlier_feature_columns(shape.hidden, args.outlier_features)
    gains = dict(outlier_features=args.outlier_features, outlier_gain=args.outlier_gain, norm_gain=args.norm_gain)
    results["norm_gains"] = dict(outlier=args.outlier_gain, other=args.norm_gain)
    bench_inference(results, shape, args.kinds.split(","),
                    [int(r) for r in args.rows.split(",")], path, deadline, gains)
    if not args.no_qlora and time.time() < deadline:
        bench_qlora(results, path, dataclasses.replace(shape, layers=min(shape.layers, QLORA_LAYERS)))
    bench_env.save_results(results, path)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
