"""Flax Linen modules: thin shells over :mod:`qflax.ops` and :mod:`qflax.layers`, plus the model converters.

Frozen quantized weights live in the variable collection "quantized" (never in "params"),
so ``jax.grad`` over ``variables["params"]`` always works. :func:`quantize_params` quantizes a float
params tree with a :class:`QuantRules`; :func:`to_bnb_checkpoint` / :func:`from_bnb_checkpoint` write
and read bitsandbytes checkpoints (4-bit and 8-bit layers together).
"""

from qflax.layers.outliers import OutlierSplitWeight
from qflax.layers.rules import QuantRules, Rule
from qflax.linen.checkpoint import from_bnb_checkpoint, to_bnb_checkpoint
from qflax.linen.convert import quantize_params
from qflax.linen.deprecated import (
    from_bnb_state_dict_8bit,
    load_bnb_4bit,
    quantize_params_4bit,
    quantize_params_8bit,
    save_bnb_4bit,
    to_bnb_4bit_state_dict,
    to_bnb_state_dict_8bit,
)
from qflax.linen.dense_4bit import Dense4bit, DenseFP4, DenseNF4
from qflax.linen.dense_8bit import Dense8bitLt, dense_kernel_from_int8, int8_weight_from_kernel
from qflax.linen.embed import Embed, Embed8bit, StableEmbed
from qflax.linen.embed_4bit import Embed4bit, EmbedFP4, EmbedNF4
from qflax.linen.lora import LoRADense4bit
from qflax.linen.optim_32bit import params_kept_32bit, state_labels_32bit
from qflax.linen.outlier_aware import OutlierAwareDense, find_outlier_dims, quantize_outlier_aware
from qflax.linen.switchback import (
    StandardDense,
    SwitchBackDense,
    SwitchBackDenseBnb,
    SwitchBackDenseGlobal,
    SwitchBackDenseGlobalMemEfficient,
    SwitchBackDenseVectorwise,
    prepare_for_eval,
)

__all__ = [
    "Dense4bit", "Dense8bitLt", "DenseFP4", "DenseNF4", "Embed", "Embed4bit", "Embed8bit", "EmbedFP4",
    "EmbedNF4", "LoRADense4bit", "OutlierAwareDense", "OutlierSplitWeight", "QuantRules", "Rule", "StableEmbed",
    "StandardDense", "SwitchBackDense", "SwitchBackDenseBnb", "SwitchBackDenseGlobal",
    "SwitchBackDenseGlobalMemEfficient", "SwitchBackDenseVectorwise", "dense_kernel_from_int8",
    "find_outlier_dims", "from_bnb_checkpoint", "int8_weight_from_kernel", "params_kept_32bit",
    "prepare_for_eval", "quantize_outlier_aware", "quantize_params", "state_labels_32bit", "to_bnb_checkpoint",
    # Deprecated aliases, removed in the next release.
    "from_bnb_state_dict_8bit", "load_bnb_4bit", "quantize_params_4bit", "quantize_params_8bit", "save_bnb_4bit",
    "to_bnb_4bit_state_dict", "to_bnb_state_dict_8bit",
]
