"""``y = x @ W.T + bias`` with a frozen 4-bit weight (bitsandbytes' ``matmul_4bit``, docs/fourbit.md#matmul).

The weight stays packed: the forward pass dequantizes it in the compute dtype and multiplies;
the backward pass dequantizes it again for ``G @ W`` instead of keeping a float copy alive.
Gradients flow to ``x`` and ``bias`` only: the weight is frozen (QLoRA), so its cotangent is
always zero and no ``G^T X`` product is ever formed.

Compute dtype (docs/fourbit.md#linear4bit): ``compute_dtype=None`` computes in the dtype of ``x``; otherwise
``x``, the weight and the bias are cast to ``compute_dtype`` and the result is cast back, so
the output dtype always equals the input dtype. (bitsandbytes fixes the compute dtype from the
first input a layer sees; qflax decides per call, which is what a pure function can do.)
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qflax.ops import dispatch, fourbit_kernels, fourbit_partitioning
from qflax.quant import fourbit_rows, validation
from qflax.quant.fourbit import Packed4bit, check_structure, dequantize_4bit

OP_NAME = "matmul_4bit"
GRAD_INPUT_OP_NAME = "matmul_4bit_grad_input"


def dtype_name(dtype: Any, name: str) -> str:
    """The canonical name of a float dtype argument ("float32", "float16" or "bfloat16")."""
    try:
        resolved = np.dtype(dtype).name
    except TypeError as err:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype!r}") from err
    validation.check_choice(resolved, validation.FLOAT_DTYPES, name)
    return resolved


def dequantize_as(q: Packed4bit, dtype: str) -> jax.Array:
    """The weight decoded in float32 and rounded once, straight to ``dtype``.

    bitsandbytes on CPU decodes into the activation dtype the same way; going through the
    stored dtype first would round twice (e.g. float32 -> bfloat16 -> float16). A weight whose
    rows are whole absmax blocks is decoded along its two axes (same values, bit for bit), so
    that XLA partitions a weight sharded along either axis shard by shard (qflax.sharding).
    """
    if fourbit_rows.has_whole_block_rows(q):
        return fourbit_rows.dequantize_rows(q, dtype)
    return dequantize_4bit(q.replace(dtype=dtype))


def _choose(op: str, requested_backend: str, x: jax.Array, q: Packed4bit, compute_dtype: str) -> str:
    """The path of one product: can the fused kernels run it, and are they faster here."""
    if x.size == 0:  # an empty batch stays on XLA, whose ops all take empty operands (any backend asked for)
        return dispatch.choose(op, "xla")
    return dispatch.choose(op, requested_backend, unsupported=fourbit_kernels.unsupported_reason(x, q, compute_dtype),
                           faster=fourbit_kernels.is_faster(x, q, compute_dtype))


def _forward_product(x: jax.Array, q: Packed4bit, bias: Optional[jax.Array], compute_dtype: str) -> jax.Array:
    """XLA reference: dequantize, then one dot in the compute dtype, bias added in that dtype."""
    xc = x.astype(compute_dtype)
    w = dequantize_as(q, compute_dtype)
    # Contract x's last axis with W's second: x @ W.T without materializing the transpose.
    y = lax.dot_general(xc, w, (((xc.ndim - 1,), (1,)), ((), ())), preferred_element_type=compute_dtype)
    if bias is not None:
        y = y + bias.astype(compute_dtype)
    return y.astype(x.dtype)


def _grad_input_product(g: jax.Array, q: Packed4bit, compute_dtype: str) -> jax.Array:
    """XLA reference of ``G @ W`` (the input gradient), in the compute dtype."""
    gc = g.astype(compute_dtype)
    w = dequantize_as(q, compute_dtype)
    return lax.dot_general(gc, w, (((gc.ndim - 1,), (0,)), ((), ())), preferred_element_type=compute_dtype)


def _matmul_impl(x, q, bias, compute_dtype, requested_backend):
    path = _choose(OP_NAME, requested_backend, x, q, compute_dtype)
    if path == "triton":
        # The partitioned wrapper only where there is something to partition: the single-device
        # program keeps the bare kernel call (the one validated on the GPU).
        if jax.device_count() > 1:
            return fourbit_partitioning.fourbit_forward(x, q, bias, compute_dtype)
        return fourbit_kernels.forward(x, fourbit_rows.to_flat(q), bias, compute_dtype)
    return _forward_product(x, q, bias, compute_dtype)


_matmul = jax.custom_vjp(_matmul_impl, nondiff_argnums=(3, 4))


def _matmul_fwd(x, q, bias, compute_dtype, requested_backend):
    # Residuals: the packed weight (already resident) and the bias (for its dtype); never a float W.
    return _matmul_impl(x, q, bias, compute_dtype, requested_backend), (q, bias)


def _matmul_bwd(compute_dtype, requested_backend, residuals, g):
    q, bias = residuals
    path = _choose(GRAD_INPUT_OP_NAME, requested_backend, g, q, compute_dtype)
    if path == "triton":
        if jax.device_count() > 1:
            grad_x = fourbit_partitioning.fourbit_grad_input(g, q, compute_dtype).astype(g.dtype)
        else:
            grad_x = fourbit_kernels.grad_input(g, fourbit_rows.to_flat(q), compute_dtype).astype(g.dtype)
    else:
        grad_x = _grad_input_product(g, q, compute_dtype).astype(g.dtype)  # g has x's dtype
    grad_bias = None
    if bias is not None:
        # The bias entered the sum through a cast to the compute dtype: sum G there, accumulate in float32.
        summed = jnp.sum(g.astype(compute_dtype).astype(jnp.float32), axis=tuple(range(g.ndim - 1)))
        grad_bias = summed.astype(bias.dtype)
    # None: the frozen weight gets a zero cotangent; no weight gradient is computed.
    return grad_x, None, grad_bias


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def check_packed_weight(q: Any, name: str = "q") -> Packed4bit:
    """Raises unless ``q`` is a 2-D :class:`Packed4bit` (a weight in ``(out, in)`` layout)."""
    check_structure(q, name)
    if len(q.shape) != 2:
        raise ValueError(f"{name} must hold a 2-D (out_features, in_features) weight, got shape {q.shape}")
    return q


def matmul_4bit(
    x: jax.Array,
    q: Packed4bit,
    bias: Optional[jax.Array] = None,
    compute_dtype: Any = None,
    backend: Optional[str] = None,
) -> jax.Array:
    """``x @ W.T + bias`` where ``W = dequantize_4bit(q)`` has bitsandbytes' ``(out, in)`` layout.

    Differentiable in ``x`` and ``bias`` (``jax.custom_vjp``); the weight is frozen and gets a
    zero cotangent. Works under jit, vmap, scan, checkpoint and sharding.

    Args:
      x: float32/float16/bfloat16 array ``(..., in_features)``; any number of leading dims.
      q: the quantized weight, ``q.shape == (out_features, in_features)``.
      bias: optional float array ``(out_features,)``.
      compute_dtype: dtype of the dequantized weight and of the product ("float32",
        "float16", "bfloat16" or a numpy/jax dtype); None computes in ``x``'s dtype.
      backend: "auto", "xla", "triton" or None (see :mod:`qflax.ops.dispatch`).

    Returns:
      Array ``(..., out_features)`` with ``x``'s dtype.

    Raises:
      TypeError: ``x`` or ``bias`` is not a float array, ``q`` is not a Packed4bit, or
        ``compute_dtype`` is not a float dtype.
      ValueError: ``x``'s last dimension differs from ``in_features``, ``x`` is a scalar,
        or ``bias`` does not have shape ``(out_features,)``.

    Example:
      >>> q = quantize_4bit(w, quant_type="nf4")          # w: (out, in)
      >>> y = matmul_4bit(x, q, bias)                     # x: (batch, in) -> (batch, out)
    """
    q = check_packed_weight(q)
    out_features, in_features = q.shape
    x_dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype).name
    if x_dtype not in validation.FLOAT_DTYPES:
        raise TypeError(f"x must have dtype float32, float16 or bfloat16, got {x_dtype}")
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x must have shape (..., {in_features}) to match the weight {q.shape} (out, in), got {tuple(x.shape)}"
        )
    if bias is not None:
        bias_dtype = np.dtype(bias.dtype).name
        if bias_dtype not in validation.FLOAT_DTYPES:
            raise TypeError(f"bias must have dtype float32, float16 or bfloat16, got {bias_dtype}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    compute = x_dtype if compute_dtype is None else dtype_name(compute_dtype, "compute_dtype")
    return _matmul(x, q, bias, compute, dispatch.requested_backend(backend))
