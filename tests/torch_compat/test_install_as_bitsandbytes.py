"""transformers' BitsAndBytesConfig and peft's LoRA on torch_compat (``install_as_bitsandbytes``), vs bitsandbytes 0.49.2.

``hf_quantized_llama.py`` runs in two fresh processes: one with the real bitsandbytes blocked
from importing and torch_compat installed under its name, one with bitsandbytes 0.49.2 itself.
Both load the same small random Llama with ``load_in_4bit`` / ``load_in_8bit``, round-trip the
4-bit checkpoint and train a LoRA step over the 4-bit layers.
"""

import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import torch_compat
from torch_compat import install

SCRIPT = pathlib.Path(__file__).with_name("hf_quantized_llama.py")


def _run(library: str, workdir: pathlib.Path) -> dict:
    workdir.mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), library, str(workdir)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("hf")
    return _run("torch_compat", root / "ours"), _run("bitsandbytes", root / "bnb")


@pytest.mark.slow
def test_transformers_loads_torch_compat_layers(runs):
    ours, bnb = runs
    assert ours["module_file"] == torch_compat.__file__ and not ours["real_bitsandbytes_imported"]
    assert ours["module_version"] == install.BITSANDBYTES_VERSION
    assert ours["4bit"]["classes"] == ["torch_compat.nn.linear_4bit.Linear4bit"]
    assert ours["8bit"]["classes"] == ["torch_compat.nn.linear_8bit.Linear8bitLt"]
    assert ours["4bit"]["reloaded_classes"] == ours["4bit"]["classes"]
    # 2 layers x 7 projections each; lm_head stays float, as with bitsandbytes
    assert ours["4bit"]["count"] == ours["8bit"]["count"] == bnb["4bit"]["count"] == 14
    assert bnb["4bit"]["classes"] == ["bitsandbytes.nn.modules.Linear4bit"]


@pytest.mark.slow
def test_quantized_models_match_bitsandbytes(runs):
    ours, bnb = runs
    # same stored weights (NF4 + double quantization bytes, int8 codes) ...
    assert ours["4bit"]["stored"] == bnb["4bit"]["stored"]
    assert ours["8bit"]["stored"] == bnb["8bit"]["stored"]
    # ... same logits up to the compute path's rounding (NF4: far below the quantization error;
    # bitsandbytes' CPU int8 layer computes through another float path, so int8 agrees less closely)
    nf4_error = _relative(ours["4bit"]["logits"], ours["float_logits"])
    assert _relative(ours["4bit"]["logits"], bnb["4bit"]["logits"]) < 0.1 * nf4_error
    assert _relative(ours["8bit"]["logits"], bnb["8bit"]["logits"]) < 1e-2
    # a saved 4-bit checkpoint reloads to the same model
    np.testing.assert_array_equal(ours["4bit"]["reloaded_logits"], ours["4bit"]["logits"])


@pytest.mark.slow
def test_peft_lora_over_4bit_layers(runs):
    ours, bnb = runs
    lora, lora_bnb = ours["lora"], bnb["lora"]
    assert lora["wrapped"] == {"peft.tuners.lora.bnb.Linear4bit": "torch_compat.nn.linear_4bit"}
    assert lora["trainable"] == lora_bnb["trainable"] and all("lora_" in n for n in lora["trainable"])
    assert set(lora["grads"]) == set(lora["trainable"]) and all(v > 0 for v in lora["grads"].values())
    assert abs(lora["loss"] - lora_bnb["loss"]) < 1e-3
    assert _relative(lora["logits"], lora_bnb["logits"]) < 1e-2
    for name, norm in lora_bnb["grads"].items():
        assert abs(lora["grads"][name] - norm) < 1e-2 * norm
    # merging requantizes W + BA: the result moves by about the 4-bit error, not more
    merge_shift = _relative(lora["merged_logits"], lora["logits"])
    assert 0 < merge_shift < 2 * _relative(ours["4bit"]["logits"], ours["float_logits"])


@pytest.fixture
def no_bitsandbytes_modules():
    """Takes the real bitsandbytes (the suite's oracle) out of sys.modules for a test, and puts it back."""
    saved = {k: v for k, v in sys.modules.items() if k == "bitsandbytes" or k.startswith("bitsandbytes.")}
    for key in saved:
        del sys.modules[key]
    yield
    install.uninstall()
    for key in [k for k in sys.modules if k == "bitsandbytes" or k.startswith("bitsandbytes.")]:
        del sys.modules[key]
    sys.modules.update(saved)


def test_install_and_uninstall_in_process(no_bitsandbytes_modules):
    import importlib.metadata
    import importlib.util

    module = torch_compat.install_as_bitsandbytes()
    import bitsandbytes
    from bitsandbytes.nn import Linear4bit

    assert bitsandbytes is module and isinstance(module, types.ModuleType)
    assert bitsandbytes.nn is torch_compat.nn and Linear4bit is torch_compat.nn.Linear4bit
    assert bitsandbytes.functional is torch_compat.functional and bitsandbytes.matmul_4bit is torch_compat.matmul_4bit
    from bitsandbytes.nn.modules import Linear8bitLt  # where bitsandbytes defines its layers

    assert Linear8bitLt is torch_compat.nn.Linear8bitLt
    assert importlib.util.find_spec("bitsandbytes") is not None
    # the version comes from the stand-in's own metadata, whether or not bitsandbytes' distribution is installed
    assert isinstance(importlib.metadata.distribution("bitsandbytes"), install._Distribution)
    assert importlib.metadata.version("bitsandbytes") == install.BITSANDBYTES_VERSION
    assert torch_compat.install_as_bitsandbytes() is module  # idempotent
    install.uninstall()
    assert not install.is_installed() and not [k for k in sys.modules if k.startswith("bitsandbytes")]
    assert not isinstance(next(iter(importlib.metadata.distributions(name="bitsandbytes")), None), install._Distribution)


def test_install_refuses_to_shadow_an_imported_bitsandbytes(monkeypatch):
    real = types.ModuleType("bitsandbytes")
    monkeypatch.setitem(sys.modules, "bitsandbytes", real)
    with pytest.raises(RuntimeError, match="already imported"):
        torch_compat.install_as_bitsandbytes()
    assert sys.modules["bitsandbytes"] is real
