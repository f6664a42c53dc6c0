"""transformers Llama generation with torch_compat's layers vs bitsandbytes' (BENCHMARKS.md: the model, not the kernel).

A ``LlamaForCausalLM`` is built from a config (16 layers, hidden 2048, MLP 8192, 32 heads, 8 KV heads,
vocabulary 32000; seeded random weights, bfloat16, nothing downloaded). For each format, every
``nn.Linear`` but ``lm_head`` is replaced by ``LinearNF4`` (double-quantized statistics, bf16
compute) or ``Linear8bitLt(threshold=6.0)`` from bitsandbytes (the peer, when importable) and from
torch_compat, quantized from the same float weights. Measured per library and format:

- greedy ``generate`` of 48 new tokens after a 16-token prompt: tokens/s (median of repeats),
  eager (dynamic cache) and compiled (static cache, ``torch.compile`` mode "reduce-overhead",
  fullgraph first, retried without it if that fails; recorded);
- one 512-token forward pass (no cache), eager;
- model bytes (parameters, buffers and quantization statistics) and the peak extra memory of
  one generate call (CUDA);
- agreement with bitsandbytes: the generated tokens, and the cosine of the prompt's last-token
  logits (also against the bfloat16 model).

The bfloat16 model itself is measured the same way, for context. Results go to
``benchmarks/results/torch_generate-<device>-<date>.json`` (BENCHMARKS.md §Method 7: rows with
``ours_us`` = time per generated token or per forward, ``baseline`` = bitsandbytes, ``ratio`` =
baseline / ours, ``path`` = the code path torch_compat took).

Usage:
  python benchmarks/bench_torch_generate.py                       # CUDA, the full model
  python benchmarks/bench_torch_generate.py --quants nf4 --modes compiled
  python benchmarks/bench_torch_generate.py --tiny --device cpu   # smoke test: 2 small layers, eager
"""

import argparse
import copy
import datetime
import gc
import os
import pathlib
import platform
import re
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = pathlib.Path(__file__).resolve().parent
# Only this folder (bench_env): the repository root would shadow Hugging Face's `kernels` package with ours.
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import bench_env  # noqa: E402
import torch_compat  # noqa: E402
from torch_compat import direct_path  # noqa: E402

MODELS = {
    "full": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024),
    "tiny": dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
}
OPS = {"nf4": direct_path.LINEAR_4BIT, "int8": direct_path.LINEAR_8BIT}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_float_model(size: str, device: torch.device, dtype=torch.bfloat16):
    """The seeded random-weight Llama, in ``dtype``, on ``device``, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def _quantized_linear(lib, quant: str, linear: torch.nn.Linear, device: torch.device):
    """``linear`` as ``lib``'s LinearNF4 / Linear8bitLt(threshold=6), quantized on ``device`` from its weights."""
    has_bias = linear.bias is not None
    if quant == "nf4":
        layer = lib.nn.LinearNF4(linear.in_features, linear.out_features, bias=has_bias,
                                 compute_dtype=torch.bfloat16, device="meta")
        layer.weight = lib.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=layer)
    else:
        layer = lib.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        # Int8Params quantize on their move from the CPU to the device.
        layer.weight = lib.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to(device)


def quantized_copy(float_model, lib, quant: str, device: torch.device):
    """A copy of ``float_model`` with every nn.Linear but lm_head replaced by ``lib``'s quantized layer."""
    model = copy.deepcopy(float_model)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is torch.nn.Linear and full != "lm_head":
                setattr(parent, name, _quantized_linear(lib, quant, child, device))
    return model.eval()


def model_bytes(model) -> int:
    """Bytes of every distinct tensor storage the model holds: parameters, buffers, quantization statistics."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and hasattr(state, "tensors"):
            tensors += [t for t in state.tensors() if t is not None]
        elif state is not None:  # bitsandbytes' QuantState
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if t is not None]
            if getattr(state, "state2", None) is not None:
                tensors += [state.state2.absmax, state.state2.code]
        # LLM.int8 row scales: on the weight until the first forward, then in the layer's state.
        for holder in (getattr(module, "weight", None), getattr(module, "state", None)):
            if isinstance(getattr(holder, "SCB", None), torch.Tensor):
                tensors.append(holder.SCB)
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device)] = storage.nbytes()
    return sum(seen.values())


def _generate_kwargs(new_tokens: int, compiled: bool, fullgraph: bool, backend: str) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled:
        from transformers import CompileConfig

        # "reduce-overhead" is inductor's mode; another backend (e.g. "cudagraphs": capture without
        # inductor's codegen, much quicker to compile) takes no mode.
        mode = "reduce-overhead" if backend == "inductor" else None
        kwargs.update(cache_implementation="static",
                      compile_config=CompileConfig(fullgraph=fullgraph, mode=mode, backend=backend))
    return kwargs


def time_generate(model, ids, new_tokens: int, repeats: int, compiled: bool, backend: str) -> dict:
    """Median seconds of a greedy generate, its tokens, peak extra memory, and whether fullgraph compiled."""
    device = ids.device
    fullgraph = compiled
    kwargs = _generate_kwargs(new_tokens, compiled, fullgraph, backend)
    record = dict(fullgraph=fullgraph if compiled else None, error=None)
    try:
        tokens = model.generate(ids, **kwargs)
    except Exception as err:  # noqa: BLE001 - a peer that breaks the graph still gets measured without fullgraph
        if not compiled:
            raise
        record.update(fullgraph=False, error=f"fullgraph: {type(err).__name__}: {str(err)[:300]}")
        torch._dynamo.reset()
        kwargs = _generate_kwargs(new_tokens, compiled, False, backend)
        tokens = model.generate(ids, **kwargs)
    for _ in range(2 if compiled else 0):  # cudagraph trees record, then replay
        model.generate(ids, **kwargs)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        tokens = model.generate(ids, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        record["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - before
    record.update(seconds=statistics.median(times), tokens=tokens[0, ids.shape[1]:].tolist())
    return record


def time_forward(model, ids, repeats: int) -> float:
    """Median seconds of one forward pass over ``ids`` without a cache."""
    model(ids, use_cache=False)
    times = []
    for _ in range(repeats):
        _sync(ids.device)
        start = time.perf_counter()
        model(ids, use_cache=False)
        _sync(ids.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def measure(model, args, prompt, long_ids, modes) -> dict:
    """Every figure of one model: generate per mode, the long forward, logits, bytes."""
    out = dict(model_bytes=model_bytes(model))
    with torch.no_grad():
        out["logits"] = model(prompt).logits[0, -1].float().cpu()
        out["forward_s"] = time_forward(model, long_ids, args.repeats)
        for mode in modes:
            try:
                out[mode] = time_generate(model, prompt, args.new_tokens, args.repeats, mode == "compiled",
                                          args.compile_backend)
            except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
                out[mode] = dict(seconds=None, tokens=None, fullgraph=None, error=f"{type(err).__name__}: {err}"[:500])
                print(f"{mode} failed: {out[mode]['error']}")
            torch._dynamo.reset()
    return out


def _per_token(record: dict, new_tokens: int):
    return None if record["seconds"] is None else record["seconds"] / new_tokens * 1e6


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _rows(quant, size, ours, peer, reference, path, modes, args) -> list:
    dims = MODELS[size]
    common = dict(quant=quant, K=dims["hidden_size"], N=dims["intermediate_size"], dtype="bfloat16",
                  layers=dims["num_hidden_layers"], path=path,
                  baseline=None if peer is None else f"bitsandbytes {peer['version']} "
                  f"{'LinearNF4' if quant == 'nf4' else 'Linear8bitLt(threshold=6)'}")
    agreement = dict(ours_model_bytes=ours["model_bytes"], logits_cosine_vs_bf16=_cosine(ours["logits"], reference))
    if peer is not None:
        agreement.update(baseline_model_bytes=peer["model_bytes"], logits_cosine_vs_bitsandbytes=_cosine(
            ours["logits"], peer["logits"]), bitsandbytes_logits_cosine_vs_bf16=_cosine(peer["logits"], reference))
    rows = []
    for mode in modes:
        mine = ours[mode]
        ours_us = _per_token(mine, args.new_tokens)
        row = dict(op=f"generate ({mode})", M=1, prompt=args.prompt_tokens, new_tokens=args.new_tokens,
                   ours_us=ours_us, tokens_per_s=None if ours_us is None else 1e6 / ours_us,
                   ours_fullgraph=mine["fullgraph"], ours_error=mine["error"],
                   ours_peak_extra_bytes=mine.get("peak_extra_bytes"), baseline_us=None, ratio=None,
                   **common, **agreement)
        if peer is not None:
            theirs = peer[mode]
            baseline_us = _per_token(theirs, args.new_tokens)
            row.update(baseline_us=baseline_us,
                       baseline_tokens_per_s=None if baseline_us is None else 1e6 / baseline_us,
                       baseline_fullgraph=theirs["fullgraph"], baseline_error=theirs["error"],
                       baseline_peak_extra_bytes=theirs.get("peak_extra_bytes"))
            if ours_us is not None and baseline_us is not None:
                same = [a == b for a, b in zip(mine["tokens"], theirs["tokens"])]
                row.update(ratio=baseline_us / ours_us, tokens_equal=sum(same),
                           tokens_equal_prefix=same.index(False) if False in same else len(same))
        rows.append(row)
    forward = dict(op="forward (no cache)", M=args.forward_tokens, ours_us=ours["forward_s"] * 1e6, **common)
    forward.update(baseline_us=None if peer is None else peer["forward_s"] * 1e6,
                   ratio=None if peer is None else peer["forward_s"] / ours["forward_s"])
    rows.append(forward)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2 small layers (CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quants", default="nf4,int8")
    parser.add_argument("--modes", default=None, help="eager,compiled (default: both on CUDA, eager elsewhere)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--forward-tokens", type=int, default=None, help="default 512 (tiny: 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="skip timing the bfloat16 model")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...; tiny: none)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = "tiny" if args.tiny else "full"
    modes = (args.modes or ("eager,compiled" if device.type == "cuda" else "eager")).split(",")
    args.forward_tokens = args.forward_tokens or (64 if args.tiny else 512)
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None

    float_model = build_float_model(size, device)
    gen = torch.Generator().manual_seed(1)
    vocab = MODELS[size]["vocab_size"]
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen).to(device)
    long_ids = torch.randint(0, vocab, (1, args.forward_tokens), generator=gen).to(device)
    reference = measure(float_model, args, prompt, long_ids, [] if args.no_bf16 else modes)
    rows = []
    if not args.no_bf16:
        for mode in modes:
            bf16_us = _per_token(reference[mode], args.new_tokens)
            rows.append(dict(op=f"generate ({mode})", quant="bf16", M=1, impl="torch nn.Linear", ours_us=bf16_us,
                             tokens_per_s=None if bf16_us is None else 1e6 / bf16_us,
                             fullgraph=reference[mode]["fullgraph"], error=reference[mode]["error"],
                             path="torch bf16"))
        rows.append(dict(op="forward (no cache)", quant="bf16", M=args.forward_tokens, impl="torch nn.Linear",
                         ours_us=reference["forward_s"] * 1e6, path="torch bf16"))
    for quant in args.quants.split(","):
        peer = None
        if bnb is not None:
            model = quantized_copy(float_model, bnb, quant, device)
            peer = dict(measure(model, args, prompt, long_ids, modes), version=bnb.__version__)
            del model
            gc.collect()
        model = quantized_copy(float_model, torch_compat, quant, device)
        ours = measure(model, args, prompt, long_ids, modes)
        path = direct_path.last_path(OPS[quant])
        path = ("torch_compat direct: qflax:: Triton kernel ops on the torch tensors" if path == direct_path.KERNEL
                else "torch_compat DLPack -> JAX (jitted qflax op)")
        rows += _rows(quant, size, ours, peer, reference["logits"], path, modes, args)
        del model
        gc.collect()
        for row in rows[-len(modes) - 1:]:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                   if k in ("op", "quant", "ours_us", "baseline_us", "ratio", "tokens_per_s", "tokens_equal",
                            "logits_cosine_vs_bitsandbytes", "ours_fullgraph", "baseline_fullgraph")})
    name = _device_name(device)
    results = dict(device=name, device_kind=device.type, versions=bench_env.versions(),
                   date=datetime.date.today().isoformat(), command=" ".join(["python"] + sys.argv),
                   model=dict(size=size, **MODELS[size]), rows=rows)
    out = args.out
    if out is None and not args.tiny:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        out = os.path.join(bench_env.RESULTS_DIR, f"torch_generate-{slug}-{results['date']}.json")
    if out:
        bench_env.save_results(results, out)
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
