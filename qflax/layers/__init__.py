"""The framework-free core of the qflax layers: what the Linen and NNX layers share.

``qflax.linen`` and ``qflax.nnx`` are thin shells over this package and :mod:`qflax.ops`; neither
imports the other. Here live the variable names both use, the setting and weight checks, the dtype
rules, the embedding and outlier-aware maths, the fixed-setting variants, the quantization rules of
the model converters (:class:`Rule`, :class:`QuantRules`) and the whole-model bitsandbytes
checkpoint format. Nothing in it imports ``flax.linen`` or ``flax.nnx``.
"""

from qflax.layers.names import EMBEDDING_OPTIM_BITS, OPTIM_BITS, OUTLIERS, PARAMS, QUANTIZED
from qflax.layers.rules import LayerQuantization, QuantRules, Rule, as_rules

__all__ = [
    "EMBEDDING_OPTIM_BITS", "LayerQuantization", "OPTIM_BITS", "OUTLIERS", "PARAMS", "QUANTIZED", "QuantRules",
    "Rule", "as_rules",
]
