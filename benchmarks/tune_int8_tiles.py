"""Times tile configurations of the int8 GEMM (``int8_matmul_dequant_kernel``) on the decoder's shapes.

A tuning tool, not the published benchmark (that is ``bench_int8.py`` / ``bench_e2e.py``, through
JAX): each configuration is built with ``qflax_kernels.int8_specs.gemm_launch`` (the builder the
JAX launcher and torch_compat use) and run with Triton's launcher on torch CUDA tensors
(``qflax_kernels.torch_launch``), checked against a float32 torch reference, and timed over L
distinct int8 weights (> 256 MB per timed call, so they stream from HBM) in one CUDA graph, next
to torch bf16 ``F.linear`` on the same shapes. The activations are quantized once, outside the
timed region: this is the GEMM's device time. The fastest configuration per (shape, M) is what
``int8_gemm.gemm_config`` should use.

Usage (GPU machine):
  python benchmarks/tune_int8_tiles.py --out tune_int8.json [--shapes 4096x4096,...] [--rows 1,16]
"""

import argparse
import itertools
import json
import math
import sys
import time

import torch
from cuda_graph_timing import time_graph as _time_graph

MIN_BYTES = 256 * 2**20
# The Llama-3-8B-shaped decoder's linears, K x N: q/o, k/v, gate/up, down.
STACK_SHAPES = "4096x4096,4096x1024,4096x14336,14336x4096"


def time_graph(body):
    return _time_graph(body, target_s=0.02, warmup=1)


def configs_for(m: int, quick: bool = False) -> list:
    """Candidate tiles for ``m`` rows (``quick``: four), after the planned one."""
    block_m = 16 if m <= 16 else 64
    if quick:
        return [dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=4)
                for bn, bk in itertools.product((32, 64), (256, 512))]
    grid = [dict(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=4)
            for bn, bk in itertools.product((16, 32, 64), (128, 256, 512))]
    return grid + [dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=6),
                   dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=512, GROUP_M=1, num_warps=4, num_stages=3),
                   dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=8, num_stages=4),
                   dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=256, GROUP_M=1, num_warps=8, num_stages=3)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default=STACK_SHAPES, help="KxN,...")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--budget-s", type=float, default=300)
    parser.add_argument("--quick", action="store_true", help="four candidate tiles per shape, not the grid")
    args = parser.parse_args()
    from qflax_kernels import int8_gemm, int8_specs, torch_launch

    deadline = time.time() + args.budget_s
    results = dict(device=torch.cuda.get_device_name(), rows=[], errors=[], command=" ".join(["python"] + sys.argv),
                   date=time.strftime("%Y-%m-%d"),
                   versions=dict(torch=torch.__version__, triton=__import__("triton").__version__))
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        count = max(3, math.ceil(MIN_BYTES / (n * k)))
        count_bf16 = max(2, math.ceil(MIN_BYTES / (2 * n * k)))
        gen = torch.Generator(device="cuda").manual_seed(k + 7 * n)
        codes = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=gen) for _ in range(count)]
        scales = [torch.rand(n, device="cuda", generator=gen) + 0.5 for _ in range(count)]
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(count_bf16)]
        for m in (int(v) for v in args.rows.split(",")):
            a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=gen)
            a_scale = torch.rand(m, device="cuda", generator=gen) + 0.5
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            want = (a.float() @ codes[0].float().T) * a_scale[:, None] * scales[0][None, :] / 127**2
            t_bf16 = time_graph(lambda: [torch.nn.functional.linear(x, w) for w in bf16]) / count_bf16
            planned = dict(int8_gemm.gemm_config(m, n, k))
            best = None
            for cfg in [planned] + [c for c in configs_for(m, args.quick) if c != planned]:
                if time.time() > deadline:
                    break
                try:
                    spec = int8_specs.gemm_launch(m, n, k, "bfloat16", has_bias=False, b_scale_global=False,
                                                  has_outliers=False, config=cfg)
                    outs = [torch_launch.allocate_outputs(spec, "cuda") for _ in range(count)]

                    def run_all():
                        for i in range(count):
                            torch_launch.launch_into(spec, [a, codes[i], a_scale, scales[i], scales[i], scales[i],
                                                            scales[i], scales[i], scales[i]], outs[i])

                    run_all()
                    err = float((outs[0][0].float() - want).norm() / want.norm())
                    t = time_graph(run_all) / count
                    gbps = n * k / t / 1e9
                    row = dict(op="int8_matmul_dequant", quant="int8", M=m, K=k, N=n, dtype="bfloat16",
                               ours_us=t * 1e6, baseline="torch_f_linear_cuda_graph", baseline_us=t_bf16 * 1e6,
                               ratio=t_bf16 / t, path="triton:int8_gemm", weight_gb_s=gbps, cfg=cfg,
                               planned=cfg == planned, rel_err=err)
                    results["rows"].append(row)
                    if best is None or t < best[0]:
                        best = (t, cfg)
                    print(f"K={k} N={n} M={m} {cfg}: {t*1e6:7.1f}us ({gbps:5.0f} GB/s) bf16 {t_bf16*1e6:7.1f} "
                          f"ratio {t_bf16/t:5.2f} err {err:.1e}{' PLANNED' if cfg == planned else ''}", flush=True)
                except Exception as e:  # a config that fails to compile or run is recorded and skipped
                    results["errors"].append(dict(K=k, N=n, M=m, cfg=cfg, error=repr(e)[:500]))
                    print(f"K={k} N={n} M={m} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            if best:
                print(f"BEST K={k} N={n} M={m}: {best[0]*1e6:.1f}us ({t_bf16/best[0]:.2f}x bf16) {best[1]}", flush=True)
        del codes, bf16
        torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
