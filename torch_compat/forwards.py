"""The pure JAX functions behind each torch_compat layer: ``fn(consts, *arrays, **static)``.

``consts`` holds frozen weights converted once (a Packed4bit or Int8Rows pytree); the
arrays come from torch tensors per call. Each function reproduces the dtype rules of the
bitsandbytes layer it serves and calls the qflax.ops op that does the work.
"""

import jax.numpy as jnp

from qflax.ops import (
    embed_4bit, embed_8bit, matmul_4bit, matmul_8bit, matmul_8bit_trainable, standard_matmul, switchback_bnb_matmul,
    switchback_matmul, switchback_matmul_prepared,
)


def linear_4bit(q, x, bias, compute_dtype=None):
    """Linear4bit: computed in ``compute_dtype`` (default the input dtype), returned in the input dtype."""
    return matmul_4bit(x, q, bias, compute_dtype=compute_dtype)


def linear_4bit_layer(consts, x, bias, compute_dtype=None):
    """Linear4bit's call: ``consts = (q, frozen_bias)``; a trainable ``bias`` (an array) replaces frozen_bias."""
    q, frozen_bias = consts
    return linear_4bit(q, x, frozen_bias if bias is None else bias, compute_dtype)


def embedding_4bit(q, ids, dtype):
    """Embedding4bit: the rows of ``ids``, in ``dtype``."""
    return embed_4bit(ids, q).astype(dtype)


def linear_8bit(w, x, bias, threshold=0.0):
    """Linear8bitLt with frozen int8 weights (``w`` an Int8Rows)."""
    return matmul_8bit(x, w, None if bias is None else bias.astype(x.dtype), threshold=threshold)


def linear_8bit_trainable(_, x, weight, bias, threshold=0.0):
    """Linear8bitLt with has_fp16_weights=True: weight quantized per call, true weight gradient."""
    return matmul_8bit_trainable(x, weight, None if bias is None else bias.astype(x.dtype), threshold=threshold)


def embedding_8bit(w, ids, dtype):
    """Embedding8bit: int8 rows times their scale / 127, in ``dtype``."""
    return embed_8bit(ids, w, dtype=jnp.dtype(dtype))


def switchback(_, x, weight, bias, variant="global"):
    """SwitchBackLinear in training (or unprepared eval) mode."""
    return switchback_matmul(x, weight, bias, variant=variant)


def switchback_prepared(w, x, bias, variant="global"):
    """SwitchBackLinear after ``prepare_for_eval`` (``w`` = (codes, scale))."""
    return switchback_matmul_prepared(x, w[0], w[1], bias, variant=variant)


def standard(_, x, weight, bias):
    """StandardLinear."""
    return standard_matmul(x, weight, bias)


def switchback_bnb(_, x, weight, bias, threshold=0.0):
    """SwitchBackLinearBnb (its intended semantics, docs/switchback.md#switchbacklinearbnb)."""
    return switchback_bnb_matmul(x, weight, None if bias is None else bias.astype(x.dtype), threshold=threshold)


# Functions whose vjp reads no array values: linear in every array argument, weights frozen in
# consts (the 4-bit and int8 backward passes use only the weight and the cotangent), or with no
# float argument at all (lookups). The bridge lets their inputs be modified in place after the call.
VJP_READS_NO_INPUTS = frozenset({linear_4bit, linear_4bit_layer, linear_8bit, embedding_4bit, embedding_8bit})
