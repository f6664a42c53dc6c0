"""Float Flax params -> the variables of the quantized Linen model, in one call with one rule object.

A float ``nn.Dense`` holds ``{"kernel": (in, out), "bias"}`` and a float ``nn.Embed``
``{"embedding": (num, features)}``. :func:`quantize_params` turns each one the rules select
(:class:`qflax.layers.QuantRules`; by default every Dense to NF4) into the variables of the quantized
layer at the same module path: the quantized ``weight`` (bitsandbytes' ``(out, in)`` layout for Dense
kernels) in the "quantized" collection, everything else (biases, norms, layers kept float) in
"params". Which Linen layer reads them:

=============  =======================================  ==========================
rule format    Dense (``kernel``)                       Embed (``embedding``)
=============  =======================================  ==========================
"4bit"         Dense4bit / DenseNF4 / DenseFP4 /         Embed4bit / EmbedNF4 /
               LoRADense4bit (same quant_type and        EmbedFP4
               blocksize)
"8bit"         Dense8bitLt(has_fp16_weights=False)       Embed8bit
=============  =======================================  ==========================

``qflax.nnx.quantize_model`` reads the same rules for an NNX model, and gives the same bytes.
"""

from typing import Mapping, Optional, Union

import jax
import numpy as np

from qflax.layers import quantize
from qflax.layers.trees import nested_set
from qflax.layers.names import PARAMS, QUANTIZED
from qflax.layers.progress import progress_bar
from qflax.layers.rules import QuantRules, Rule, as_rules

_KINDS = {"kernel": "dense", "embedding": "embed"}


def _jobs(params: Mapping, rules: QuantRules) -> tuple[list, dict]:
    """Splits a params tree into (to quantize, kept): each job is (module path, leaf name, array, how)."""
    jobs, kept = [], {}

    def walk(node: Mapping, path: tuple) -> None:
        for name, value in node.items():
            if isinstance(value, Mapping):
                walk(value, path + (str(name),))
                continue
            kind = _KINDS.get(name) if getattr(value, "ndim", None) == 2 else None
            how = None if kind is None else rules.resolve(".".join(path), kind)
            if how is None:
                nested_set(kept, path + (name,), value)
            else:
                jobs.append((path, name, value, how))

    walk(params, ())
    return jobs, kept


def quantize_params(
    params: Mapping,
    rules: Union[None, Rule, QuantRules] = None,
    *,
    progress: Optional[bool] = None,
) -> dict:
    """Quantizes the Dense kernels and Embed tables of a float params tree that ``rules`` select.

    Args:
      params: the float params tree (``variables["params"]`` of an ``nn.Dense``/``nn.Embed`` model).
      rules: a :class:`~qflax.layers.QuantRules` (or one Rule, or a sequence of Rules); None: every
        2-D Dense kernel to NF4 (blocksize 64, double quantization), embeddings kept float.
      progress: show a tqdm bar; None shows it from 2**24 weights to quantize on.

    Returns:
      ``{"params": ..., "quantized": ...}`` (plain dicts) for ``model.apply`` of the quantized model,
      whose layers have the same names as the float one's (explicit ``name=`` or ``setup`` attributes).

    Raises:
      TypeError: ``params`` is not a mapping, bad ``rules``, or a weight to quantize is not a float array.
        (NaN/Inf are values, not errors: their blocks or rows decode to NaN, see :mod:`qflax.quant.scaling`.)

    Example:
      >>> float_params = FloatMLP().init(key, x)["params"]          # nn.Dense(name="fc1"), ...
      >>> variables = quantize_params(float_params, QuantRules(Rule("head", keep_float=True), Rule("*")))
      >>> y = MLP4bit().apply(variables, x)                         # DenseNF4(name="fc1"), ...
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping (a Flax params tree), got {type(params).__name__}")
    jobs, kept = _jobs(params, as_rules(rules))
    quantized: dict = {}
    with progress_bar(sum(int(np.prod(value.shape)) for _, _, value, _ in jobs), progress) as bar:
        for path, name, value, how in jobs:
            where = f"{PARAMS}/" + "/".join(path + (name,))
            # Flax kernels are (in, out); the quantized weight is bitsandbytes' (out, in).
            weight = value.T if how.kind == "dense" else value
            nested_set(quantized, path + ("weight",), quantize.quantize_layer_weight(weight, how, where))
            bar.update(int(np.prod(value.shape)))
    jax.block_until_ready(quantized)
    return {PARAMS: kept, QUANTIZED: quantized}

