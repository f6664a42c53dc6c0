"""What every GPU benchmark records beside its numbers (BENCHMARKS.md §Method 7), and the JAX timers.

``results_header`` gives the device, versions, date and command; ``save_results`` writes
``benchmarks/results/<name>-<device>-<date>.json`` (or a given path); ``time_jax`` and
``device_time_per_call`` are the two clocks: wall time of a jitted call repeated back to back,
and the summed device time of its kernels from a profiler trace.
"""

import datetime
import glob
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name() -> str:
    import jax

    return jax.devices()[0].device_kind


def versions() -> dict:
    """Versions of everything that can change a timing, and the GPU driver."""
    out = dict(python=platform.python_version())
    for module in ("jax", "jaxlib", "flax", "triton", "torch", "bitsandbytes", "transformers"):
        try:
            out[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001 - recorded, not fatal: peers are optional
            out[module] = f"unavailable: {type(err).__name__}"
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        out["driver"] = None
    try:
        from qflax_kernels import triton_call

        out["qflax_custom_call"] = triton_call.custom_call_target()
    except Exception as err:  # noqa: BLE001 - no GPU jaxlib: nothing is launched anyway
        out["qflax_custom_call"] = f"unavailable: {type(err).__name__}"
    out["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return out


def results_header() -> dict:
    return dict(device=device_name(), versions=versions(), date=datetime.date.today().isoformat(),
                command=" ".join(["python"] + sys.argv), rows=[])


def results_path(name: str) -> str:
    device = re.sub(r"[^A-Za-z0-9]+", "-", device_name()).strip("-")
    return os.path.join(RESULTS_DIR, f"{name}-{device}-{datetime.date.today().isoformat()}.json")


def save_results(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def time_jax(fn, *args, repeats: int = 5, target_s: float = 0.05, chain=None) -> float:
    """Median seconds per call of ``fn(*args)`` issued back to back (async dispatch), blocking once per sample.

    Args:
      fn: a jitted function.
      *args: its arguments.
      repeats: samples; the median is returned.
      target_s: each sample runs about this long.
      chain: optional ``(args, out) -> args``: feed each call's output into the next call (a
        decode loop's dependency), else every call gets the same arguments.
    """
    import jax

    out = jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    calls = max(2, int(target_s / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for _ in range(repeats):
        current = args
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*current)
            if chain is not None:
                current = chain(current, out)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def _gpu_kernel_events(trace: dict):
    """(name, duration µs) of every kernel on a GPU stream of a profiler trace."""
    pids, streams = set(), set()
    for event in trace.get("traceEvents", []):
        if event.get("ph") != "M":
            continue
        name = (event.get("args") or {}).get("name", "")
        if event.get("name") == "process_name" and "/device:GPU" in name:
            pids.add(event["pid"])
        elif event.get("name") == "thread_name" and name.lower().startswith("stream"):
            streams.add((event["pid"], event["tid"]))
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and event.get("pid") in pids and (event["pid"], event.get("tid")) in streams:
            yield event.get("name", "?"), float(event.get("dur", 0.0))


def device_time_per_call(fn, *args, calls: int = 3, top: int = 12) -> dict:
    """Summed device time of the kernels of one call of ``fn``, from a JAX profiler trace.

    XLA runs the kernels one by one while profiling (command buffers off), so this is each
    kernel's own time, not the call's wall time.

    Returns:
      ``{"device_us": per call, "kernels": per call, "top": [(name, µs per call), ...]}``.
    """
    import jax

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        files = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            return dict(device_us=None, kernels=0, top=[], error="no trace written")
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    per_name = defaultdict(float)
    count = 0
    for name, dur in _gpu_kernel_events(trace):
        per_name[name] += dur
        count += 1
    total = sum(per_name.values())
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return dict(device_us=total / calls, kernels=count / calls, top=[(n[:120], t / calls) for n, t in ranked])
