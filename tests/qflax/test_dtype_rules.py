"""The dtype rules of qflax/layers/dtypes.py hold, and hold the same way, in Linen and in NNX.

4-bit layers: the output has the input's dtype whatever ``compute_dtype`` is. 8-bit and SwitchBack
layers: the output has ``dtype`` (None: the input's). Embeddings: the table's dtype, Embed8bit its ``dtype``.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qflax import linen as ql
from qflax import nnx as qn

K, N = 64, 8
X = jax.random.normal(jax.random.key(0), (3, K), jnp.float32).astype(jnp.float16)
IDS = jnp.array([[1, 2], [3, 4]], jnp.int32)
BF16 = jnp.bfloat16

# (id, Linen layer, NNX factory, input, the output dtype the rule gives)
CASES = [
    ("Dense4bit-compute-none", ql.Dense4bit(N), lambda r: qn.Dense4bit(K, N, rngs=r), X, jnp.float16),
    ("Dense4bit-compute-bf16", ql.Dense4bit(N, compute_dtype=BF16),
     lambda r: qn.Dense4bit(K, N, compute_dtype=BF16, rngs=r), X, jnp.float16),
    ("LoRADense4bit-compute-bf16", ql.LoRADense4bit(N, compute_dtype=BF16, lora_rank=2), None, X, jnp.float16),
    ("Dense8bitLt-none", ql.Dense8bitLt(N), lambda r: qn.Dense8bitLt(K, N, rngs=r), X, jnp.float16),
    ("Dense8bitLt-bf16", ql.Dense8bitLt(N, dtype=BF16), lambda r: qn.Dense8bitLt(K, N, dtype=BF16, rngs=r), X, BF16),
    ("Dense8bitLt-trainable-f32", ql.Dense8bitLt(N, dtype=jnp.float32, has_fp16_weights=True),
     lambda r: qn.Dense8bitLt(K, N, dtype=jnp.float32, has_fp16_weights=True, rngs=r), X, jnp.float32),
    ("SwitchBackDense-bf16", ql.SwitchBackDense(N, dtype=BF16),
     lambda r: qn.SwitchBackDense(K, N, dtype=BF16, rngs=r), X, BF16),
    ("SwitchBackDense-none", ql.SwitchBackDense(N), lambda r: qn.SwitchBackDense(K, N, rngs=r), X, jnp.float16),
    ("StandardDense-bf16", ql.StandardDense(N, dtype=BF16),
     lambda r: qn.StandardDense(K, N, dtype=BF16, rngs=r), X, BF16),
    ("SwitchBackDenseBnb-bf16", ql.SwitchBackDenseBnb(N, dtype=BF16),
     lambda r: qn.SwitchBackDenseBnb(K, N, dtype=BF16, rngs=r), X, BF16),
    ("Embed-bf16-table", ql.Embed(10, 16, param_dtype=BF16),
     lambda r: qn.Embed(10, 16, param_dtype=BF16, rngs=r), IDS, BF16),
    ("Embed4bit-f16-table", ql.Embed4bit(10, 64, param_dtype=jnp.float16),
     lambda r: qn.Embed4bit(10, 64, param_dtype=jnp.float16, rngs=r), IDS, jnp.float16),
    ("Embed8bit-bf16", ql.Embed8bit(10, 16, dtype=BF16), lambda r: qn.Embed8bit(10, 16, dtype=BF16, rngs=r), IDS, BF16),
]


@pytest.mark.filterwarnings("ignore:Input type into")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_output_dtype_follows_the_rule_in_linen_and_nnx(case):
    # Abstract evaluation: the rules are about dtypes, and tracing decides them without compiling anything.
    _, linen_layer, make_nnx, x, expected = case
    variables = jax.eval_shape(linen_layer.init, jax.random.key(1), x)
    assert jax.eval_shape(linen_layer.apply, variables, x).dtype == expected
    if make_nnx is None:  # LoRADense4bit has no NNX twin (NNX uses nnx.LoRA over DenseNF4)
        return
    model = nnx.eval_shape(lambda: make_nnx(nnx.Rngs(0)))
    assert nnx.eval_shape(lambda m, v: m(v), model, x).dtype == expected


def test_has_fp16_weights_defaults_to_frozen_in_both():
    linen_vars = ql.Dense8bitLt(N).init(jax.random.key(0), X)
    assert "kernel" not in linen_vars["params"] and "weight" in linen_vars["quantized"]
    model = qn.Dense8bitLt(K, N, rngs=nnx.Rngs(0))
    assert not model.has_fp16_weights and isinstance(model.weight, qn.QuantizedWeight)
