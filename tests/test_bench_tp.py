"""benchmarks/bench_tp.py in its CPU smoke mode (--cpu-devices 8 --tiny): the rows it records are right."""

import importlib.util
import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_tp.py")


@pytest.fixture(scope="module")
def bench_tp():
    spec = importlib.util.spec_from_file_location("bench_tp", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_tensor_parallel_run_on_8_cpu_devices(bench_tp, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(BENCH))
    import bench_env

    # The header's version probe imports torch, transformers and bitsandbytes: not what is tested here.
    monkeypatch.setattr(bench_env, "versions", lambda: {})
    out = tmp_path / "tp.json"
    bench_tp.main(["--cpu-devices", "8", "--tiny", "--layers", "1", "--kinds", "nf4_dq", "--rows", "1",
                   "--devices", "1,8", "--target-s", "0.005", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["env"]["NCCL_NVLS_ENABLE"] == "0" and results["device_counts"] == [1, 8]
    one, eight = sorted(results["rows"], key=lambda r: r["devices"])
    assert (one["quant"], one["M"], eight["devices"]) == ("nf4_dq", 1, 8)
    assert one["collectives"] == {} and one["max_rel_diff_vs_one_device"] == 0.0
    # Two psums a layer (o_proj, down_proj), nothing gathered; the outputs agree with one device.
    assert eight["collectives"] == {"all-reduce": 2 * results["layers"]}
    assert eight["max_rel_diff_vs_one_device"] < 2e-2
    # Each device holds an eighth of the split weights (plus the replicated norms and statistics).
    assert eight["weight_bytes_per_device"] < one["weight_bytes_per_device"] / 6
    assert eight["scaling"] > 0 and eight["ours_us"] > 0


def test_cpu_devices_must_fit_the_started_jax(bench_tp):
    with pytest.raises(SystemExit, match="--cpu-devices 64: JAX already started with 8 CPU devices"):
        bench_tp.configure_platform(64)
