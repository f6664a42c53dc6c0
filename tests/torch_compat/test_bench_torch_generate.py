"""``benchmarks/bench_torch_generate.py --tiny`` on CPU: the headline benchmark's code runs and its numbers make sense."""

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_torch_generate.py"


@pytest.mark.slow
def test_tiny_generate_benchmark_runs_and_agrees_with_bitsandbytes(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    spec = importlib.util.spec_from_file_location("bench_torch_generate", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "generate.json"
    bench.main(["--tiny", "--device", "cpu", "--repeats", "1", "--new-tokens", "4", "--prompt-tokens", "8",
                "--forward-tokens", "8", "--no-bf16", "--out", str(out)])
    results = json.loads(out.read_text())
    assert {"device", "versions", "date", "command", "rows"} <= set(results)
    rows = {(r["op"], r["quant"]): r for r in results["rows"]}
    assert set(rows) == {("generate (eager)", "nf4"), ("forward (no cache)", "nf4"),
                         ("generate (eager)", "int8"), ("forward (no cache)", "int8")}
    for quant in ("nf4", "int8"):
        gen = rows[("generate (eager)", quant)]
        for key in ("op", "quant", "M", "K", "N", "dtype", "ours_us", "baseline", "baseline_us", "ratio", "path"):
            assert key in gen
        assert gen["ours_us"] > 0 and gen["baseline_us"] > 0
        assert gen["ratio"] == pytest.approx(gen["baseline_us"] / gen["ours_us"])
        assert gen["path"].startswith("torch_compat DLPack")  # CPU: no kernels outside the interpreter
        # same weights quantized the same way as bitsandbytes: same greedy tokens, same logits up to rounding,
        # both a little away from the bfloat16 model
        assert gen["tokens_equal"] == 4
        assert gen["logits_cosine_vs_bitsandbytes"] > 0.999
        assert 0.9 < gen["logits_cosine_vs_bf16"] < 1.0
        assert gen["ours_model_bytes"] == gen["baseline_model_bytes"]
    # 4.1 bits per weight against 8 (the float embeddings and lm_head are shared)
    assert rows[("generate (eager)", "nf4")]["ours_model_bytes"] < rows[("generate (eager)", "int8")]["ours_model_bytes"]
