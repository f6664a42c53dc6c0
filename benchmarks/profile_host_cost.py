"""Host (Python) cost of one eager torch_compat layer call around its kernel launch, on any machine (a diagnostic).

The direct kernel path's layer calls are host-bound at decode sizes (BENCHMARKS.md); this measures
the part that is pure Python and torch dispatch: the kernel launch itself is replaced by a no-op
(``qflax_kernels.torch_launch.launch_into``), after one real call that compiles and caches. On a CPU
machine it runs the layers on CPU tensors with Triton's interpreter (``TRITON_INTERPRET=1``, set
here), whose poisoned output fills (``torch.full``, absent on CUDA) are included; on CUDA it runs
them on the GPU. Prints microseconds per call and the top of a cProfile.

Usage: python benchmarks/profile_host_cost.py [--calls 2000] [--device cpu|cuda]
"""

import argparse
import cProfile
import os
import pstats
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=8192)
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    import torch

    import torch_compat as tc
    from qflax.ops import use_backend
    from qflax_kernels import torch_launch

    torch.manual_seed(0)
    layers = {"LinearNF4": tc.nn.LinearNF4(args.k, args.n, compute_dtype=torch.bfloat16),
              "Linear8bitLt(threshold=6)": tc.nn.Linear8bitLt(args.k, args.n, has_fp16_weights=False, threshold=6.0)}
    layers = {name: layer.to(args.device) for name, layer in layers.items()}
    x = torch.randn(1, 1, args.k, dtype=torch.bfloat16, device=args.device)
    with torch.no_grad(), use_backend("triton"):
        for layer in layers.values():
            layer(x)  # a real launch: compiles, fills the caches
        torch_launch.launch_into = lambda launch, inputs, outputs: None  # from here on: everything but the launch
        for name, layer in layers.items():
            for _ in range(200):
                layer(x)
            start = time.perf_counter()
            for _ in range(args.calls):
                layer(x)
            print(f"{name}: {(time.perf_counter() - start) / args.calls * 1e6:.1f} us per call without the launch")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            layers["LinearNF4"](x)
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
