"""The one place where a 4-bit kernel launch is put together: plan, arguments, outputs.

``fourbit_plan`` decides tiles and split-K; this module turns a plan into a
:class:`~qflax_kernels.launch.Launch` (kernel, grid, constexprs, the runtime ``M``, outputs) and
fixes the order of the kernel's array inputs. The JAX launcher (``fourbit_jax``), torch_compat's
CUDA path, the interpreter tests and the tile tuner all build their launches here.

Array inputs of the forward kernels, in order: ``x (M, K)``, ``packed`` (flat uint8),
``absmax`` (float32, or uint8 codes when nested), ``quant_map`` (16,) float32, then the nested
statistics ``nested_map`` (256,) float32, ``nested_absmax`` float32, ``nested_offset`` (one
float32), then ``bias``. Pointers a launch does not read (no double quantization, no bias) are
given an input that is already there (``absmax``), never a placeholder array built per call.
The input-gradient kernel takes the same inputs with ``g (M, N)`` first and no bias.
"""

from qflax_kernels import fourbit_plan
from qflax_kernels.launch import Launch, Output, is_interpreted, make_launch

NESTED_BLOCKSIZE = fourbit_plan.NESTED_BLOCKSIZE
_PRECISION_DTYPES = ("float32",)


def _kernels():
    from qflax_kernels import fourbit_triton

    return fourbit_triton


def _precision(dtype_name: str) -> str:
    # Triton rounds float32 dot operands to tf32 unless asked; the reference does not.
    return "ieee" if dtype_name in _PRECISION_DTYPES else "tf32"


def _split_outputs(split: int, partial_size: int, tiles: int) -> tuple:
    """The split-K workspace: float32 partial sums and the zero-initialised per-tile counters
    (one-element stand-ins when there is no split, so nothing is zero-filled per call)."""
    if split == 1:
        return Output((1,), "float32"), Output((1,), "int32")
    return Output((split * partial_size,), "float32"), Output((tiles,), "int32", zeroed=True)


def matmul_launch(m: int, n: int, k: int, blocksize: int, *, x_dtype: str, nested: bool, has_bias: bool,
                  sm_count: int = fourbit_plan.DEFAULT_SM_COUNT, override: dict | None = None) -> Launch:
    """The launch computing ``out (m, n) = x (m, k) @ W.T (+ bias)``, W (n, k) in 4-bit blocks.

    Args:
      m, n, k: problem size (``k % blocksize == 0``).
      blocksize: 64 or 128.
      x_dtype: activation dtype name ("float16", "bfloat16" or "float32"); the output has it.
      nested: the absmax is double-quantized (uint8 codes + nested statistics).
      has_bias: a bias is added.
      sm_count: multiprocessors of the device (split-K policy).
      override: plan fields to force (tests, tile sweeps), plus ``use_asm`` (default: inline
        PTX decode unless the kernels run in Triton's interpreter).

    Returns:
      A :class:`Launch` with outputs ``(out, partial, counter)``.
    """
    options = dict(override or {})
    use_asm = options.pop("use_asm", None)
    plan = fourbit_plan.plan_matmul(m, n, k, blocksize, x_dtype, sm_count, options)
    kt = _kernels()
    common = dict(N=n, K=k, BS=blocksize, BN=plan.block_n, SPLIT_K=plan.split_k, NESTED=nested,
                  NESTED_BS=NESTED_BLOCKSIZE, HAS_BIAS=has_bias)
    scalars = {}
    if plan.kernel == "word_gemv":
        kernel, extra = kt.fourbit_word_gemv_kernel, dict(SW=plan.words)
    elif plan.kernel == "mma":
        kernel, extra = kt.fourbit_matmul_kernel, dict(BM=plan.block_m, BK=plan.block_k)
        scalars = dict(M=m)
    elif plan.kernel == "gemv":
        kernel, extra = kt.fourbit_gemv_kernel, dict(GROUP=plan.group)
    else:
        kernel, extra = kt.fourbit_gemm_kernel, dict(BM=plan.block_m, PRECISION=_precision(x_dtype))
        scalars = dict(M=m)
    if plan.kernel in ("word_gemv", "mma"):
        extra["USE_ASM"] = (not is_interpreted(kernel)) if use_asm is None else bool(use_asm)
    tiles = plan.grid[0] * (plan.grid[1] if len(plan.grid) == 3 else 1)
    outputs = (Output((m, n), x_dtype),) + _split_outputs(plan.split_k, m * n, tiles)
    # The word gemv (decode) without split-K runs through XLA's own Triton pipeline: launched as
    # an XLA kernel it costs no more per call than an XLA op (H200: 0.8 against 2.1 us chained).
    # XLA's Triton crashes (segfault, jaxlib 0.11.2) compiling the in-kernel split-K reduction
    # (atomics), so split launches and the tensor-core kernel keep jaxlib's kernel-call custom call.
    return make_launch(kernel, plan.grid, num_warps=plan.num_warps, num_stages=plan.num_stages,
                       constexprs={**common, **extra}, scalars=scalars, outputs=outputs,
                       name=f"qflax_4bit_{plan.kernel}",
                       xla_pipeline=plan.kernel == "word_gemv" and plan.split_k == 1)


def grad_input_launch(m: int, n: int, k: int, blocksize: int, *, g_dtype: str, nested: bool,
                      override: dict | None = None) -> Launch:
    """The launch computing ``out (m, k) = G (m, n) @ W`` (the input gradient of ``x @ W.T``).

    Args:
      m, n, k: G has m rows of n; W is (n, k).
      blocksize: 64 or 128.
      g_dtype: dtype name of G and of the output.
      nested: the absmax is double-quantized.
      override: plan fields to force.

    Returns:
      A :class:`Launch` with one output ``(m, k)``.
    """
    plan = fourbit_plan.plan_grad_input(m, n, k, blocksize, override)
    return make_launch(
        _kernels().fourbit_grad_input_kernel, plan.grid, num_warps=plan.num_warps, num_stages=plan.num_stages,
        constexprs=dict(N=n, K=k, BS=blocksize, BM=plan.block_m, BN=plan.block_n, NESTED=nested,
                        NESTED_BS=NESTED_BLOCKSIZE, PRECISION=_precision(g_dtype)),
        scalars=dict(M=m), outputs=(Output((m, k), g_dtype),), name="qflax_4bit_grad_input")


def weight_inputs(packed, absmax, quant_map, nested_quant_map=None, nested_absmax=None, nested_offset=None) -> list:
    """The weight's kernel inputs after x (or G): packed, absmax, quant_map, nested map/absmax/offset.

    Works on JAX arrays and torch tensors alike. ``packed`` must already be flat; without double
    quantization the three nested pointers get ``absmax`` (never read: NESTED is False).
    """
    if nested_absmax is None:
        return [packed, absmax, quant_map, absmax, absmax, absmax]
    return [packed, absmax, quant_map, nested_quant_map, nested_absmax, nested_offset]


def matmul_inputs(x, weight: list, bias=None) -> list:
    """All array inputs of a forward launch: ``x``, the :func:`weight_inputs`, then the bias
    (``x`` itself when there is none: HAS_BIAS is False, so it is never read)."""
    return [x, *weight, x if bias is None else bias]
