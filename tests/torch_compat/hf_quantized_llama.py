"""A small random-weight Llama through transformers' BitsAndBytesConfig and peft's LoRA; prints JSON results.

Run as a script in a fresh process (``test_install_as_bitsandbytes`` runs it twice):

  python hf_quantized_llama.py torch_compat WORKDIR   # the real bitsandbytes blocked, torch_compat installed
  python hf_quantized_llama.py bitsandbytes WORKDIR   # bitsandbytes 0.49.2 itself (the oracle)

It builds a 2-layer LlamaForCausalLM from a config with seeded weights, saves it, loads it with
``load_in_4bit`` (NF4, double quantization) and ``load_in_8bit`` (LLM.int8, threshold 6), saves
and reloads the 4-bit model, then wraps it in a LoRA (q_proj, v_proj) with seeded adapters and
takes one backward pass and a merge. Nothing is downloaded.
"""

import importlib.abc
import json
import pathlib
import sys

IDS_SHAPE = (2, 12)
LORA_TARGETS = ["q_proj", "v_proj"]


class _BlockBitsandbytes(importlib.abc.MetaPathFinder):
    """Makes importing the real bitsandbytes fail, so only an installed stand-in can answer."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "bitsandbytes" or fullname.startswith("bitsandbytes."):
            raise ImportError(f"the real {fullname} is blocked in this process")
        return None


def _classes(model, base):
    return sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules() if isinstance(m, base)})


def _lora(model, torch, ids):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    gen = torch.Generator().manual_seed(1)
    for name, param in sorted(peft_model.named_parameters()):
        if "lora_B" in name:  # peft starts B at zero; seeded values make the adapters count
            param.data = 0.05 * torch.randn(param.shape, generator=gen)
    wrapped = {f"{type(m).__module__}.{type(m).__qualname__}": type(m.base_layer).__module__
               for m in peft_model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    out = peft_model(ids, labels=ids)
    out.loss.backward()
    grads = {n: float(p.grad.norm()) for n, p in sorted(peft_model.named_parameters()) if p.grad is not None}
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        merged = peft_model.merge_and_unload()(ids).logits[:, -1]
    return dict(wrapped=wrapped, loss=float(out.loss), logits=out.logits[:, -1].detach().tolist(), grads=grads,
                trainable=trainable, merged_logits=merged.tolist())


def main(library: str, workdir: str) -> dict:
    if library == "torch_compat":
        sys.meta_path.insert(0, _BlockBitsandbytes())
        import torch_compat

        torch_compat.install_as_bitsandbytes()
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    root = pathlib.Path(workdir)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    float_model = LlamaForCausalLM(config)
    float_model.save_pretrained(root / "float")
    ids = torch.randint(0, config.vocab_size, IDS_SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        float_logits = float_model(ids).logits[:, -1].tolist()
    result = dict(module_file=bnb.__file__, module_version=bnb.__version__, float_logits=float_logits)
    configs = {
        "4bit": (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32), bnb.nn.Linear4bit),
        "8bit": (BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0), bnb.nn.Linear8bitLt),
    }
    for mode, (quantization_config, base) in configs.items():
        model = LlamaForCausalLM.from_pretrained(root / "float", quantization_config=quantization_config,
                                                 dtype=torch.float32)
        # Read before any forward: bitsandbytes' CPU layer repacks its weight on its first eval call.
        weight = model.model.layers[0].self_attn.q_proj.weight.detach()
        stored = (weight.view(torch.uint8) if mode == "4bit" else weight).flatten()[:64].tolist()
        with torch.no_grad():
            logits = model(ids).logits[:, -1]
        result[mode] = dict(classes=_classes(model, base), count=sum(isinstance(m, base) for m in model.modules()),
                            logits=logits.tolist(), stored=stored)
        if mode == "4bit":
            model.save_pretrained(root / "nf4")
            reloaded = LlamaForCausalLM.from_pretrained(root / "nf4", dtype=torch.float32)
            with torch.no_grad():
                result[mode]["reloaded_logits"] = reloaded(ids).logits[:, -1].tolist()
            result[mode]["reloaded_classes"] = _classes(reloaded, base)
            result["lora"] = _lora(model, torch, ids)
    result["real_bitsandbytes_imported"] = any(
        getattr(m, "__file__", None) and "site-packages/bitsandbytes" in m.__file__
        for k, m in list(sys.modules.items()) if k.startswith("bitsandbytes"))
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
