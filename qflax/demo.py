"""The demo of ``make demo``: the real all-MiniLM-L6-v2 sentence encoder in float32, NF4, FP4 and LLM.int8.

Every dense projection of the encoder (36 matrices, 10.6M weights) is quantized; the embedding tables and
LayerNorms stay float32. For each format the demo reports the bytes of the dense layers, the bytes of the
whole model, the cosine similarity of each sentence embedding to the float32 model's (mean and minimum over
a fixed list of varied sentences) and the time of one batch on the default JAX device.
"""

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from qflax import linen as qnn
from qflax.examples import minilm
from qflax.examples.sentences import SENTENCES

FORMATS = ("float32", "nf4", "fp4", "int8")
# LLM.int8 with outlier columns kept in float (the threshold transformers uses for load_in_8bit).
INT8_THRESHOLD = 6.0


@dataclasses.dataclass(frozen=True)
class QuantizedMiniLM:
    """A MiniLM model in one weight format, with the variables to apply it.

    Attributes:
      name: the format ("float32", "nf4", "fp4" or "int8").
      model: the Linen module (its ``dense`` factory decides the format).
      variables: ``{"params": ...}`` and, for quantized formats, ``{"quantized": ...}``.
    """

    name: str
    model: nn.Module
    variables: dict

    def dense_bytes(self) -> int:
        """Bytes of the dense layers' variables (weights, statistics and biases)."""
        return sum(
            _tree_bytes(collection[f"layer_{i}"][dense])
            for collection in self.variables.values()
            for i in range(self.model.config.num_hidden_layers)
            for dense in collection.get(f"layer_{i}", {})
            if dense in minilm.DENSE_NAMES
        )

    def total_bytes(self) -> int:
        """Bytes of every variable of the model (embedding tables and LayerNorms included)."""
        return _tree_bytes(self.variables)


def _tree_bytes(tree) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree))


def quantize_minilm(
    params: dict,
    fmt: str,
    config: Optional[minilm.MiniLMConfig] = None,
    int8_threshold: float = INT8_THRESHOLD,
    progress: bool = True,
) -> QuantizedMiniLM:
    """Builds the MiniLM model of one weight format from float32 params.

    Args:
      params: float ``params`` of :class:`qflax.examples.minilm.MiniLM` (from ``minilm.load_params()``).
      fmt: one of ``FORMATS``: "float32", "nf4", "fp4" (4-bit, blocksize 64, double quantization, as
        ``bitsandbytes.nn.LinearNF4``/``LinearFP4``) or "int8" (LLM.int8, ``Dense8bitLt``).
      config: the encoder's shape (default: all-MiniLM-L6-v2's).
      int8_threshold: outlier threshold of the int8 format (0 disables outlier columns).
      progress: show a progress bar over the encoder layers while quantizing.

    Returns:
      A :class:`QuantizedMiniLM`.

    Raises:
      ValueError: if ``fmt`` is not one of ``FORMATS``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    config = config or minilm.MiniLMConfig()
    if fmt == "float32":
        return QuantizedMiniLM(fmt, minilm.MiniLM(config), {"params": params})
    if fmt == "int8":
        dense_factory = functools.partial(qnn.Dense8bitLt, threshold=int8_threshold)
        rule = qnn.Rule("*", layers="dense", format="8bit")
    else:
        dense_factory = functools.partial(qnn.Dense4bit, quant_type=fmt)
        rule = qnn.Rule("*", layers="dense", format="4bit", quant_type=fmt)
    float_params = dict(params)
    quantized: dict[str, Any] = {}
    layers = [name for name in params if name.startswith("layer_")]
    # One step per encoder layer: its six dense kernels are quantized, its LayerNorms stay float.
    for layer in tqdm(layers, desc=f"quantizing to {fmt}", unit="layer", disable=not progress, leave=False):
        converted = qnn.quantize_params(params[layer], rule, progress=False)
        float_params[layer] = converted["params"]
        quantized[layer] = converted["quantized"]
    jax.block_until_ready(quantized)
    variables = {"params": float_params, "quantized": quantized}
    return QuantizedMiniLM(fmt, minilm.MiniLM(config, dense=dense_factory), variables)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


def _time_batch(apply: Callable, variables: dict, ids, mask, repeats: int) -> tuple[np.ndarray, float]:
    out = jax.block_until_ready(apply(variables, ids, mask))  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(apply(variables, ids, mask))
        times.append(time.perf_counter() - start)
    return np.asarray(out), statistics.median(times)


def demo_rows(
    sentences: Sequence[str] = SENTENCES,
    formats: Sequence[str] = FORMATS,
    int8_threshold: float = INT8_THRESHOLD,
    repeats: int = 5,
    progress: bool = True,
    num_layers: Optional[int] = None,
) -> list[dict]:
    """Runs MiniLM in each format on one batch of sentences and measures it against float32.

    Args:
      sentences: the batch (default: the fixed list of :mod:`qflax.examples.sentences`).
      formats: formats to run, from ``FORMATS``; float32 is always run first as the reference.
      int8_threshold: outlier threshold of the int8 format.
      repeats: timed runs per format (the median is reported), after one compiling run.
      progress: show progress bars while quantizing.
      num_layers: run only the first ``num_layers`` encoder layers (a quick smoke run; default all 6).

    Raises:
      ValueError: an unknown format, or ``num_layers`` outside 1..6.

    Returns:
      One dict per format: ``format``, ``dense_bytes``, ``total_bytes``, ``dense_fraction`` (of float32's
      dense bytes), ``cos_mean``, ``cos_min`` (to the float32 embeddings), ``seconds_per_batch``,
      ``batch`` (sentences) and ``tokens`` (padded length).
    """
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"formats must be drawn from {FORMATS}, got {fmt!r}")
    config = minilm.load_config()
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"num_layers must be in 1..{config.num_hidden_layers}, got {num_layers!r}")
        config = dataclasses.replace(config, num_hidden_layers=num_layers)
    params = minilm.load_params(config=config)
    ids, mask = minilm.tokenize(minilm.load_tokenizer(), sentences)
    rows, reference, float_dense = [], None, None
    for fmt in ("float32",) + tuple(f for f in formats if f != "float32"):
        built = quantize_minilm(params, fmt, config, int8_threshold, progress)
        embeddings, seconds = _time_batch(jax.jit(built.model.apply), built.variables, ids, mask, repeats)
        if reference is None:
            reference, float_dense = embeddings, built.dense_bytes()
        cos = _cosines(embeddings, reference)
        rows.append(
            dict(
                format=fmt if fmt != "int8" else f"int8 (threshold {int8_threshold:g})",
                dense_bytes=built.dense_bytes(),
                total_bytes=built.total_bytes(),
                dense_fraction=built.dense_bytes() / float_dense,
                cos_mean=float(np.mean(cos)),
                cos_min=float(np.min(cos)),
                seconds_per_batch=seconds,
                batch=int(ids.shape[0]),
                tokens=int(ids.shape[1]),
            )
        )
    return rows if "float32" in formats else rows[1:]


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`demo_rows`' output."""
    header = (
        f"{'format':<24} {'dense bytes':>12} {'vs fp32':>8} {'model bytes':>12} "
        f"{'cos mean':>9} {'cos min':>9} {'ms/batch':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['format']:<24} {r['dense_bytes']:>12,} {100 * r['dense_fraction']:>7.1f}% {r['total_bytes']:>12,} "
            f"{r['cos_mean']:>9.5f} {r['cos_min']:>9.5f} {1000 * r['seconds_per_batch']:>9.1f}"
        )
    return "\n".join(lines)


def run_demo(num_sentences: Optional[int] = None, int8_threshold: float = INT8_THRESHOLD) -> str:
    """The text ``make demo`` prints: the table for MiniLM on the fixed sentences on this device."""
    sentences = SENTENCES[:num_sentences] if num_sentences else SENTENCES
    rows = demo_rows(sentences, int8_threshold=int8_threshold)
    device = jax.devices()[0]
    kind = "" if device.device_kind == device.platform else f" ({device.device_kind})"
    header = (
        f"qflax demo: all-MiniLM-L6-v2 (6 layers, 36 dense matrices quantized), {rows[0]['batch']} sentences "
        f"x {rows[0]['tokens']} tokens per batch, on {device.platform}{kind}"
    )
    return header + "\n" + format_table(rows)
