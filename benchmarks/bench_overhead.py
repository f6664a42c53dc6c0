"""Per-call host overhead of one small Linear4bit call at batch 1: torch_compat vs bitsandbytes 0.49.2 (BENCHMARKS.md item 8).

At batch 1 a small layer's matmul costs next to nothing, so the wall time of one call is the
per-call host overhead (Python, dispatch, and for torch_compat the DLPack crossings). Each
figure is the median over repeats (interleaved across implementations) of the mean time of
``--calls`` back-to-back calls.

Rows: torch_compat LinearNF4 as dispatched (on CUDA the direct path: the ``qflax::matmul_4bit``
custom op launching the Triton kernel on the torch tensors; on CPU DLPack to JAX), and forced
onto the DLPack path (``torch_compat.direct_path.dlpack_only``); bitsandbytes LinearNF4 in train
mode (its dequantize + matmul path) and in eval mode (on AVX512-BF16 CPUs its packed bf16
kernel; on CUDA its gemv); plain torch ``nn.Linear`` as the floor. The baseline of the ratio is
bitsandbytes' faster mode; the summary row's ``path`` says which path torch_compat took.

Usage:
  python benchmarks/bench_overhead.py [--device cpu|cuda] [--out benchmarks/results]

On a shared CPU machine pin the process (e.g. ``taskset -c 1``) so both libraries run under the
same conditions; the JSON records the thread count.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

import torch

import torch_compat  # the installed package (the repository root on sys.path would shadow HF's `kernels`)
from torch_compat import bridge, direct_path, forwards

# 64x64: compute is negligible, the time is host overhead; larger shapes show where compute takes over.
SHAPES = [(64, 64), (256, 256), (1024, 1024)]


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _time_per_call(layers: dict, x, calls: int, repeats: int, device: str) -> dict:
    """Median per-call microseconds of each layer; repeats are interleaved so load drift hits all alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for layer in layers.values():
        for _ in range(20):
            layer(x)
    sync()
    means = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            start = time.perf_counter()
            for _ in range(calls):
                layer(x)
            sync()
            means[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in means.items()}


class _DLPackOnly:
    """Calls a torch_compat layer with the direct kernel path switched off."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        with direct_path.dlpack_only():
            return self.layer(x)


class _JaxCall:
    """Calls a JaxOp on the jax copy of the input, waiting for the result (as a torch call does)."""

    def __init__(self, op, packed, bias):
        self.op, self.packed, self.bias, self.x = op, packed, bias, None

    def __call__(self, x):
        if self.x is None:
            self.x = bridge.to_jax(x)
        return self.op.forward(self.packed, self.x, self.bias).block_until_ready()


def _layers(bnb, K: int, N: int, device: str):
    torch.manual_seed(0)
    weight, bias = torch.randn(N, K), torch.randn(N)
    out = {}
    ours = torch_compat.nn.LinearNF4(K, N)
    ours.weight.data, ours.bias.data = weight.clone(), bias.clone()
    out["torch_compat.nn.LinearNF4"] = ours.to(device)
    dlpack = torch_compat.nn.LinearNF4(K, N)
    dlpack.weight.data, dlpack.bias.data = weight.clone(), bias.clone()
    out["torch_compat.nn.LinearNF4 (DLPack)"] = _DLPackOnly(dlpack.to(device))
    if bnb is not None:
        for mode in ("train", "eval"):
            layer = bnb.nn.LinearNF4(K, N)
            layer.weight.data, layer.bias.data = weight.clone(), bias.clone()
            layer = layer.to(device)
            layer.train(mode == "train")
            out[f"bitsandbytes.nn.LinearNF4 ({mode})"] = layer
    # qflax alone: the jitted op on jax arrays, i.e. torch_compat without the torch side and DLPack
    packed = ours._packed_weight()
    op = bridge.jax_op(forwards.linear_4bit, compute_dtype="float32")
    bias_jax = bridge.to_jax(ours.bias)
    out["qflax jitted op (jax arrays)"] = _JaxCall(op, packed, bias_jax)
    floor = torch.nn.Linear(K, N).to(device)
    floor.weight.data, floor.bias.data = weight.clone().to(device), bias.clone().to(device)
    out["torch.nn.Linear (fp32 floor)"] = floor
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    import jax

    rows = []
    with torch.no_grad():
        for K, N in SHAPES:
            x = torch.randn(1, K, device=args.device)
            layers = _layers(bnb, K, N, args.device)
            layers["torch_compat.nn.LinearNF4"](x)
            taken = direct_path.last_path(direct_path.LINEAR_4BIT)
            timings = _time_per_call(layers, x, args.calls, args.repeats, args.device)
            bnb_times = [t for name, t in timings.items() if name.startswith("bitsandbytes")]
            baseline = min(bnb_times) if bnb_times else None
            ours = timings["torch_compat.nn.LinearNF4"]
            for name, t in timings.items():
                rows.append({
                    "op": "Linear4bit forward (no grad)", "impl": name, "quant": "nf4", "M": 1, "K": K, "N": N,
                    "dtype": "float32", "us_per_call": round(t, 2),
                })
            rows.append({
                "op": "Linear4bit forward (no grad)", "impl": "summary", "quant": "nf4", "M": 1, "K": K, "N": N,
                "dtype": "float32", "ours_us": round(ours, 2), "baseline": "bitsandbytes LinearNF4 (faster mode)",
                "baseline_us": None if baseline is None else round(baseline, 2),
                "ratio": None if baseline is None else round(baseline / ours, 3),
                "path": ("torch_compat direct: qflax::matmul_4bit custom op, Triton kernel on the torch tensors"
                         if taken == direct_path.KERNEL
                         else "torch_compat -> DLPack -> jitted qflax matmul_4bit -> DLPack"),
                "dlpack_us": round(timings["torch_compat.nn.LinearNF4 (DLPack)"], 2),
            })
            print(f"K=N={K}: " + ", ".join(f"{k} {v:.1f} us" for k, v in timings.items()))
    device = _device_name(args.device)
    date = datetime.date.today().isoformat()
    result = {
        "device": device,
        "device_kind": args.device,
        "threads": torch.get_num_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "jax": jax.__version__,
            "bitsandbytes": getattr(bnb, "__version__", None),
        },
        "date": date,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "method": f"median over {args.repeats} interleaved repeats of the mean of {args.calls} calls, after 20 warm-up calls",
        "rows": rows,
    }
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    path = out_dir / f"overhead-{args.device}-{slug}-{date}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
