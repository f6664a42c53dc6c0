"""`import qflax` (and its Linen/NNX layers, the demo model and qflax_kernels) needs neither torch nor triton."""

import subprocess
import sys

BLOCK_OPTIONAL = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "triton", "jax_triton", "bitsandbytes"):
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, Blocker())
import jax.numpy as jnp
import qflax, qflax.linen, qflax.nnx, qflax_kernels, qflax.examples.minilm
from qflax import ops, quant
q = quant.quantize_4bit(jnp.ones((8, 64)), compress_statistics=True)
y = ops.matmul_4bit(jnp.ones((2, 64)), q)
assert y.shape == (2, 8), y.shape
assert ops.last_path("matmul_4bit") == "xla"
print("ok")
"""


def test_qflax_imports_and_runs_without_torch_or_triton():
    out = subprocess.run([sys.executable, "-c", BLOCK_OPTIONAL], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
