"""Where the host time of one eager torch_compat layer call goes (a diagnostic, not a benchmark).

Times back-to-back eager calls of ``LinearNF4`` (double quantization, bf16) and
``Linear8bitLt(threshold=6)`` at batch 1 on the generate benchmark's MLP shape, with and without
the pieces around the kernel launch, next to bitsandbytes' layers when importable, and prints a
cProfile of the torch_compat calls. Also times the bare Triton launch of the planned 4-bit
kernel (``launch.kernel[grid](...)``), the part of a call no Python around it can remove.

Usage (CUDA): python benchmarks/profile_torch_call.py [--calls 2000]
"""

import argparse
import cProfile
import pstats
import time

import torch

import torch_compat
from torch_compat import cuda_weights, direct_path, fourbit_ops, kernel_launch


def _per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)
    k, n = args.k, args.n
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    layers = {"torch_compat LinearNF4": torch_compat.nn.LinearNF4(k, n, compute_dtype=torch.bfloat16).cuda(),
              "torch_compat Linear8bitLt(6)": torch_compat.nn.Linear8bitLt(k, n, has_fp16_weights=False,
                                                                           threshold=6.0).cuda()}
    try:
        import bitsandbytes as bnb

        layers["bitsandbytes LinearNF4"] = bnb.nn.LinearNF4(k, n, compute_dtype=torch.bfloat16).cuda()
        layers["bitsandbytes Linear8bitLt(6)"] = bnb.nn.Linear8bitLt(k, n, has_fp16_weights=False,
                                                                     threshold=6.0).cuda()
    except ImportError as error:
        print("no bitsandbytes:", error)
    layers["torch nn.Linear bf16"] = torch.nn.Linear(k, n, dtype=torch.bfloat16).cuda()
    for layer in layers.values():
        layer.eval()
    with torch.no_grad():
        for name, layer in layers.items():
            print(f"{name}: {_per_call_us(lambda: layer(x), args.calls):.1f} us/call")
        nf4 = layers["torch_compat LinearNF4"]
        nf4(x)
        print("path:", direct_path.last_path(direct_path.LINEAR_4BIT))
        x2 = x.reshape(1, k)
        weight = cuda_weights.fourbit_weight(nf4)
        body = lambda: fourbit_ops.matmul_4bit_body(x2, *weight, nf4.bias, n, 64)  # noqa: E731
        print(f"matmul_4bit_body: {_per_call_us(body, args.calls):.1f} us/call")
        launch = fourbit_ops._matmul_launch(1, n, k, 64, "bfloat16", True, True, kernel_launch.sm_count(x.device))
        from qflax_kernels import fourbit_launch, torch_launch

        inputs = fourbit_launch.matmul_inputs(x2, fourbit_launch.weight_inputs(*weight), nf4.bias)
        outputs = torch_launch.allocate_outputs(launch, x.device)
        bare = lambda: torch_launch.launch_into(launch, inputs, outputs)  # noqa: E731
        print(f"bare Triton launch ({launch.name}): {_per_call_us(bare, args.calls):.1f} us/call")
        print(f"allocate_outputs: {_per_call_us(lambda: torch_launch.allocate_outputs(launch, x.device), args.calls):.1f}"
              " us/call")
        for name in ("torch_compat LinearNF4", "torch_compat Linear8bitLt(6)"):
            layer = layers[name]
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(500):
                layer(x)
            profile.disable()
            torch.cuda.synchronize()
            print(f"--- cProfile, 500 calls of {name}")
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
