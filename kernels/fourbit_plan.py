"""Launch plans (kernel, tile sizes, split-K, grid) for the 4-bit kernels; pure Python.

Used by ``fourbit_launch``, the one place launches are built (for JAX, torch and the
interpreter tests alike). float16/bfloat16 activations use the register-decode kernels
(``fourbit_word_gemv_kernel`` for one row, ``fourbit_matmul_kernel`` otherwise) with tiles
measured on an H100 by ``benchmarks/tune_4bit_tiles.py``; float32 activations use the
table-load kernels (``fourbit_gemv_kernel`` / ``fourbit_gemm_kernel``, exact float32
decode) with :data:`TILE_TABLE`. Split-K is chosen so the grid has a few programs per
multiprocessor.
"""

import dataclasses
import math

SUPPORTED_BLOCKSIZES = (64, 128)
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")
NESTED_BLOCKSIZE = 256
# Programs per multiprocessor to aim for when splitting K (memory-bound kernels need
# several resident programs to keep enough loads in flight).
PROGRAMS_PER_SM = 4
DEFAULT_SM_COUNT = 132  # H100 SXM


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one 4-bit matmul is launched.

    Attributes:
      kernel: "word_gemv" (register decode, CUDA-core FMAs, M == 1, float16/bfloat16),
        "mma" (register decode, tensor cores, float16/bfloat16), or the float32 kernels
        "gemv" / "gemm" (code-table loads).
      block_m: rows of x per program (1 for the gemv kernels).
      block_n: rows of W per program.
      split_k: programs sharing one output tile along K (float32 partials when > 1).
      num_warps: warps per program.
      num_stages: software-pipelining depth.
      grid: the launch grid.
      group: quantization blocks per loop step ("gemv" only).
      block_k: columns of W per loop step ("mma" only).
      words: packed int32 words per row per step ("word_gemv" only; one per thread).
    """

    kernel: str
    block_m: int
    block_n: int
    split_k: int
    num_warps: int
    num_stages: int
    grid: tuple
    group: int = 1
    block_k: int = 0
    words: int = 0


# float32 kernels: (max M, kernel, block_m, block_n, num_warps, num_stages, group); first
# row with M <= max M wins. Measured on an H100 80GB HBM3 (8192 x 8192, bf16) by
# `benchmarks/bench_4bit.py --tune 8192x8192`; see the "tile_table" of
# benchmarks/results/bench_4bit-H100-2026-11-25.json. num_stages stays 1: with more
# stages Triton pipelines the code-table gathers through shared memory (cp.async of
# 4 bytes each), which measured slower.
TILE_TABLE = (
    (1, "gemv", 1, 128, 4, 1, 2),
    (16, "gemm", 16, 64, 4, 1, 1),
    (64, "gemm", 64, 64, 4, 1, 1),
    (256, "gemm", 128, 128, 8, 1, 1),
    (None, "gemm", 128, 128, 8, 1, 1),
)


def tiles_for(m: int) -> dict:
    """Plan fields (kernel, block_m, block_n, num_warps, num_stages, group) for ``m`` rows of x."""
    for max_m, kernel, block_m, block_n, warps, stages, group in TILE_TABLE:
        if max_m is None or m <= max_m:
            return dict(kernel=kernel, block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
                        group=group)
    raise AssertionError("unreachable: the table ends with a catch-all row")


def choose_split_k(programs: int, k_blocks: int, sm_count: int, partial_bytes: int = 0,
                   weight_bytes: int = 1, group: int = 1) -> int:
    """Power-of-two split of K that brings ``programs`` up to PROGRAMS_PER_SM per SM.

    The split divides ``k_blocks`` into equal slices that are multiples of ``group``
    blocks (the kernels assume both), leaves each slice at least 8 blocks, and keeps the
    float32 partial sums (``partial_bytes`` per split, written and read back) under a
    quarter of the weight's bytes.
    """
    wanted = PROGRAMS_PER_SM * sm_count
    split = 1
    while (programs * split < wanted and k_blocks % (split * 2 * group) == 0 and k_blocks // (split * 2) >= 8
           and 2 * (split * 2) * partial_bytes <= weight_bytes // 4):
        split *= 2
    return split


# Register-decode kernels (float16/bfloat16), measured on an H100 80GB HBM3 with
# benchmarks/tune_4bit_tiles.py (see benchmarks/NOTES_4bit.md). One row: "word_gemv" with one
# thread per packed word of a step (SW words = 32 * num_warps), 4 weight rows per program, or
# 8 for narrow (N <= 4096) or long (K >= 12288) layers, where that measured faster.
WORD_GEMV_MAX_STEPS = 32  # the loop is unrolled; longer rows are split along K
# (max M, block_m, block_n, block_k, num_warps, num_stages) for "mma"; first row with M <= max M.
MMA_TILES = (
    (16, 16, 64, 128, 4, 4),
    (64, 64, 64, 128, 4, 3),
    (128, 128, 64, 128, 4, 3),
    (None, 256, 128, 64, 8, 3),
)


def _word_gemv_words(k: int) -> int:
    """Words per step of "word_gemv" (128, 64 or 32; one per thread), or 0 if K does not allow one."""
    words_per_row = k // 8
    for words in (128, 64, 32):
        if k % 8 == 0 and words_per_row % words == 0:
            return words
    return 0


def _split(programs: int, steps: int, sm_count: int, partial_bytes: int, weight_bytes: int, min_steps: int) -> int:
    """Power-of-two split of ``steps`` loop steps that brings ``programs`` to PROGRAMS_PER_SM per SM.

    Each split keeps at least ``min_steps`` steps, and the float32 partial sums (written and
    read back: 2 * split * partial_bytes) stay under the weight's own bytes.
    """
    split = 1
    while (programs * split < PROGRAMS_PER_SM * sm_count and steps % (split * 2) == 0
           and steps // (split * 2) >= min_steps and 2 * (split * 2) * partial_bytes <= weight_bytes):
        split *= 2
    return split


def plan_matmul(m: int, n: int, k: int, blocksize: int, dtype_name: str = "bfloat16",
                sm_count: int = DEFAULT_SM_COUNT, override: dict | None = None) -> Plan:
    """Plan for ``out (m, n) = x (m, k) @ W.T`` with W (n, k) in 4-bit blocks of ``blocksize``.

    Args:
      m, n, k: problem size.
      blocksize: quantization block size (must divide k).
      dtype_name: activation dtype ("float16", "bfloat16" or "float32").
      sm_count: multiprocessors on the device (split-K target).
      override: optional fields of :class:`Plan` to force (tests, tile sweeps);
        "grid" is always recomputed.

    Returns:
      A :class:`Plan`.
    """
    override = dict(override or {})
    if dtype_name == "float32" and override.get("kernel") in ("word_gemv", "mma"):
        # They round the code table to 16 bits: float32 activations would lose precision silently.
        raise ValueError(f"the {override['kernel']} kernel takes float16 or bfloat16 activations, got float32")
    if dtype_name == "float32" or override.get("kernel") in ("gemv", "gemm"):
        # The float32 kernels also run 16-bit activations when asked for (tests, comparisons).
        return _plan_float32(m, n, k, blocksize, sm_count, override)
    words = _word_gemv_words(k)
    kernel = override.get("kernel") or ("word_gemv" if m == 1 and words else "mma")
    if kernel == "word_gemv":
        if m != 1:
            raise ValueError(f"the word_gemv kernel takes one row of x, got M={m}")
        words = override.get("words") or words
        if not words or (k // 8) % words or words % 32:
            raise ValueError(f"words per step must be a multiple of 32 dividing in_features // 8 ({k // 8}), "
                             f"got {words}")
        block_n = override.get("block_n") or (8 if n <= 4096 or k >= 12288 else 4)
        steps = k // 8 // words
        split = override.get("split_k") or 1
        while steps // split > WORD_GEMV_MAX_STEPS and steps % (split * 2) == 0:
            split *= 2
        if steps % split:
            raise ValueError(f"split_k must divide the {steps} steps of {words} words along K, got {split}")
        return Plan(kernel="word_gemv", block_m=1, block_n=block_n, split_k=split,
                    num_warps=override.get("num_warps") or words // 32, num_stages=1,
                    grid=(-(-n // block_n), split), words=words)
    if kernel != "mma":
        raise ValueError(f"kernel must be one of 'word_gemv', 'mma', 'gemv', 'gemm', got {kernel!r}")
    for max_m, block_m, block_n, block_k, warps, stages in MMA_TILES:
        if max_m is None or m <= max_m:
            break
    block_m = override.get("block_m") or block_m
    block_n = override.get("block_n") or block_n
    block_k = override.get("block_k") or block_k
    block_k = max(block_k, blocksize)
    if k % block_k:
        block_k = blocksize
    if block_k % blocksize:
        raise ValueError(f"block_k must be a multiple of blocksize ({blocksize}), got {block_k}")
    steps = k // block_k
    m_tiles, n_tiles = -(-m // block_m), -(-n // block_n)
    split = override.get("split_k") or _split(m_tiles * n_tiles, steps, sm_count, partial_bytes=4 * m * n,
                                              weight_bytes=n * k // 2, min_steps=2)
    if steps % split:
        raise ValueError(f"split_k must divide the {steps} steps of {block_k} columns along K, got {split}")
    return Plan(kernel="mma", block_m=block_m, block_n=block_n, split_k=split,
                num_warps=override.get("num_warps") or warps, num_stages=override.get("num_stages") or stages,
                grid=(m_tiles, n_tiles, split), block_k=block_k)


def _plan_float32(m: int, n: int, k: int, blocksize: int, sm_count: int, override: dict | None) -> Plan:
    """Plan of the float32 kernels ("gemv" / "gemm") for ``x (m, k) @ W.T``, W (n, k).

    Args:
      m, n, k: problem size.
      blocksize: quantization block size (must divide k).
      sm_count: multiprocessors on the device (split-K target).
      override: optional fields of :class:`Plan` to force (tests, tile sweeps);
        "grid" is always recomputed.

    Returns:
      A :class:`Plan`.
    """
    fields = tiles_for(m)
    fields.update({key: value for key, value in (override or {}).items() if key not in ("grid", "split_k")})
    if fields["kernel"] == "gemv":
        if m != 1:
            raise ValueError(f"the gemv kernel takes one row of x, got M={m}")
        fields["block_m"] = 1
    else:
        fields["group"] = 1
    k_blocks = k // blocksize
    if k_blocks % fields["group"]:
        fields["group"] = 1
    m_tiles = math.ceil(m / fields["block_m"])
    n_tiles = math.ceil(n / fields["block_n"])
    split = (override or {}).get("split_k") or choose_split_k(
        m_tiles * n_tiles, k_blocks, sm_count, partial_bytes=4 * m * n, weight_bytes=n * k // 2,
        group=fields["group"])
    if k_blocks % (split * fields["group"]):
        raise ValueError(f"split_k * group must divide the {k_blocks} quantization blocks along K, "
                         f"got {split} * {fields['group']}")
    if fields["kernel"] == "gemv":
        grid = (n_tiles, split)
    else:
        grid = (m_tiles, n_tiles, split)
    return Plan(split_k=split, grid=grid, **fields)


def plan_grad_input(m: int, n: int, k: int, blocksize: int, override: dict | None = None) -> Plan:
    """Plan for ``out (m, k) = G (m, n) @ W`` (the input gradient), W (n, k) in 4-bit blocks."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    fields = dict(kernel="grad_input", block_m=block_m, block_n=64, split_k=1, num_warps=4, num_stages=3)
    fields.update({key: value for key, value in (override or {}).items() if key != "grid"})
    grid = (math.ceil(m / fields["block_m"]), k // blocksize)
    return Plan(grid=grid, **fields)


def unsupported_reason(n: int, k: int, blocksize: int, dtype_name: str, quant_map_size: int = 16) -> str | None:
    """Why the kernels cannot run these arguments, or None when they can."""
    if blocksize not in SUPPORTED_BLOCKSIZES:
        return f"blocksize must be one of {SUPPORTED_BLOCKSIZES} for the Triton kernels, got {blocksize}"
    if dtype_name not in SUPPORTED_DTYPES:
        return f"dtype must be one of {SUPPORTED_DTYPES} for the Triton kernels, got {dtype_name}"
    if k % blocksize:
        return f"in_features ({k}) must be a multiple of blocksize ({blocksize}) for the Triton kernels"
    if quant_map_size != 16:
        return f"quant_map must have 16 entries, got {quant_map_size}"
    if n * k >= 2**31:
        return f"weight has {n * k} elements; the kernels index with int32 (< 2**31)"
    return None
