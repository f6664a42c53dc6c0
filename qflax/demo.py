"""The demo of ``make demo``: one random weight matrix in NF4, FP4 and LLM.int8, with bytes and error."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from qflax import quant


def _leaf_bytes(tree) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree))


def matrix_demo_rows(rows: int = 4096, cols: int = 4096, seed: int = 0) -> list[dict]:
    """Quantizes one ``randn(rows, cols)`` float32 matrix in each format and measures it.

    Returns:
      One dict per format with keys ``format``, ``bytes``, ``bits_per_weight``,
      ``mean_abs_error`` (against the float32 matrix) and ``seconds`` (quantize + dequantize).
    """
    w = jax.random.normal(jax.random.key(seed), (rows, cols), jnp.float32)
    formats = {
        "float32": (lambda x: x, lambda q: q),
        "nf4 (double quant)": (
            lambda x: quant.quantize_4bit(x, 64, "nf4", compress_statistics=True),
            quant.dequantize_4bit,
        ),
        "nf4": (lambda x: quant.quantize_4bit(x, 64, "nf4"), quant.dequantize_4bit),
        "fp4": (lambda x: quant.quantize_4bit(x, 64, "fp4"), quant.dequantize_4bit),
        "int8 (row-wise)": (
            quant.quantize_rows,
            lambda q: quant.int8_vectorwise_dequant(q.codes, q.scale),
        ),
    }
    rows_out = []
    for name, (encode, decode) in formats.items():
        start = time.perf_counter()
        q = encode(w)
        restored = jax.block_until_ready(decode(q))
        seconds = time.perf_counter() - start
        nbytes = _leaf_bytes(q)
        rows_out.append(
            dict(
                format=name,
                bytes=nbytes,
                bits_per_weight=8 * nbytes / w.size,
                mean_abs_error=float(jnp.mean(jnp.abs(restored.astype(jnp.float32) - w))),
                seconds=seconds,
            )
        )
    return rows_out


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`matrix_demo_rows`' output."""
    lines = [f"{'format':<20} {'bytes':>12} {'bits/weight':>12} {'mean |error|':>13} {'seconds':>8}"]
    for r in rows:
        lines.append(
            f"{r['format']:<20} {r['bytes']:>12,} {r['bits_per_weight']:>12.3f} "
            f"{r['mean_abs_error']:>13.6f} {r['seconds']:>8.2f}"
        )
    return "\n".join(lines)


def run_matrix_demo(rows: int = 4096, cols: int = 4096) -> str:
    """The text ``make demo`` prints: the table for a ``randn(rows, cols)`` matrix on this device."""
    header = f"qflax demo: randn({rows}, {cols}) float32 on {jax.devices()[0].platform}"
    return header + "\n" + format_table(matrix_demo_rows(rows, cols))
