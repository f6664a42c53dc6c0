"""Where one eager decode step of the generate benchmark spends its time (a diagnostic, not a benchmark).

Builds the model of ``bench_torch_generate.py`` (random-weight Llama from a config), replaces its
linears by torch_compat's and, when importable, bitsandbytes' quantized layers, and runs a short
eager greedy ``generate`` under ``torch.profiler``. Prints, per library, the wall time per token
and the operators with the largest host (self CPU) time, with their call counts, so a host
synchronisation (``cudaStreamSynchronize``, ``aten::item``, ``aten::nonzero``) or an op called more
often than the layers need shows up directly.

Usage (CUDA): python benchmarks/profile_torch_generate.py [--quant int8] [--new-tokens 8] [--top 25]
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_torch_generate as bench  # noqa: E402
import torch_compat  # noqa: E402

SYNC_MARKERS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::nonzero",
                "aten::_local_scalar_dense", "cudaMemcpyAsync")


def _generate(model, ids, new_tokens):
    kwargs = bench._generate_kwargs(new_tokens, compiled=False, fullgraph=False, backend="inductor")
    return model.generate(ids, **kwargs)


def profile_model(name, model, ids, new_tokens, top):
    """Prints the per-token wall time and the top host-time operators of eager generate for ``model``."""
    _generate(model, ids, new_tokens)  # warm-up: compiles kernels, fills caches
    torch.cuda.synchronize()
    start = time.perf_counter()
    _generate(model, ids, new_tokens)
    torch.cuda.synchronize()
    per_token_ms = (time.perf_counter() - start) / new_tokens * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _generate(model, ids, new_tokens)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"\n=== {name}: {per_token_ms:.2f} ms/token (unprofiled)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    for event in events:
        if any(marker in event.key for marker in SYNC_MARKERS):
            print(f"sync marker {event.key}: {event.count} calls, {event.self_cpu_time_total / 1e3:.1f} ms self CPU")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", default="int8", choices=("nf4", "int8"))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--size", default="full", choices=tuple(bench.MODELS))
    args = parser.parse_args()
    device = torch.device("cuda")
    float_model = bench.build_float_model(args.size, device)
    ids = torch.randint(0, float_model.config.vocab_size, (1, 16), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    libraries = {"torch_compat": torch_compat}
    try:
        import bitsandbytes

        libraries["bitsandbytes"] = bitsandbytes
    except ImportError as error:
        print("no bitsandbytes:", error)
    with torch.no_grad():
        for name, lib in libraries.items():
            model = bench.quantized_copy(float_model, lib, args.quant, device)
            profile_model(f"{name} {args.quant}", model, ids, args.new_tokens, args.top)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
