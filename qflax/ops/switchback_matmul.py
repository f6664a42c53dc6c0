"""SwitchBack matmuls (docs/switchback.md): int8 forward and input gradient, 16-bit weight gradient.

Every op computes ``y = x @ weight.T + bias`` with ``weight`` in bitsandbytes' ``(out, in)``
layout and returns ``x.dtype``. Leading dimensions of ``x`` are flattened into rows outside
the ``custom_vjp`` (a reshape differentiates for free), so the vjp rules see ``X (M, K)``.

The variants differ only in how each int8 product is quantized (the table of docs/switchback.md#switchbacklinear):

=====================  ============================  ================================  ===========================
variant                forward                       grad_x                            grad_W (input precision)
=====================  ============================  ================================  ===========================
global                 row-wise X  x global W        row-wise G  x global W^T          G^T X (float X saved)
vectorwise             row-wise X  x row-wise W      row-wise G  x column-wise W       G^T X (float X saved)
global_mem_efficient   row-wise X  x global W        row-wise G  x saved int8 W        G^T dequant(int8 X, row scales)
=====================  ============================  ================================  ===========================

``switchback_bnb_matmul`` is bitsandbytes' SwitchBackBnb as intended (docs/switchback.md#switchbacklinearbnb; the 0.49.2
module raises on every call): an LLM.int8 forward with optional outlier columns in float,
``grad_x`` through the dequantized int8 weight, and ``grad_W = G^T X`` in full precision.
``standard_matmul`` is the float reference with the same explicit vjp structure.

All int8 products accumulate in int32 and are dequantized in float32; every float product
takes its operands in the input dtype and accumulates in float32.
"""

import math
from functools import partial
from types import SimpleNamespace
from typing import Optional

import jax
import jax.numpy as jnp

from qflax.ops import dispatch, int8_kernels
from qflax.quant import validation
from qflax.quant.int8 import int8_linear_matmul, int8_mm_dequant, int8_vectorwise_dequant, int8_vectorwise_quant
from qflax.quant.switchback import (
    dequantize_rowwise,
    quantize_columnwise_and_transpose,
    quantize_global,
    quantize_global_transpose,
    quantize_rowwise,
)

VARIANTS = ("global", "vectorwise", "global_mem_efficient")
PREPARED_VARIANTS = ("global", "vectorwise")


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _int8_matmul_dequant(a_codes, b_codes, a_scale, b_scale):
    """float32 ``dequant(a) @ dequant(b).T`` from int8 ``a (M, K)``, ``b (N, K)`` and their absmax.

    ``a_scale`` is per row of ``a`` ``(M,)``; ``b_scale`` is per row of ``b`` ``(N,)`` or one
    tensor-wide value ``(1,)`` (bitsandbytes' int8_matmul_rowwise_dequantize and
    int8_matmul_mixed_dequantize).
    """
    b_scale = jnp.broadcast_to(b_scale.astype(jnp.float32), (b_codes.shape[0],))
    return int8_mm_dequant(int8_linear_matmul(a_codes, b_codes), a_scale, b_scale)


# The quantizers of each path: the XLA references, or their fused Triton twins (same codes).
_XLA_QUANTIZERS = SimpleNamespace(
    quantize_rowwise=quantize_rowwise,
    quantize_global=quantize_global,
    quantize_global_transpose=quantize_global_transpose,
    quantize_columnwise_and_transpose=quantize_columnwise_and_transpose,
)


def _quantizers(path: str):
    return int8_kernels if path == "triton" else _XLA_QUANTIZERS


def _int8_linear(a_codes, a_scale, b_codes, b_scale, bias, dtype, path: str):
    """``dequant(a) @ dequant(b).T (+ bias)`` in ``dtype``: XLA, or the Triton GEMM with the epilogue fused."""
    if path == "triton":
        return int8_kernels.run_int8_gemm(a_codes, a_scale, b_codes, b_scale, bias, dtype)
    return _finish(_int8_matmul_dequant(a_codes, b_codes, a_scale, b_scale), bias, dtype)


def _choose(op: str, backend, x, weight_shape) -> str:
    """The path for one call: the int8 kernels take float16/bfloat16/float32 and rows up to their limit."""
    # A batch of zero rows stays on XLA, whose ops all take empty operands (any backend asked for).
    if x.size == 0:
        return dispatch.choose(op, "xla")
    unsupported = int8_kernels.unsupported_reason(x.dtype, weight_shape[1], weight_shape[0])
    return dispatch.choose(op, backend, unsupported=unsupported)


def _float_matmul(a, b, contract_a: int, contract_b: int, dtype):
    """``a`` and ``b`` contracted over one axis each, operands cast to ``dtype``, float32 accumulation."""
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (((contract_a,), (contract_b,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def _weight_grad(g, x):
    """``G^T X`` ``(out, in)`` with both operands in G's (the input) dtype, float32 accumulation."""
    return _float_matmul(g, x, 0, 0, g.dtype)


def _bias_grad(g, bias):
    return None if bias is None else jnp.sum(g.astype(jnp.float32), axis=0).astype(bias.dtype)


def _finish(out_f32, bias, dtype):
    """Adds the bias in float32 and casts to the output dtype (the input dtype)."""
    if bias is not None:
        out_f32 = out_f32 + bias.astype(jnp.float32)
    return out_f32.astype(dtype)


def _check_args(x, weight, bias, op: str):
    """Validates the common arguments (zero rows allowed: an empty batch) and returns ``x`` and ``weight``."""
    x = validation.check_float_array(x, "x", allow_empty=True)
    weight = validation.check_float_array(weight, "weight")
    if weight.ndim != 2:
        raise ValueError(f"{op}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x's last dimension must equal weight's in_features; got x shape {tuple(x.shape)} "
            f"and weight shape {tuple(weight.shape)} (weight is (out_features, in_features))"
        )
    _check_bias(bias, weight.shape[0], op)
    return x, weight


def _check_bias(bias, out_features: int, op: str):
    if bias is None:
        return
    validation.check_float_array(bias, "bias")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{op}: bias must have shape ({out_features},), got {tuple(bias.shape)}")


def _apply_2d(fn, x, *args):
    """Runs ``fn`` on ``x`` flattened to rows and restores the leading dimensions."""
    lead = x.shape[:-1]
    out = fn(x.reshape(-1, x.shape[-1]), *args)
    return out.reshape(*lead, out.shape[-1])


# --------------------------------------------------------------------------------------------
# SwitchBack, global: row-wise X x tensor-wise W
# --------------------------------------------------------------------------------------------


def _global_forward(x, weight, bias, path):
    q = _quantizers(path)
    x_codes, x_scale = q.quantize_rowwise(x)
    w_codes, w_scale = q.quantize_global(weight)
    return _int8_linear(x_codes, x_scale, w_codes, w_scale, bias, x.dtype, path)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _switchback_global(x, weight, bias, path):
    return _global_forward(x, weight, bias, path)


def _switchback_global_fwd(x, weight, bias, path):
    return _global_forward(x, weight, bias, path), (x, weight, bias)


def _switchback_global_bwd(path, residuals, g):
    x, weight, bias = residuals
    q = _quantizers(path)
    g_codes, g_scale = q.quantize_rowwise(g)
    # W^T quantized with the tensor-wide absmax, laid out (in, out) so G @ W is a row-by-row product.
    wt_codes, w_scale = q.quantize_global_transpose(weight)
    grad_x = _int8_linear(g_codes, g_scale, wt_codes, w_scale, None, x.dtype, path)
    grad_w = _weight_grad(g, x).astype(weight.dtype)
    return grad_x, grad_w, _bias_grad(g, bias)


_switchback_global.defvjp(_switchback_global_fwd, _switchback_global_bwd)


# --------------------------------------------------------------------------------------------
# SwitchBack, vector-wise: row-wise X x row-wise W; backward row-wise G x column-wise W
# --------------------------------------------------------------------------------------------


def _vectorwise_forward(x, weight, bias, path):
    q = _quantizers(path)
    x_codes, x_scale = q.quantize_rowwise(x)
    w_codes, w_scale = q.quantize_rowwise(weight)
    return _int8_linear(x_codes, x_scale, w_codes, w_scale, bias, x.dtype, path)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _switchback_vectorwise(x, weight, bias, path):
    return _vectorwise_forward(x, weight, bias, path)


def _switchback_vectorwise_fwd(x, weight, bias, path):
    return _vectorwise_forward(x, weight, bias, path), (x, weight, bias)


def _switchback_vectorwise_bwd(path, residuals, g):
    x, weight, bias = residuals
    q = _quantizers(path)
    g_codes, g_scale = q.quantize_rowwise(g)
    # One scale per input feature (column of W): the dimension grad_x keeps.
    wt_codes, w_col_scale = q.quantize_columnwise_and_transpose(weight)
    grad_x = _int8_linear(g_codes, g_scale, wt_codes, w_col_scale, None, x.dtype, path)
    grad_w = _weight_grad(g, x).astype(weight.dtype)
    return grad_x, grad_w, _bias_grad(g, bias)


_switchback_vectorwise.defvjp(_switchback_vectorwise_fwd, _switchback_vectorwise_bwd)


# --------------------------------------------------------------------------------------------
# SwitchBack, global, memory-efficient: keeps int8 X and W (not float X) for the backward pass
# --------------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _switchback_global_mem_efficient(x, weight, bias, path):
    return _global_forward(x, weight, bias, path)


def _switchback_global_mem_efficient_fwd(x, weight, bias, path):
    q = _quantizers(path)
    x_codes, x_scale = q.quantize_rowwise(x)
    w_codes, w_scale = q.quantize_global(weight)
    out = _int8_linear(x_codes, x_scale, w_codes, w_scale, bias, x.dtype, path)
    # Zero-size arrays carry the dtypes the backward pass must return, without keeping x or W alive.
    dtype_tags = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), weight.dtype))
    bias_tag = None if bias is None else jnp.zeros((0,), bias.dtype)
    return out, (x_codes, x_scale, w_codes, w_scale, dtype_tags, bias_tag)


def _switchback_global_mem_efficient_bwd(path, residuals, g):
    x_codes, x_scale, w_codes, w_scale, (x_tag, w_tag), bias_tag = residuals
    g_codes, g_scale = _quantizers(path).quantize_rowwise(g)
    # G @ W with W (out, in): the right operand of a@b.T must be W^T, i.e. the saved codes transposed.
    grad_x = _int8_linear(g_codes, g_scale, w_codes.T, w_scale, None, x_tag.dtype, path)
    x_rebuilt = dequantize_rowwise(x_codes, x_scale).astype(x_tag.dtype)
    grad_w = _weight_grad(g, x_rebuilt).astype(w_tag.dtype)
    grad_b = None if bias_tag is None else _bias_grad(g, bias_tag)
    return grad_x, grad_w, grad_b


_switchback_global_mem_efficient.defvjp(_switchback_global_mem_efficient_fwd, _switchback_global_mem_efficient_bwd)

_VARIANT_FNS = {
    "global": _switchback_global,
    "vectorwise": _switchback_vectorwise,
    "global_mem_efficient": _switchback_global_mem_efficient,
}


def switchback_matmul(
    x: jax.Array,
    weight: jax.Array,
    bias: Optional[jax.Array] = None,
    variant: str = "global",
    backend: Optional[str] = None,
) -> jax.Array:
    """SwitchBack ``x @ weight.T + bias``: int8 forward and input gradient, 16-bit weight gradient.

    Args:
      x: float32/float16/bfloat16 ``(..., in_features)``; any number of leading dimensions.
      weight: float ``(out_features, in_features)`` (bitsandbytes' layout), trainable.
      bias: optional float ``(out_features,)``.
      variant: "global" (tensor-wise weight scale), "vectorwise" (per-row weight scale in the
        forward pass, per-column in the backward pass) or "global_mem_efficient" (as global,
        but the backward pass rebuilds X from its int8 codes instead of keeping it in float).
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).

    Returns:
      ``(..., out_features)`` in ``x.dtype``. Gradients: ``weight`` and ``bias`` gradients in
      their own dtypes, ``x``'s in ``x.dtype``.

    Example:
      >>> y = switchback_matmul(x, w, b, variant="vectorwise")
      >>> gx, gw = jax.grad(lambda x, w: switchback_matmul(x, w).sum(), (0, 1))(x, w)
    """
    validation.check_choice(variant, VARIANTS, "variant")
    x, weight = _check_args(x, weight, bias, "switchback_matmul")
    path = _choose("switchback_matmul", backend, x, weight.shape)
    return _apply_2d(_VARIANT_FNS[variant], x, weight, bias, path)


def switchback_matmul_prepared(
    x: jax.Array,
    w_codes: jax.Array,
    w_scale: jax.Array,
    bias: Optional[jax.Array] = None,
    variant: str = "global",
    backend: Optional[str] = None,
) -> jax.Array:
    """Inference-mode SwitchBack matmul with a weight quantized once (bitsandbytes' prepare_for_eval).

    Gives the same output as :func:`switchback_matmul` with the weight the codes came from.
    It is for evaluation only: its gradients are zero (rounding), so train with
    :func:`switchback_matmul`.

    Args:
      x: float ``(..., in_features)``.
      w_codes: int8 ``(out_features, in_features)``.
      w_scale: float32 absmax: ``(1,)`` for "global" (from ``quantize_global``), ``(out_features,)``
        for "vectorwise" (from ``quantize_rowwise``).
      bias: optional float ``(out_features,)``.
      variant: "global" or "vectorwise" ("global_mem_efficient" prepares like "global").
      backend: "auto", "xla", "triton" or None.

    Returns:
      ``(..., out_features)`` in ``x.dtype``.
    """
    validation.check_choice(variant, PREPARED_VARIANTS, "variant")
    x = validation.check_float_array(x, "x", allow_empty=True)
    if x.ndim == 0:
        raise ValueError("switchback_matmul_prepared: x must have shape (..., in_features), got a scalar")
    if w_codes.dtype != jnp.int8 or w_codes.ndim != 2:
        raise TypeError(f"w_codes must be a 2-D int8 array, got {w_codes.dtype} of shape {tuple(w_codes.shape)}")
    out_features, in_features = w_codes.shape
    want_scale = (1,) if variant == "global" else (out_features,)
    if tuple(w_scale.shape) != want_scale:
        raise ValueError(f"w_scale must have shape {want_scale} for variant {variant!r}, got {tuple(w_scale.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"switchback_matmul_prepared: x's last dimension must equal w_codes' in_features; got x shape "
            f"{tuple(x.shape)} and w_codes shape {tuple(w_codes.shape)}"
        )
    _check_bias(bias, out_features, "switchback_matmul_prepared")
    # Inference only on the Triton path: the kernels have no autodiff rules (on the XLA path the
    # gradient through the activation quantizer is zero almost everywhere anyway).
    path = _choose("switchback_matmul_prepared", backend, x, w_codes.shape)

    def run(x2):
        x_codes, x_scale = _quantizers(path).quantize_rowwise(x2)
        return _int8_linear(x_codes, x_scale, w_codes, w_scale, bias, x2.dtype, path)

    return _apply_2d(run, x)



# --------------------------------------------------------------------------------------------
# Float reference with the same explicit vjp structure (bitsandbytes' StandardLinear)
# --------------------------------------------------------------------------------------------


def _standard_forward(x, weight, bias):
    return _finish(_float_matmul(x, weight, 1, 1, x.dtype), bias, x.dtype)


@jax.custom_vjp
def _standard(x, weight, bias):
    return _standard_forward(x, weight, bias)


def _standard_fwd(x, weight, bias):
    return _standard_forward(x, weight, bias), (x, weight, bias)


def _standard_bwd(residuals, g):
    x, weight, bias = residuals
    grad_x = _float_matmul(g, weight, 1, 0, g.dtype).astype(x.dtype)
    return grad_x, _weight_grad(g, x).astype(weight.dtype), _bias_grad(g, bias)


_standard.defvjp(_standard_fwd, _standard_bwd)


def standard_matmul(x: jax.Array, weight: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    """Float ``x @ weight.T + bias`` with SwitchBack's vjp structure (bitsandbytes' StandardLinear).

    Args:
      x: float ``(..., in_features)``.
      weight: float ``(out_features, in_features)``; used in ``x.dtype``.
      bias: optional float ``(out_features,)``.

    Returns:
      ``(..., out_features)`` in ``x.dtype``.
    """
    x, weight = _check_args(x, weight, bias, "standard_matmul")
    return _apply_2d(_standard, x, weight, bias)


# --------------------------------------------------------------------------------------------
# SwitchBackBnb: LLM.int8 forward, grad_x via the int8 weight, 16-bit weight gradient
# (docs/switchback.md#switchbacklinearbnb)
# --------------------------------------------------------------------------------------------


def _bnb_forward(x, weight, bias, threshold, path):
    if path == "triton":
        # Fused: LLM.int8 activation quantizer, int8 GEMM, and the outlier columns gathered and
        # multiplied with the float weight's columns inside the GEMM (no full-width float product).
        w_codes, w_scale = int8_kernels.quantize_rows(weight)
        out = int8_kernels.run_llm_int8(x, w_codes, w_scale, bias, threshold, outlier_weight=weight.astype(x.dtype))
        return out, (w_codes, w_scale)
    x_codes, x_scale, outliers = int8_vectorwise_quant(x, threshold)
    w_codes, w_scale, _ = int8_vectorwise_quant(weight)
    out = _int8_matmul_dequant(x_codes, w_codes, x_scale, w_scale)
    if threshold > 0:
        # Outlier columns (zeroed in the int8 codes) go through the float weight's columns. A
        # column mask keeps shapes static; the full-width product costs what the int8 one does.
        x_outliers = jnp.where(outliers[None, :], x, jnp.zeros((), x.dtype))
        out = out + _float_matmul(x_outliers, weight, 1, 1, x.dtype)
    return _finish(out, bias, x.dtype), (w_codes, w_scale)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _switchback_bnb(x, weight, bias, threshold, path):
    return _bnb_forward(x, weight, bias, threshold, path)[0]


def _switchback_bnb_fwd(x, weight, bias, threshold, path):
    out, (w_codes, w_scale) = _bnb_forward(x, weight, bias, threshold, path)
    return out, (x, w_codes, w_scale, jnp.zeros((0,), weight.dtype), bias)


def _switchback_bnb_bwd(threshold, path, residuals, g):
    del threshold, path
    x, w_codes, w_scale, w_tag, bias = residuals
    w_dequant = int8_vectorwise_dequant(w_codes, w_scale)
    grad_x = _float_matmul(g, w_dequant, 1, 0, g.dtype).astype(x.dtype)
    return grad_x, _weight_grad(g, x).astype(w_tag.dtype), _bias_grad(g, bias)


_switchback_bnb.defvjp(_switchback_bnb_fwd, _switchback_bnb_bwd)


def switchback_bnb_matmul(
    x: jax.Array,
    weight: jax.Array,
    bias: Optional[jax.Array] = None,
    threshold: float = 0.0,
    backend: Optional[str] = None,
) -> jax.Array:
    """bitsandbytes' SwitchBackBnb as intended: LLM.int8 forward, 16-bit weight gradient (docs/switchback.md).

    Forward: row-wise int8 ``x`` times row-wise int8 ``weight``; with ``threshold > 0`` every
    column of ``x`` holding an ``|x| >= threshold`` is left out of the int8 product and
    multiplied in float with the float weight's matching columns. Backward:
    ``grad_x = G @ dequant(int8 weight)``, ``grad_W = G^T X`` in the input precision,
    ``grad_bias = G.sum(rows)``.

    Args:
      x: float ``(..., in_features)``.
      weight: float ``(out_features, in_features)``, trainable.
      bias: optional float ``(out_features,)``.
      threshold: outlier threshold, >= 0 (0: no outlier columns).
      backend: "auto", "xla", "triton" or None.

    Returns:
      ``(..., out_features)`` in ``x.dtype``.
    """
    x, weight = _check_args(x, weight, bias, "switchback_bnb_matmul")
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    path = _choose("switchback_bnb_matmul", backend, x, weight.shape)
    return _apply_2d(_switchback_bnb, x, weight, bias, threshold, path)
