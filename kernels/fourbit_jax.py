"""JAX launchers (jax-triton) for the 4-bit kernels, with custom_vmap rules.

Arrays follow bitsandbytes' layout (see ``fourbit_triton``); nothing here knows of qflax.
``triton``/``jax_triton`` are imported when a launcher is first traced, so importing this
module works without them.

vmap: batching x alone folds the batch into M (one launch); batching the weight or bias
runs one launch per batch element (``lax.map``).
"""

import functools

import jax
import jax.numpy as jnp

from qflax_kernels import fourbit_plan

NESTED_BLOCKSIZE = fourbit_plan.NESTED_BLOCKSIZE


def _sm_count() -> int:
    return getattr(jax.devices()[0], "core_count", None) or fourbit_plan.DEFAULT_SM_COUNT


def _precision(dtype) -> str:
    # Triton rounds float32 dot operands to tf32 unless asked; the reference does not.
    return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"


def _fold_x_rule(unbatched, axis_size, in_batched, x, *rest):
    """custom_vmap rule: one launch with the batch folded into M when only x is batched."""
    if not any(in_batched[1:]):
        batch, m = x.shape[0], x.shape[1]
        out = unbatched(x.reshape(batch * m, x.shape[2]), *rest)
        return out.reshape(batch, m, out.shape[-1]), True
    args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip((x, *rest), in_batched)]
    return jax.lax.map(lambda a: unbatched(*a), tuple(args)), True


@functools.lru_cache(maxsize=None)
def _matmul_fn(n: int, k: int, blocksize: int, nested: bool, has_bias: bool, override: tuple):
    """Launcher for one static configuration: f(x, packed, absmax, quant_map, nmap, nabs, noff, bias)."""

    def launch(x, packed, absmax, quant_map, nested_map, nested_absmax, nested_offset, bias):
        import jax_triton
        from qflax_kernels import fourbit_triton

        m = x.shape[0]
        options = dict(override)
        # "use_asm": False runs the register-decode kernels' portable decode (tests compare the two).
        use_asm = options.pop("use_asm", True)
        plan = fourbit_plan.plan_matmul(m, n, k, blocksize, jnp.dtype(x.dtype).name, _sm_count(), options)
        split = plan.split_k > 1
        out_shape = jax.ShapeDtypeStruct((plan.split_k, m, n) if split else (m, n), jnp.float32 if split else x.dtype)
        common = dict(N=n, K=k, BS=blocksize, BN=plan.block_n, SPLIT_K=plan.split_k,
                      NESTED=nested, NESTED_BS=NESTED_BLOCKSIZE, HAS_BIAS=has_bias)
        table = quant_map.astype(jnp.float32)
        if plan.kernel == "word_gemv":
            kernel, extra = fourbit_triton.fourbit_word_gemv_kernel, dict(SW=plan.words, USE_ASM=use_asm)
        elif plan.kernel == "mma":
            kernel = fourbit_triton.fourbit_matmul_kernel
            extra = dict(M=m, BM=plan.block_m, BK=plan.block_k, USE_ASM=use_asm)
        elif plan.kernel == "gemv":
            kernel, extra, table = fourbit_triton.fourbit_gemv_kernel, dict(GROUP=plan.group), code_pairs(quant_map)
        else:
            kernel, table = fourbit_triton.fourbit_gemm_kernel, code_pairs(quant_map)
            extra = dict(M=m, BM=plan.block_m, PRECISION=_precision(x.dtype))
        out = jax_triton.triton_call(
            x, packed, absmax, table, nested_map, nested_absmax, nested_offset, bias,
            kernel=kernel, out_shape=out_shape, grid=plan.grid,
            num_warps=plan.num_warps, num_stages=plan.num_stages, **common, **extra,
        )
        if not split:
            return out
        total = out.sum(axis=0)
        if has_bias:
            total = total + bias.astype(jnp.float32)
        return total.astype(x.dtype)

    batched = jax.custom_batching.custom_vmap(launch)
    batched.def_vmap(functools.partial(_fold_x_rule, batched))
    return batched


@functools.lru_cache(maxsize=None)
def _grad_input_fn(n: int, k: int, blocksize: int, nested: bool, override: tuple):
    """Launcher for one static configuration: f(g, packed, absmax, pairs, nmap, nabs, noff)."""

    def launch(g, packed, absmax, pairs, nested_map, nested_absmax, nested_offset):
        import jax_triton
        from qflax_kernels import fourbit_triton

        m = g.shape[0]
        plan = fourbit_plan.plan_grad_input(m, n, k, blocksize, dict(override))
        return jax_triton.triton_call(
            g, packed, absmax, pairs, nested_map, nested_absmax, nested_offset,
            kernel=fourbit_triton.fourbit_grad_input_kernel,
            out_shape=jax.ShapeDtypeStruct((m, k), g.dtype), grid=plan.grid,
            num_warps=plan.num_warps, num_stages=plan.num_stages,
            M=m, N=n, K=k, BS=blocksize, BM=plan.block_m, BN=plan.block_n,
            NESTED=nested, NESTED_BS=NESTED_BLOCKSIZE, PRECISION=_precision(g.dtype),
        )

    batched = jax.custom_batching.custom_vmap(launch)
    batched.def_vmap(functools.partial(_fold_x_rule, batched))
    return batched


def code_pairs(quant_map):
    """(256, 2) float32 table: row b holds the code values of byte b's high and low nibble.

    Built from the (16,) quant_map of each weight (so a stored table is honoured); the
    float32 kernels decode a packed byte with one 8-byte load from it (the float16/bfloat16
    kernels take the quant_map itself and keep it in registers).
    """
    byte = jnp.arange(256, dtype=jnp.int32)
    table = quant_map.astype(jnp.float32)
    return jnp.stack([table[byte >> 4], table[byte & 15]], axis=-1)


def _statistics(absmax, nested_absmax, nested_quant_map, nested_offset):
    """The kernels' statistics arguments; unused pointers get one-element placeholders."""
    if nested_absmax is None:
        placeholder = jnp.zeros((1,), jnp.float32)
        return absmax.astype(jnp.float32), placeholder, placeholder, placeholder
    return (absmax, nested_quant_map.astype(jnp.float32), nested_absmax.astype(jnp.float32),
            jnp.reshape(nested_offset, (1,)).astype(jnp.float32))


def _check(shape, blocksize, dtype):
    n, k = shape
    reason = fourbit_plan.unsupported_reason(n, k, blocksize, jnp.dtype(dtype).name)
    if reason:
        raise ValueError(reason)
    return n, k


def matmul_4bit(x, packed, absmax, quant_map, *, shape, blocksize, bias=None,
                nested_absmax=None, nested_quant_map=None, nested_offset=None, plan_override=None):
    """``x @ W.T + bias`` with W (N, K) in NF4/FP4 blocks, fused on the GPU.

    Args:
      x: (..., K) float16/bfloat16/float32 activations.
      packed: uint8 packed codes, any shape with N*K/2 elements.
      absmax: float32 (N*K/blocksize,) or, when nested, uint8 codes.
      quant_map: float32 (16,) code table.
      shape: (N, K), the weight's shape.
      blocksize: 64 or 128; must divide K.
      bias: optional (N,) bias.
      nested_absmax, nested_quant_map, nested_offset: double-quantization statistics
        (float32 (ceil(nblocks/256),), (256,), scalar) or None.
      plan_override: optional dict of :class:`fourbit_plan.Plan` fields (tile sweeps), and
        ``use_asm`` (default True; False decodes without inline PTX, for tests).

    Returns:
      (..., N) array of x's dtype.
    """
    n, k = _check(shape, blocksize, x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    stats = _statistics(absmax, nested_absmax, nested_quant_map, nested_offset)
    bias_arg = jnp.zeros((1,), x.dtype) if bias is None else bias.astype(x.dtype)
    fn = _matmul_fn(n, k, blocksize, nested_absmax is not None, bias is not None,
                    tuple(sorted((plan_override or {}).items())))
    out = fn(x2, packed.reshape(-1), stats[0], quant_map, *stats[1:], bias_arg)
    return out.reshape(*lead, n)


def grad_input_4bit(g, packed, absmax, quant_map, *, shape, blocksize,
                    nested_absmax=None, nested_quant_map=None, nested_offset=None, plan_override=None):
    """``g @ W`` (input gradient of ``x @ W.T``) with W (N, K) in NF4/FP4 blocks, fused.

    Args:
      g: (..., N) float16/bfloat16/float32 output gradient.
      packed, absmax, quant_map, shape, blocksize, nested_*: as in :func:`matmul_4bit`.
      plan_override: optional dict of :class:`fourbit_plan.Plan` fields.

    Returns:
      (..., K) array of g's dtype.
    """
    n, k = _check(shape, blocksize, g.dtype)
    lead = g.shape[:-1]
    stats = _statistics(absmax, nested_absmax, nested_quant_map, nested_offset)
    fn = _grad_input_fn(n, k, blocksize, nested_absmax is not None, tuple(sorted((plan_override or {}).items())))
    out = fn(g.reshape(-1, n), packed.reshape(-1), stats[0], code_pairs(quant_map), *stats[1:])
    return out.reshape(*lead, k)
