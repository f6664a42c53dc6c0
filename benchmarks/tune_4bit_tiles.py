"""Times launch configurations of the register-decode 4-bit kernel directly (torch tensors, CUDA graphs).

A tuning tool, not the published benchmark (that is ``bench_4bit.py``, through JAX): it builds each
launch with ``qflax_kernels.fourbit_launch`` (the same builder the JAX launcher and torch_compat
use, split-K reduced in the kernel) and runs it with Triton's own launcher on torch CUDA tensors
(``qflax_kernels.torch_launch``), checks every configuration against a float32 torch reference on the same weights, and
times L distinct weights (> 200 MB per timed call) in one CUDA graph next to torch bf16
``F.linear`` on the same shapes. The fastest configuration per (shape, M) is what
``fourbit_plan`` should use.

Usage (GPU machine):
  python benchmarks/tune_4bit_tiles.py --out tune.json [--shapes 8192x8192,...] [--rows 1,16,64,256]
"""

import argparse
import json
import math
import os
import sys
import time

import torch
from cuda_graph_timing import time_graph as _time_graph

MIN_BYTES = 256 * 2**20


def time_graph(body):
    """Seconds per CUDA-graph replay of ``body`` (one eager warm-up call, samples of ~20 ms)."""
    return _time_graph(body, target_s=0.02, warmup=1)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: interpreter dry runs of launch()
USE_ASM = os.environ.get("TRITON_INTERPRET") != "1"
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


class Weights:
    """L random NF4 weights (random bytes, random absmax) of one shape, plus bf16 baselines."""

    def __init__(self, k, n, blocksize=64):
        self.k, self.n, self.bs = k, n, blocksize
        per = n * k // 2 + n * k // blocksize * 4
        self.count = max(3, math.ceil(MIN_BYTES / per)) if DEVICE == "cuda" else 1
        self.count_bf16 = max(2, math.ceil(MIN_BYTES / (n * k * 2))) if DEVICE == "cuda" else 1
        gen = torch.Generator(device=DEVICE).manual_seed(k + 3 * n)
        self.packed = [torch.randint(0, 256, (n * k // 2,), device=DEVICE, dtype=torch.uint8, generator=gen)
                       for _ in range(self.count)]
        self.absmax = [torch.rand(n * k // blocksize, device=DEVICE, generator=gen) + 0.5 for _ in range(self.count)]
        self.qmap = torch.tensor(NF4, device=DEVICE)
        self.bf16 = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16, generator=gen)
                     for _ in range(self.count_bf16)]

    def dequantized(self, i, dtype, scale_dtype=None):
        """Weight i as the kernels compute it: table and absmax rounded to dtype, product rounded
        (the word gemv: table in bfloat16, absmax and product in float32: ``scale_dtype``)."""
        p = self.packed[i].view(self.n, self.k // 2).to(torch.int64)
        codes = torch.stack([p >> 4, p & 15], dim=-1).reshape(self.n, self.k)
        table = self.qmap.to(dtype).to(torch.float32)
        scale = self.absmax[i].view(self.n, self.k // self.bs).to(scale_dtype or dtype).to(torch.float32)
        return (table[codes] * scale.repeat_interleave(self.bs, dim=1)).to(scale_dtype or dtype)


def _override(cfg):
    """A tuner configuration as ``fourbit_plan`` override fields."""
    if cfg.get("kernel") == "word_gemv":
        return dict(kernel="word_gemv", block_n=cfg["BN"], words=cfg["SW"], num_warps=cfg["warps"],
                    split_k=cfg["SPLIT_K"], use_asm=USE_ASM)
    return dict(kernel="mma", block_m=cfg["BM"], block_n=cfg["BN"], block_k=cfg["BK"], num_warps=cfg["warps"],
                num_stages=cfg["stages"], split_k=cfg["SPLIT_K"], use_asm=USE_ASM)


def make_launch(ws, x, cfg):
    from qflax_kernels import fourbit_launch

    return fourbit_launch.matmul_launch(x.shape[0], ws.n, ws.k, ws.bs, x_dtype=str(x.dtype).removeprefix("torch."),
                                        nested=False, has_bias=False, override=_override(cfg))


def launch(ws, i, x, spec, outs):
    """Launches weight ``i``'s product into ``outs`` (out, partial, counter); returns Triton's compiled kernel."""
    from qflax_kernels import fourbit_launch, torch_launch

    if spec.outputs[2].zeroed:
        outs[2].zero_()
    weight = fourbit_launch.weight_inputs(ws.packed[i], ws.absmax[i], ws.qmap)
    return torch_launch.launch_into(spec, fourbit_launch.matmul_inputs(x, weight), outs)


def run_layers(ws, x, spec, outs):
    for i in range(ws.count):
        launch(ws, i, x, spec, outs[i])


def planned_config(m, n, k):
    """The configuration ``fourbit_plan`` picks (what the JAX launcher runs) for bfloat16 x."""
    from qflax_kernels import fourbit_plan

    plan = fourbit_plan.plan_matmul(m, n, k, 64, "bfloat16")
    if plan.kernel == "word_gemv":
        return dict(kernel="word_gemv", BN=plan.block_n, SW=plan.words, warps=plan.num_warps, SPLIT_K=plan.split_k)
    return dict(BM=plan.block_m, BN=plan.block_n, BK=plan.block_k, warps=plan.num_warps, stages=plan.num_stages,
                SPLIT_K=plan.split_k)


def configs_for(m, k):
    """Candidate launch configurations for ``m`` rows (those whose split divides K's blocks)."""
    kb = k // 64
    out = []
    if m == 1:
        for bn, sw, warps, split in ((8, 128, 4, 1), (16, 128, 4, 1), (4, 128, 4, 1), (8, 256, 8, 1), (16, 256, 8, 1),
                                     (32, 128, 4, 1), (8, 128, 4, 2), (16, 128, 4, 2), (4, 128, 4, 2), (16, 64, 2, 1)):
            if (k // 8) % (sw * split) == 0:
                out.append(dict(kernel="word_gemv", BN=bn, SW=sw, warps=warps, SPLIT_K=split))
        out += [dict(BM=16, BN=64, BK=128, warps=4, stages=4, SPLIT_K=4), dict(BM=16, BN=64, BK=64, warps=4, stages=4,
                                                                               SPLIT_K=8)]
    elif m <= 16:
        for bn, bk, stages, split in ((64, 64, 4, 4), (64, 64, 4, 8), (64, 128, 3, 4), (64, 128, 3, 8),
                                      (64, 256, 3, 4), (64, 256, 3, 8), (64, 256, 2, 4), (64, 128, 4, 4),
                                      (32, 256, 3, 2), (32, 256, 3, 4), (64, 256, 3, 2)):
            out.append(dict(BM=16, BN=bn, BK=bk, warps=4, stages=stages, SPLIT_K=split))
    elif m <= 64:
        for bn, bk, stages, split in ((64, 128, 3, 2), (64, 128, 3, 4), (64, 64, 4, 4), (128, 128, 3, 2),
                                      (128, 128, 3, 4), (64, 128, 3, 1)):
            out.append(dict(BM=64, BN=bn, BK=bk, warps=4, stages=stages, SPLIT_K=split))
    else:
        for bm, bn, bk, warps, split in ((256, 128, 64, 8, 1), (256, 128, 64, 8, 2), (128, 64, 128, 4, 1),
                                         (128, 64, 128, 4, 2), (256, 64, 64, 8, 1), (256, 64, 64, 8, 2),
                                         (128, 128, 64, 8, 2)):
            out.append(dict(BM=bm, BN=bn, BK=bk, warps=warps, stages=3, SPLIT_K=split))
    return [c for c in out if "BK" not in c or kb % (c["BK"] // 64 * c["SPLIT_K"]) == 0]


def result_row(k, n, m, cfg, seconds, bf16_seconds, rel_err):
    """One results row in BENCHMARKS.md's fields (device time of one kernel launch)."""
    return dict(op="matmul_4bit", quant="nf4", blocksize=64, M=m, K=k, N=n, dtype="bfloat16",
                ours_us=seconds * 1e6, baseline="torch_f_linear_cuda_graph", baseline_us=bf16_seconds * 1e6,
                ratio=bf16_seconds / seconds, path=f"triton:{cfg.get('kernel', 'mma')}", launcher="triton (torch "
                "tensors), L launches in one CUDA graph", cfg=cfg, rel_err=rel_err)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="8192x8192,4096x14336,4096x4096,14336x4096,8192x28672", help="KxN,...")
    parser.add_argument("--rows", default="1,16,64,256")
    parser.add_argument("--grid", default=None, help="KxN:m,m;KxN:m (overrides --shapes/--rows)")
    parser.add_argument("--budget-s", type=float, default=400)
    parser.add_argument("--max-configs", type=int, default=100)
    parser.add_argument("--planned", action="store_true",
                        help="time only fourbit_plan's own choice per (shape, M): the kernels' device time")
    args = parser.parse_args()
    deadline = time.time() + args.budget_s
    results = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", rows=[], errors=[],
                   command=" ".join(["python"] + sys.argv), date=time.strftime("%Y-%m-%d"),
                   versions=dict(torch=torch.__version__, triton=__import__("triton").__version__))
    grid = [(shape, args.rows) for shape in args.shapes.split(",")]
    if args.grid:
        grid = [tuple(part.split(":")) for part in args.grid.split(";")]
    for shape, rows in grid:
        k, n = (int(v) for v in shape.split("x"))
        ws = Weights(k, n)
        ref_w = {dt: ws.dequantized(0, dt).to(torch.float32) for dt in (torch.bfloat16, torch.float16)}
        ref_gemv = ws.dequantized(0, torch.bfloat16, scale_dtype=torch.float32).to(torch.float32)
        for m in (int(v) for v in rows.split(",")):
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            t_bf16 = time_graph(lambda: [torch.nn.functional.linear(x, w) for w in ws.bf16]) / ws.count_bf16
            best = None
            candidates = [planned_config(m, n, k)] if args.planned else configs_for(m, k)[: args.max_configs]
            for cfg in candidates:
                if time.time() > deadline:
                    break
                try:
                    from qflax_kernels import torch_launch

                    spec = make_launch(ws, x, cfg)
                    outs = [torch_launch.allocate_outputs(spec, DEVICE) for _ in range(ws.count)]
                    compiled = launch(ws, 0, x, spec, outs[0])
                    cfg = dict(cfg, regs=getattr(compiled, "n_regs", None),
                               smem=getattr(getattr(compiled, "metadata", None), "shared", None))
                    got = outs[0][0]
                    want = x.float() @ (ref_gemv if cfg.get("kernel") == "word_gemv" else ref_w[torch.bfloat16]).T
                    err = float((got.float() - want).norm() / want.norm())
                    t = time_graph(lambda: run_layers(ws, x, spec, outs)) / ws.count
                    row = result_row(k, n, m, cfg, t, t_bf16, err)
                    results["rows"].append(row)
                    if best is None or t < best[0]:
                        best = (t, cfg)
                    print(f"K={k} N={n} M={m} {cfg}: {t*1e6:7.1f}us bf16 {t_bf16*1e6:7.1f} ratio {t_bf16/t:5.2f} "
                          f"err {err:.2e}", flush=True)
                except Exception as e:  # a config that fails to compile or run is recorded and skipped
                    results["errors"].append(dict(K=k, N=n, M=m, cfg=cfg, error=repr(e)[:800]))
                    print(f"K={k} N={n} M={m} {cfg}: FAILED {type(e).__name__}: {str(e)[:800]}", flush=True)
            if best:
                print(f"BEST K={k} N={n} M={m}: {best[0]*1e6:.1f}us ({t_bf16/best[0]:.2f}x bf16) {best[1]}", flush=True)
            if m == 1:
                # fp16 correctness at the best configuration
                try:
                    xh = x.to(torch.float16)
                    cfg = best[1]
                    spec = make_launch(ws, xh, cfg)
                    from qflax_kernels import torch_launch

                    o = torch_launch.allocate_outputs(spec, DEVICE)
                    launch(ws, 0, xh, spec, o)
                    got = o[0]
                    want = xh.float() @ (ref_gemv if cfg.get("kernel") == "word_gemv" else ref_w[torch.float16]).T
                    print(f"fp16 check K={k} N={n}: rel err {float((got.float() - want).norm() / want.norm()):.2e}",
                          flush=True)
                except Exception as e:
                    print(f"fp16 check failed: {e!r}"[:800], flush=True)
        del ws
        torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
