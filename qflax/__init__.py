"""qflax: bitsandbytes' quantized layers (NF4/FP4, LLM.int8, SwitchBack) for JAX and Flax.

``import qflax`` needs neither torch nor triton.
"""

from qflax import bnb_format, layers, linen, ops, quant
from qflax.layers.rules import QuantRules, Rule

__version__ = "0.1.0"
__all__ = ["QuantRules", "Rule", "bnb_format", "layers", "linen", "ops", "quant", "__version__"]
