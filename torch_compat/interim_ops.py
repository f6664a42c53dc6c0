"""INTERIM: jnp versions of the qflax.ops this package wraps, used only while an op is missing from qflax.ops.

Each function has the signature of the qflax.ops op of the same name (weights in
bitsandbytes' ``(out, in)`` layout, ``y = x @ W.T + b``, output dtype = input dtype) and is
built from qflax.quant. ``torch_compat.forwards`` takes the qflax.ops version whenever it
exists; the lead deletes this file once all ops have landed.

Gradients use the straight-through identity ``y = stop_gradient(y_q - y_lin) + y_lin``,
where ``y_lin`` is a linear expression whose derivative is the one bitsandbytes defines
(e.g. ``G @ dequant(W)`` for the input, ``G^T X`` for a trainable weight).
"""

import jax
import jax.numpy as jnp

from qflax import quant

sg = jax.lax.stop_gradient


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _add_bias(y, bias):
    return y if bias is None else y + bias.astype(y.dtype)


def matmul_4bit(x, q, bias=None, compute_dtype=None, backend=None):
    """``x @ dequant(q).T + bias`` computed in ``compute_dtype`` (default x.dtype), returned in x.dtype."""
    cdt = jnp.dtype(compute_dtype or x.dtype)
    w = quant.dequantize_4bit(q.replace(dtype=cdt.name))
    y = _add_bias(x.astype(cdt) @ w.T, None if bias is None else bias.astype(cdt))
    return y.astype(x.dtype)


def embed_4bit(ids, q, backend=None):
    """Rows ``ids`` of the dequantized ``(num_embeddings, dim)`` table, in q.dtype."""
    return jnp.take(quant.dequantize_4bit(q), ids, axis=0)


def _int8_product(x2, codes, scale, threshold):
    """LLM.int8 forward in float32: int8 activations x int8 weight, outlier columns in float."""
    xq, row_stats, mask = quant.int8_vectorwise_quant(x2.astype(jnp.float16), threshold)
    acc = quant.int8_linear_matmul(xq, codes)
    y = quant.int8_mm_dequant(acc, row_stats, scale)
    if threshold > 0:
        w_deq = quant.int8_vectorwise_dequant(codes, scale)
        y = y + (x2.astype(jnp.float32) * mask.astype(jnp.float32)[None, :]) @ w_deq.T
    return y


def matmul_8bit(x, w, bias=None, threshold=0.0, backend=None):
    """LLM.int8 ``x @ W.T + b`` with frozen int8 weights; input gradient ``G @ dequant(W)``."""
    x2 = _flat(x)
    w_deq = quant.int8_vectorwise_dequant(w.codes, w.scale).astype(x.dtype)
    y_lin = x2 @ w_deq.T
    y = sg(_int8_product(sg(x2), w.codes, w.scale, threshold).astype(x.dtype) - y_lin) + y_lin
    return _add_bias(y, bias).reshape(*x.shape[:-1], -1)


def matmul_8bit_trainable(x, weight, bias=None, threshold=0.0, backend=None):
    """LLM.int8 with a float weight quantized every call; gradients ``G @ dequant(W)`` and ``G^T X``."""
    x2 = _flat(x)
    rows = quant.quantize_rows(sg(weight))
    w_deq = quant.int8_vectorwise_dequant(rows.codes, rows.scale).astype(x.dtype)
    y_x = x2 @ w_deq.T
    y_w = sg(x2) @ weight.astype(x.dtype).T
    y_q = _int8_product(sg(x2), rows.codes, rows.scale, threshold).astype(x.dtype)
    y = sg(y_q - y_x - y_w) + y_x + y_w
    return _add_bias(y, bias).reshape(*x.shape[:-1], -1)


def embed_8bit(ids, w, dtype=None, backend=None):
    """``codes[ids] * scale[ids] / 127`` in ``dtype`` (float32 by default)."""
    rows = jnp.take(w.codes, ids, axis=0).astype(jnp.float32)
    scale = jnp.take(w.scale, ids, axis=0).astype(jnp.float32)[..., None]
    return (rows * (scale / jnp.float32(127))).astype(dtype or jnp.float32)
