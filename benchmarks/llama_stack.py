"""A Llama-3-8B-shaped decoder stack in Flax Linen whose linear layers are a constructor argument.

Per layer: RMSNorm, q/k/v projections (hidden 4096 -> 4096 / 1024 / 1024), an attention stand-in,
the output projection, RMSNorm, and a SwiGLU MLP (4096 -> 14336 -> 4096): 7 linears a layer, 224
in 32 layers, the shapes and the order a real decode step runs. The attention stand-in treats each
row as a sequence with an empty cache (each token attends to itself: the output is its own value,
repeated over the query heads of its group, gated by the query-key score so q and k stay live).
A KV cache changes neither the linears nor their cost.

Layer kinds: "bf16" (``nn.Dense``), "nf4", "nf4_dq" (double quantization, the default of
``DenseNF4``), "fp4", "int8_t0" / "int8_t6" (``Dense8bitLt`` threshold 0 / 6), and for training
"lora_bf16" / "lora_nf4" (a frozen base with rank-r adapters; ``LoRADense4bit`` for NF4).
Weights are random normal (std 0.02) in bfloat16, drawn per layer from one seed, and quantized by
qflax, so every format holds the same weights.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import qflax.linen as qnn
from qflax.quant import fourbit
from qflax.quant import int8 as int8_quant

KINDS = ("bf16", "nf4_dq", "nf4", "fp4", "int8_t0", "int8_t6")
LORA_KINDS = ("lora_bf16", "lora_nf4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Shape:
    """Model dimensions (defaults: Llama-3-8B)."""

    layers: int = 32
    hidden: int = 4096
    kv: int = 1024
    mlp: int = 14336
    head_dim: int = 128
    lora_rank: int = 16

    def out_features(self, proj: str) -> int:
        return {"k_proj": self.kv, "v_proj": self.kv, "gate_proj": self.mlp, "up_proj": self.mlp}.get(proj, self.hidden)

    def in_features(self, proj: str) -> int:
        return self.mlp if proj == "down_proj" else self.hidden


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.bfloat16)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


class LoRADenseBf16(nn.Module):
    """A frozen bf16 weight (collection "frozen") plus trainable rank-r adapters: LoRA's baseline."""

    features: int
    lora_rank: int = 16
    lora_alpha: float = 32.0

    @nn.compact
    def __call__(self, x):
        kernel = self.variable("frozen", "kernel", lambda: jnp.zeros((x.shape[-1], self.features), jnp.bfloat16)).value
        lora_a = self.param("lora_a", nn.initializers.lecun_normal(), (x.shape[-1], self.lora_rank), jnp.bfloat16)
        lora_b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features), jnp.bfloat16)
        update = (x @ lora_a) @ lora_b
        return x @ kernel + update * jnp.asarray(self.lora_alpha / self.lora_rank, x.dtype)


def linear_factory(kind: str, shape: Shape) -> Callable[[int, str], nn.Module]:
    """``make(features, name)`` building the linear layer of ``kind``."""
    if kind == "bf16":
        return lambda f, name: nn.Dense(f, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name=name)
    if kind in ("nf4", "nf4_dq", "fp4"):
        return lambda f, name: qnn.Dense4bit(f, quant_type=kind[:3], compress_statistics=kind == "nf4_dq",
                                             use_bias=False, param_dtype=jnp.bfloat16, name=name)
    if kind in ("int8_t0", "int8_t6"):
        return lambda f, name: qnn.Dense8bitLt(f, threshold=float(kind[-1]), use_bias=False, name=name)
    if kind == "lora_nf4":
        return lambda f, name: qnn.LoRADense4bit(f, quant_type="nf4", compress_statistics=True, use_bias=False,
                                                 param_dtype=jnp.bfloat16, lora_rank=shape.lora_rank,
                                                 lora_alpha=2.0 * shape.lora_rank, name=name)
    if kind == "lora_bf16":
        return lambda f, name: LoRADenseBf16(f, lora_rank=shape.lora_rank, lora_alpha=2.0 * shape.lora_rank,
                                             name=name)
    raise ValueError(f"kind must be one of {KINDS + LORA_KINDS}, got {kind!r}")


def attention_standin(q, k, v, shape: Shape):
    """Self-attention of rows that each see only themselves (see the module docstring)."""
    rows = q.shape[:-1]
    heads, kv_heads, d = shape.hidden // shape.head_dim, shape.kv // shape.head_dim, shape.head_dim
    group = heads // kv_heads
    q = q.reshape(*rows, kv_heads, group, d)
    k = k.reshape(*rows, kv_heads, 1, d)
    v = v.reshape(*rows, kv_heads, 1, d)
    score = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1, keepdims=True) / d ** 0.5
    out = jax.nn.sigmoid(score).astype(v.dtype) * v
    return out.reshape(*rows, shape.hidden)


class DecoderLayer(nn.Module):
    shape: Shape
    kind: str

    @nn.compact
    def __call__(self, x):
        linear = linear_factory(self.kind, self.shape)
        s = self.shape

        def project(proj, h):
            # Kept in "intermediates" only when that collection is mutable (outlier_columns); else a no-op.
            self.sow("intermediates", f"{proj}_input", h)
            return linear(s.out_features(proj), proj)(h)

        h = RMSNorm(name="attn_norm")(x)
        q, k, v = (project(p, h) for p in ("q_proj", "k_proj", "v_proj"))
        x = x + project("o_proj", attention_standin(q, k, v, s))
        h = RMSNorm(name="mlp_norm")(x)
        mlp = nn.silu(project("gate_proj", h)) * project("up_proj", h)
        return x + project("down_proj", mlp)


class Decoder(nn.Module):
    shape: Shape
    kind: str
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        for i in range(self.shape.layers):
            x = layer(self.shape, self.kind, name=f"layers_{i}")(x)
        return RMSNorm(name="final_norm")(x)


_quantize_4bit = jax.jit(fourbit.quantize_4bit, static_argnames=("blocksize", "quant_type", "compress_statistics"))
_quantize_int8 = jax.jit(int8_quant.quantize_rows)


def bf16_weight(key, shape: Shape, layer: int, proj: str):
    """The (out, in) bfloat16 weight of one projection (the same for every kind)."""
    k = jax.random.fold_in(jax.random.fold_in(key, layer), PROJECTIONS.index(proj))
    out_f, in_f = shape.out_features(proj), shape.in_features(proj)
    return (jax.random.normal(k, (out_f, in_f), jnp.float32) * 0.02).astype(jnp.bfloat16)


def _weight_variables(kind: str, w, shape: Shape, key):
    """{collection: {leaf: value}} of one projection of ``kind`` built from its (out, in) weight."""
    if kind == "bf16":
        return {"params": {"kernel": w.T}}
    if kind in ("nf4", "nf4_dq", "fp4", "lora_nf4"):
        q = _quantize_4bit(w, blocksize=64, quant_type=kind.removeprefix("lora_")[:3],
                           compress_statistics=kind in ("nf4_dq", "lora_nf4"))
        out = {"quantized": {"weight": q}}
        if kind != "lora_nf4":  # inference kinds carry no adapters (they would be unused jit arguments)
            return out
    elif kind in ("int8_t0", "int8_t6"):
        return {"quantized": {"weight": _quantize_int8(w)}}
    else:  # lora_bf16
        out = {"frozen": {"kernel": w.T}}
    out_f, in_f = w.shape
    a = (jax.random.normal(key, (in_f, shape.lora_rank), jnp.float32) / in_f ** 0.5).astype(jnp.bfloat16)
    out["params"] = {"lora_a": a, "lora_b": jnp.zeros((shape.lora_rank, out_f), jnp.bfloat16)}
    return out


# Gain of the planted outlier features (:func:`build_variables`): RMSNorm outputs are about unit
# normal, so most entries of a feature column scaled by 16 pass LLM.int8's threshold of 6.
OUTLIER_FEATURE_GAIN = 16.0


def outlier_columns(model: nn.Module, variables: dict, x: jax.Array, threshold: float = 6.0) -> dict:
    """How many input columns of each projection hold an entry ``|x| >= threshold``, layer by layer.

    The columns LLM.int8 at this threshold takes through its float path (``int8.outlier_mask``),
    counted on ``model``'s own activations (best a bf16 model: the quantized kinds see nearly the same).

    Args:
      model: a :class:`Decoder`.
      variables: its variables.
      x: ``(rows, hidden)`` input.
      threshold: LLM.int8's outlier threshold.

    Returns:
      ``{projection: [count in layer 0, layer 1, ...]}``.
    """
    def counts(variables, x):
        _, state = model.apply(variables, x, mutable=["intermediates"])
        layers = state["intermediates"]
        return {p: jnp.stack([jnp.sum(int8_quant.outlier_mask(layers[f"layers_{i}"][f"{p}_input"][0], threshold))
                              for i in range(model.shape.layers)]) for p in PROJECTIONS}

    return {p: [int(c) for c in v] for p, v in jax.jit(counts)(variables, x).items()}


def outlier_feature_columns(hidden: int, n: int) -> list:
    """The ``n`` hidden features that carry planted outliers: spread over the width, fixed."""
    return [(i * hidden) // n + 7 for i in range(n)] if n else []


def build_variables(kind: str, shape: Shape, seed: int = 0, weights=None, outlier_features: int = 0,
                    outlier_gain: float = OUTLIER_FEATURE_GAIN, norm_gain: float = 1.0) -> dict:
    """The model's variables for ``kind``: every projection from :func:`bf16_weight`.

    Args:
      kind: a layer kind.
      shape: model dimensions.
      seed: weight seed.
      weights: optional ``{(layer, proj): (out, in) bf16}`` to reuse instead of drawing again.
      outlier_features: plant this many systematic outlier features (as LLMs have: the same few
        hidden dimensions large in every token) through the RMSNorm gains in front of the q/k/v
        and gate/up projections; 0 plants none.
      outlier_gain: the planted features' RMSNorm gain.
      norm_gain: every other RMSNorm gain in front of a projection (the final norm keeps 1). With
        1 and these std-0.02 weights, gate/up outputs have std about 1.3, and silu(gate) * up, the
        input of down_proj, passes 6 in tens (1 row) to thousands (512 rows) of its 14336 columns
        without any planted feature (:func:`outlier_columns`); a gain below 1 leaves the outliers
        to the planted features.
    """
    key = jax.random.key(seed)
    variables: dict = {}

    def put(collection, path, leaves):
        node = variables.setdefault(collection, {})
        for p in path:
            node = node.setdefault(p, {})
        node.update(leaves)

    ones = jnp.ones((shape.hidden,), jnp.bfloat16)
    gains = jnp.full((shape.hidden,), norm_gain, jnp.bfloat16).at[
        jnp.asarray(outlier_feature_columns(shape.hidden, outlier_features), jnp.int32)].set(outlier_gain)
    for layer in range(shape.layers):
        name = f"layers_{layer}"
        put("params", (name, "attn_norm"), {"scale": gains})
        put("params", (name, "mlp_norm"), {"scale": gains})
        for proj in PROJECTIONS:
            w = weights[(layer, proj)] if weights is not None else bf16_weight(key, shape, layer, proj)
            adapter_key = jax.random.fold_in(jax.random.fold_in(key, 10_000 + layer), PROJECTIONS.index(proj))
            for collection, leaves in _weight_variables(kind, w, shape, adapter_key).items():
                put(collection, (name, proj), leaves)
    put("params", ("final_norm",), {"scale": ones})
    return variables
