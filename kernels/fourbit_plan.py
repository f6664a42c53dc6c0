"""Launch plans (kernel, tile sizes, split-K, grid) for the 4-bit kernels; pure Python.

Shared by the jax-triton launchers and the interpreter tests, so both launch the kernels
the same way. Tiles come from a table indexed by M, measured on an H100 with
``benchmarks/bench_4bit.py --tune``; split-K is then chosen so the grid has a few
programs per multiprocessor.
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
      kernel: "gemv" (CUDA-core FMAs, M == 1) or "gemm" (tensor cores).
      block_m: rows of x per program (1 for gemv).
      block_n: rows of W per program.
      split_k: programs sharing one output tile along K (float32 partials when > 1).
      num_warps: warps per program.
      num_stages: software-pipelining depth.
      grid: the launch grid.
      group: quantization blocks per loop step (gemv only).
    """

    kernel: str
    block_m: int
    block_n: int
    split_k: int
    num_warps: int
    num_stages: int
    grid: tuple
    group: int = 1


# (max M, kernel, block_m, block_n, num_warps, num_stages, group); first row with
# M <= max M wins. Measured on an H100 80GB HBM3 (8192 x 8192, bf16) by
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


def plan_matmul(m: int, n: int, k: int, blocksize: int, sm_count: int = DEFAULT_SM_COUNT,
                override: dict | None = None) -> Plan:
    """Plan for ``out (m, n) = x (m, k) @ W.T`` with W (n, k) in 4-bit blocks of ``blocksize``.

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
