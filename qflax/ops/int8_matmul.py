"""LLM.int8 matmul ``y = x @ W.T + bias`` (docs/int8.md) as differentiable JAX ops.

Activations are quantized per row to int8 (:func:`qflax.quant.int8_vectorwise_quant`), the
weight is int8 per row (:class:`qflax.quant.Int8Rows`), the product accumulates in int32 and
the epilogue scales by both row absmaxes / 127². With ``threshold > 0`` every activation
column that holds a value with ``|x| >= threshold`` is left out of the int8 product and goes
through a matmul in the input precision against the dequantized weight (bitsandbytes'
mixed-precision decomposition). The outlier columns are a boolean mask, not a list of indices:
the outlier product is ``where(mask, x, 0) @ dequant(W).T``, so every shape is static under
``jax.jit`` and there is one numeric path on every backend (bitsandbytes runs a different
float path when training on CPU; we do not).

Gradients (``jax.custom_vjp``):

* input: ``G @ dequant(W)``, returned in ``x``'s dtype (as bitsandbytes);
* bias: ``G`` summed over all leading dimensions;
* weight, :func:`matmul_8bit_trainable` only: the exact ``G^T X`` from the float operands.
  bitsandbytes 0.49.2 returns a wrong value here (docs/int8.md#gradients); we do not mirror it.
* The frozen :class:`Int8Rows` of :func:`matmul_8bit` gets a zero cotangent: it is a constant.
"""

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qflax.ops import dispatch, int8_kernels, int8_partitioning
from qflax.quant import int8 as int8_quant
from qflax.quant import validation
from qflax.quant.int8 import Int8Rows

OP_NAME = "matmul_8bit"


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise TypeError(f"threshold must be a Python number >= 0, got {type(threshold).__name__}")
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0 (0 disables outlier handling), got {threshold!r}")
    return float(threshold)


def _check_int8_rows(w: Int8Rows, in_features: int) -> None:
    if not isinstance(w, Int8Rows):
        raise TypeError(f"w must be an Int8Rows (codes int8 (out, in), scale float32 (out,)), got {type(w).__name__}")
    if w.codes.dtype != jnp.int8 or w.codes.ndim != 2:
        raise ValueError(f"w.codes must be a 2-D int8 array (out, in), got {w.codes.dtype} {tuple(w.codes.shape)}")
    if w.scale.dtype != jnp.float32 or tuple(w.scale.shape) != (w.codes.shape[0],):
        raise ValueError(
            f"w.scale (SCB) must be float32 of shape ({w.codes.shape[0]},) to match w.codes {tuple(w.codes.shape)}, "
            f"got {w.scale.dtype} {tuple(w.scale.shape)}"
        )
    if w.codes.shape[1] != in_features:
        raise ValueError(
            f"x's last dimension ({in_features}) must equal the weight's in_features ({w.codes.shape[1]})"
        )


def _check_bias(bias: Optional[jax.Array], out_features: int) -> Optional[jax.Array]:
    if bias is None:
        return None
    bias = validation.check_float_array(bias, "bias")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return bias


def _check_x(x) -> jax.Array:
    """Float activations ``(..., in)``; a batch of zero rows is fine and gives an empty result."""
    x = validation.check_float_array(x, "x", allow_empty=True)
    if x.ndim == 0:
        raise ValueError("x must have shape (..., in_features), got a scalar")
    return x


def _choose_path(backend: Optional[str], x: jax.Array, out_features: int) -> str:
    # The Triton path (qflax.ops.int8_kernels): fused LLM.int8 quantizer, int8 GEMM with the
    # dequant/bias epilogue and the outlier columns' float product inside the same kernel.
    # A batch of zero rows stays on XLA, whose ops all take empty operands (any backend asked for).
    if x.size == 0:
        return dispatch.choose(OP_NAME, "xla")
    unsupported = int8_kernels.unsupported_reason(x.dtype, x.shape[-1], out_features)
    return dispatch.choose(OP_NAME, backend, unsupported=unsupported)


def _matmul_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 ``a @ b.T`` of same-dtype operands."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _forward(x2: jax.Array, w: Int8Rows, bias: Optional[jax.Array], threshold: float, path: str) -> jax.Array:
    """The LLM.int8 product of 2-D ``x2 (M, K)``, float32 ``(M, N)`` including bias."""
    if path == "triton":
        # Same maths in Triton kernels; the output comes back in x's dtype (cast once, in the kernel).
        # (partitioning: the same kernels per shard when the weight is sharded; one device keeps
        # the bare kernel calls validated on the GPU.)
        if jax.device_count() > 1:
            return int8_partitioning.llm_int8_forward(x2, w.codes, w.scale, bias, threshold)
        return int8_kernels.run_llm_int8(x2, w.codes, w.scale, bias, threshold)
    codes, row_stats, mask = int8_quant.int8_vectorwise_quant(x2, threshold)
    acc = int8_quant.int8_linear_matmul(codes, w.codes)
    out = int8_quant.int8_mm_dequant(acc, row_stats, w.scale)
    if threshold > 0:
        # Outlier columns in the input precision against the int8-dequantized weight (docs/int8.md#matmul,
        # step 3). Their int8 codes are zero, so the two products add up without overlap.
        w_deq = int8_quant.int8_vectorwise_dequant(w.codes, w.scale).astype(x2.dtype)
        x_outliers = jnp.where(mask[None, :], x2, jnp.zeros((), x2.dtype))
        out = out + _matmul_t(x_outliers, w_deq)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out


def _grad_input(g2: jax.Array, w: Int8Rows, dtype) -> jax.Array:
    """``G @ dequant(W)`` in ``dtype``: the input gradient through the int8 weight."""
    w_deq = int8_quant.int8_vectorwise_dequant(w.codes, w.scale).astype(dtype)
    return jnp.matmul(g2.astype(dtype), w_deq, preferred_element_type=jnp.float32).astype(dtype)


def _grad_bias(g2: jax.Array, bias: Optional[jax.Array]) -> Optional[jax.Array]:
    if bias is None:
        return None
    return jnp.sum(g2.astype(jnp.float32), axis=0).astype(bias.dtype)


# ---------------------------------------------------------------------------------------------
# Frozen int8 weight.


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _matmul_frozen(x2, w, bias, threshold, path):
    return _forward(x2, w, bias, threshold, path).astype(x2.dtype)


def _matmul_frozen_fwd(x2, w, bias, threshold, path):
    return _matmul_frozen(x2, w, bias, threshold, path), (w, bias, jnp.zeros((), x2.dtype))


def _matmul_frozen_bwd(threshold, path, residuals, g2):
    w, bias, x_dtype_marker = residuals
    # None: a zero cotangent for the frozen weight, typed by JAX (inside shard_map, too).
    return _grad_input(g2, w, x_dtype_marker.dtype), None, _grad_bias(g2, bias)


_matmul_frozen.defvjp(_matmul_frozen_fwd, _matmul_frozen_bwd)


def matmul_8bit(
    x: jax.Array,
    w: Int8Rows,
    bias: Optional[jax.Array] = None,
    threshold: float = 0.0,
    backend: Optional[str] = None,
) -> jax.Array:
    """LLM.int8 ``x @ W.T + bias`` with a frozen row-wise int8 weight (bitsandbytes' Linear8bitLt).

    Example:
      >>> w = quant.quantize_rows(weight)            # (out, in) float -> Int8Rows
      >>> y = matmul_8bit(x, w, bias, threshold=6.0)  # (..., in) -> (..., out), x's dtype

    Args:
      x: float32/float16/bfloat16 activations ``(..., in)``.
      w: the weight in bitsandbytes' layout: int8 codes ``(out, in)`` and float32 row absmax
        ``(out,)`` (``SCB``).
      bias: optional float ``(out,)``.
      threshold: outlier threshold (>= 0); activation columns with any ``|x| >= threshold``
        are computed in the input precision. 0 disables outlier handling.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).

    Returns:
      ``(..., out)`` in ``x``'s dtype.

    Raises:
      TypeError: ``x`` or ``bias`` is not a float array, or ``w`` is not an Int8Rows.
      ValueError: negative threshold, or mismatched shapes (SCB length, in_features, bias).
    """
    x = _check_x(x)
    threshold = _check_threshold(threshold)
    _check_int8_rows(w, x.shape[-1])
    bias = _check_bias(bias, w.codes.shape[0])
    path = _choose_path(backend, x, w.codes.shape[0])
    out = _matmul_frozen(x.reshape(-1, x.shape[-1]), w, bias, threshold, path)
    return out.reshape(*x.shape[:-1], w.codes.shape[0])


# ---------------------------------------------------------------------------------------------
# Trainable float weight, quantized every call.


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _matmul_trainable(x2, weight, bias, threshold, path):
    return _forward(x2, int8_quant.quantize_rows(weight), bias, threshold, path).astype(x2.dtype)


def _matmul_trainable_fwd(x2, weight, bias, threshold, path):
    w = int8_quant.quantize_rows(weight)
    out = _forward(x2, w, bias, threshold, path).astype(x2.dtype)
    return out, (x2, w, bias, jnp.zeros((), weight.dtype))


def _matmul_trainable_bwd(threshold, path, residuals, g2):
    x2, w, bias, weight_dtype_marker = residuals
    # The exact weight gradient G^T X, with both operands in the input precision and float32
    # accumulation (not bitsandbytes 0.49.2's mis-scaled int8 product, docs/int8.md#gradients).
    grad_weight = jax.lax.dot_general(
        g2.astype(x2.dtype), x2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    ).astype(weight_dtype_marker.dtype)
    return _grad_input(g2, w, x2.dtype), grad_weight, _grad_bias(g2, bias)


_matmul_trainable.defvjp(_matmul_trainable_fwd, _matmul_trainable_bwd)


def matmul_8bit_trainable(
    x: jax.Array,
    weight: jax.Array,
    bias: Optional[jax.Array] = None,
    threshold: float = 0.0,
    backend: Optional[str] = None,
) -> jax.Array:
    """LLM.int8 ``x @ weight.T + bias`` with a float weight quantized on every call.

    The forward pass is the one of :func:`matmul_8bit` on ``quantize_rows(weight)``; the
    weight gradient is the exact ``G^T X`` (a straight-through estimate through the weight
    quantizer), so the float weight can be trained (bitsandbytes' ``has_fp16_weights=True``).

    Args:
      x: float activations ``(..., in)``.
      weight: float weight ``(out, in)`` (bitsandbytes' layout; a Flax kernel is ``weight.T``).
      bias: optional float ``(out,)``.
      threshold: outlier threshold (>= 0), as in :func:`matmul_8bit`.
      backend: "auto", "xla", "triton" or None.

    Returns:
      ``(..., out)`` in ``x``'s dtype.

    Raises:
      TypeError: ``x``, ``weight`` or ``bias`` is not a float array.
      ValueError: negative threshold or mismatched shapes.
    """
    x = _check_x(x)
    weight = validation.check_float_array(weight, "weight")
    threshold = _check_threshold(threshold)
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must be 2-D (out, in) with in = x's last dimension ({x.shape[-1]}), got {tuple(weight.shape)}"
        )
    bias = _check_bias(bias, weight.shape[0])
    path = _choose_path(backend, x, weight.shape[0])
    out = _matmul_trainable(x.reshape(-1, x.shape[-1]), weight, bias, threshold, path)
    return out.reshape(*x.shape[:-1], weight.shape[0])
