"""Tensor parallelism: the Llama-3-8B-shaped stack over N GPUs, NF4 (and others) against bf16, vs 1 GPU.

Megatron-style split of every layer of ``llama_stack``: q/k/v/gate/up column-parallel (output
features split: no communication), o/down row-parallel (input features split at absmax-block
boundaries: one psum of the outputs each), so two all-reduces per layer and nothing else; the
attention stand-in works head by head on the split q/k/v. The variables are placed with
``qflax.sharding`` (4-bit weights in the row view) and the step is one ``jax.jit`` with
``in_shardings``. For every kind, M (decode M = 1, prefill M = 512) and device count the row
records: the step time (steps chained, median), the 1-device time and the scaling
``t(1) / t(N)``, the output's largest difference to the 1-device output (relative to its
largest value), the collectives of the compiled step (all-gathers must be 0), the weight bytes
held by one device, and the bf16 step over the same devices (NF4 vs bf16 ratio).

NCCL_NVLS_ENABLE=0 is set (NVLink SHARP multicast is not available on the lent machines).

Usage:
  python benchmarks/bench_tp.py --devices 1,2            # a 2-GPU machine: 1 GPU and 2 GPUs
  python benchmarks/bench_tp.py --devices 1,2 --kinds bf16,nf4_dq,nf4 --rows 1,512 --layers 32
  python benchmarks/bench_tp.py --cpu-devices 8 --tiny   # CPU smoke run: 8 host devices, a small stack
"""

import argparse
import os
import re
import sys
import time

# Before JAX (and NCCL) start.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

DEFAULT_KINDS = ("bf16", "nf4_dq")
DEFAULT_ROWS = (1, 512)
COLUMN_PARALLEL = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"
ROW_PARALLEL = r"(o_proj|down_proj)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=None,
                        help="comma-separated device counts to run (default: 1 and all devices)")
    parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="llama_stack kinds (include bf16 for ratios)")
    parser.add_argument("--rows", default=",".join(map(str, DEFAULT_ROWS)))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="a 512-wide stack of at most 2 layers (CPU smoke run)")
    parser.add_argument("--cpu-devices", type=int, default=0, help="run on N host CPU devices (sets XLA_FLAGS)")
    parser.add_argument("--target-s", type=float, default=0.2, help="seconds per timing sample")
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def configure_platform(cpu_devices: int) -> None:
    """Asks for ``cpu_devices`` host devices; must run before JAX starts (checked when it has)."""
    if not cpu_devices:
        return
    if "jax" in sys.modules:
        import jax

        have = len(jax.devices("cpu"))
        if have < cpu_devices:
            raise SystemExit(f"--cpu-devices {cpu_devices}: JAX already started with {have} CPU devices")
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()


def tp_rules(kind: str) -> list:
    """Megatron rules: Flax kernels (in, out) for bf16, quantized weights (out, in) otherwise."""
    from jax.sharding import PartitionSpec as P

    if kind == "bf16":
        return [(COLUMN_PARALLEL + "/kernel$", P(None, "tp")), (ROW_PARALLEL + "/kernel$", P("tp", None))]
    return [(COLUMN_PARALLEL + "/weight$", P("tp", None)), (ROW_PARALLEL + "/weight$", P(None, "tp"))]


def collective_counts(compiled_text: str) -> dict:
    ops = re.findall(r"= \S+ (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
                     compiled_text)
    return {op: ops.count(op) for op in sorted(set(ops))}


def drop_unused_adapters(variables: dict, kind: str) -> dict:
    """llama_stack gives the 4-bit kinds LoRA adapters too; only the lora_* kinds read them."""
    if kind.startswith("lora"):
        return variables

    def strip(node):
        return {k: strip(v) for k, v in node.items() if not k.startswith("lora_")} if isinstance(node, dict) else node

    return {**variables, "params": strip(variables["params"])}


def bytes_on_first_device(tree) -> int:
    import jax

    first = None
    total = 0
    for leaf in jax.tree.leaves(tree):
        shards = leaf.addressable_shards
        first = first or shards[0].device
        total += sum(s.data.nbytes for s in shards if s.device == first)
    return total


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import bench_env
    import llama_stack as ls
    from qflax import ops
    from qflax import sharding as qs

    deadline = time.time() + args.budget_s
    devices = jax.devices()
    counts = sorted({1, len(devices)} if args.devices is None else {int(n) for n in args.devices.split(",")})
    if counts[-1] > len(devices):
        raise SystemExit(f"--devices asks for {counts[-1]} devices; {len(devices)} available")
    # tiny: 8 kv heads (any device count up to 8 splits whole heads), every split >= one absmax block.
    shape = (ls.Shape(layers=min(args.layers, 2), hidden=512, kv=128, mlp=1024, head_dim=16, lora_rank=8) if args.tiny
             else ls.Shape(layers=args.layers))
    # bf16 first: the other kinds' rows compare with it.
    kinds = sorted({k for k in args.kinds.split(",") if k}, key=lambda k: (k != "bf16", args.kinds.index(k)))
    rows = [int(r) for r in args.rows.split(",")]
    results = bench_env.results_header()
    results.update(devices_available=len(devices), device_counts=counts, kinds=kinds, layers=shape.layers,
                   hidden=shape.hidden, mlp=shape.mlp, env={"NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")})
    path = args.out or bench_env.results_path("tp")
    key = jax.random.key(0)
    weights = {(i, p): ls.bf16_weight(key, shape, i, p) for i in range(shape.layers) for p in ls.PROJECTIONS}
    bf16_times = {}
    for kind in kinds:
        model = ls.Decoder(shape, kind)
        variables = drop_unused_adapters(ls.build_variables(kind, shape, weights=weights), kind)
        if kind != "bf16":
            variables = qs.to_row_view(variables)
        one_device = {}
        for n in counts:
            mesh = Mesh(np.array(devices[:n]), ("tp",))
            shardings = qs.quantized_shardings(variables, tp_rules(kind), mesh)
            placed = jax.device_put(variables, shardings)
            replicated = NamedSharding(mesh, P())
            step = jax.jit(model.apply, in_shardings=(shardings, replicated), out_shardings=replicated)
            for m in rows:
                if time.time() > deadline:
                    print("budget reached", flush=True)
                    bench_env.save_results(results, path)
                    return results
                x = jax.device_put(jax.random.normal(jax.random.key(1), (m, shape.hidden)).astype(jnp.bfloat16),
                                   replicated)
                compiled = step.lower(placed, x).compile()
                seconds = bench_env.time_jax(compiled, placed, x, chain=lambda a, out: (a[0], out),
                                             target_s=args.target_s)
                y = np.asarray(compiled(placed, x), np.float32)
                if n == 1:
                    one_device[m] = (seconds, y)
                base_s, base_y = one_device.get(m, (float("nan"), None))
                rel_err = (float(np.max(np.abs(y - base_y)) / max(np.max(np.abs(base_y)), 1e-30))
                           if base_y is not None else None)
                if kind == "bf16":
                    bf16_times[(n, m)] = seconds
                row = dict(op="decoder_step_tp", quant=kind, M=m, devices=n, layers=shape.layers,
                           ours_us=seconds * 1e6, one_device_us=base_s * 1e6, scaling=base_s / seconds,
                           efficiency=base_s / seconds / n, max_rel_diff_vs_one_device=rel_err,
                           collectives=collective_counts(compiled.as_text()),
                           weight_bytes_per_device=bytes_on_first_device(placed),
                           bf16_us=bf16_times.get((n, m), float("nan")) * 1e6,
                           ratio_vs_bf16=bf16_times.get((n, m), float("nan")) / seconds,
                           path=ops.last_path("matmul_8bit" if kind.startswith("int8") else "matmul_4bit")
                           if kind != "bf16" else "xla")
                results["rows"].append(row)
                bench_env.save_results(results, path)
                print(f"{kind:7s} N={n} M={m:4d}: {seconds * 1e3:8.3f} ms  scaling {row['scaling']:.2f}  vs bf16 "
                      f"{row['ratio_vs_bf16']:.2f}  diff {rel_err if rel_err is not None else float('nan'):.1e}  "
                      f"{row['collectives']}", flush=True)
            del placed
        del variables
    bench_env.save_results(results, path)
    print(f"wrote {path}", flush=True)
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    configure_platform(args.cpu_devices)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    return run(args)


if __name__ == "__main__":
    main()
