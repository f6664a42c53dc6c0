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


def test_outlier_columns_counts_the_columns_llm_int8_sends_through_its_float_path():
    import jax.numpy as jnp
    import numpy as np

    shape = ls.Shape(layers=2, hidden=128, kv=32, mlp=256, head_dim=32)
    planted = ls.outlier_feature_columns(shape.hidden, 3)
    variables = ls.build_variables("bf16", shape, outlier_features=3, outlier_gain=10.0, norm_gain=0.5)
    x = jax.random.normal(jax.random.key(3), (5, shape.hidden), jnp.float32).astype(jnp.bfloat16)
    counts = ls.outlier_columns(ls.Decoder(shape, "bf16"), variables, x)
    # Layer 0's q/k/v input by hand: RMSNorm of x times the gains (10 on the planted columns, 0.5 elsewhere).
    x32 = np.asarray(x, np.float32)
    gains = np.full(shape.hidden, 0.5, np.float32)
    gains[planted] = 10.0
    h = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5) * gains
    want = np.flatnonzero(np.any(np.abs(h) >= 6.0, axis=0))
    assert 1 <= len(want) and set(want) <= set(planted)
    assert counts["q_proj"][0] == counts["k_proj"][0] == counts["v_proj"][0] == len(want)
    assert set(counts) == set(ls.PROJECTIONS) and all(len(c) == shape.layers for c in counts.values())
    # Without planted features and unit gains the same input has no outlier column in front of q/k/v.
    plain = ls.build_variables("bf16", shape)
    assert np.all(np.asarray(plain["params"]["layers_0"]["attn_norm"]["scale"], np.float32) == 1.0)
    assert ls.outlier_columns(ls.Decoder(shape, "bf16"), plain, x)["q_proj"] == [0, 0]
