"""qflax: bitsandbytes' quantized layers (NF4/FP4, LLM.int8, SwitchBack) for JAX and Flax.

``import qflax`` needs neither torch nor triton.
"""

from qflax import bnb_format, linen, ops, quant

__version__ = "0.1.0"
__all__ = ["bnb_format", "linen", "ops", "quant", "__version__"]
