"""The benchmark model's variables hold exactly what each layer kind uses (no stray jit arguments)."""

import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import llama_stack as ls  # noqa: E402


def _leaves(kind, shape):
    return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(ls.build_variables(kind, shape))}


def test_inference_kinds_carry_no_adapters_and_lora_kinds_do():
    shape = ls.Shape(layers=1, hidden=128, kv=32, mlp=256, head_dim=32, lora_rank=4)
    for kind in ls.KINDS:
        assert not any("lora" in leaf for leaf in _leaves(kind, shape)), kind
    for kind in ls.LORA_KINDS:
        assert sum("lora_a" in leaf for leaf in _leaves(kind, shape)) == len(ls.PROJECTIONS), kind
    # The variables still apply: nothing the layers need was dropped with the adapters.
    import jax.numpy as jnp
    x = jnp.ones((2, shape.hidden), jnp.bfloat16)
    for kind in ("nf4_dq", "int8_t0", "bf16"):
        variables = ls.build_variables(kind, shape)
        out = ls.Decoder(shape, kind).apply(variables, x)
        assert out.shape == x.shape
