"""bitsandbytes.nn's 18 names, computed by qflax in JAX."""

from torch_compat.nn.embeddings import (
    Embedding, Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4, StableEmbedding,
)
from torch_compat.nn.linear_4bit import Linear4bit, LinearFP4, LinearNF4
from torch_compat.nn.linear_8bit import Linear8bitLt
from torch_compat.nn.outlier_aware import OutlierAwareLinear
from torch_compat.nn.params import Int8Params, Params4bit
from torch_compat.nn.switchback import (
    StandardLinear, SwitchBackLinear, SwitchBackLinearBnb, SwitchBackLinearGlobal, SwitchBackLinearVectorwise,
)

__all__ = [
    "Embedding", "Embedding4bit", "Embedding8bit", "EmbeddingFP4", "EmbeddingNF4", "Int8Params", "Linear4bit",
    "Linear8bitLt", "LinearFP4", "LinearNF4", "OutlierAwareLinear", "Params4bit", "StableEmbedding",
    "SwitchBackLinearBnb", "StandardLinear", "SwitchBackLinear", "SwitchBackLinearGlobal",
    "SwitchBackLinearVectorwise",
]
