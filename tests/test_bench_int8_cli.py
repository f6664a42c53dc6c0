"""bench_int8.py refuses a malformed --gemm-sizes before it measures anything."""

import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_int8.py")


def test_gemm_sizes_must_be_three_positive_integers(tmp_path):
    run = subprocess.run([sys.executable, BENCH, "--parts", "gemm", "--gemm-sizes", "4096x4096x4096,64x64",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--gemm-sizes must be 'all', 'big' or MxNxK" in run.stderr and "'4096x4096x4096,64x64'" in run.stderr
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
