"""Names the Linen and NNX layers share, so that their variables map onto each other one to one.

Linen keeps variables in collections; NNX keeps them in typed ``nnx.Variable``s, each registered under
the Linen collection of the same name (``qflax.nnx.QuantizedWeight`` under ``QUANTIZED``,
``qflax.nnx.OutlierDims`` under ``OUTLIERS``).
"""

PARAMS = "params"
# Frozen quantized weights (Packed4bit, Int8Rows, ...): never trainable, never in PARAMS.
QUANTIZED = "quantized"
# OutlierAwareDense's outlier input dimensions.
OUTLIERS = "outliers"
# The mark of a table that keeps 32-bit optimizer state (bitsandbytes' GlobalOptimManager override):
# a Linen collection holding EMBEDDING_OPTIM_BITS at the param's path, and the NNX Param metadata key
# holding the same value.
OPTIM_BITS = "optim_bits"
EMBEDDING_OPTIM_BITS = 32
