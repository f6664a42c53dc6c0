"""Flax Linen modules: thin shells over qflax.ops, plus weight converters.

Frozen quantized weights live in the variable collection "quantized" (never in "params"),
so ``jax.grad`` over ``variables["params"]`` always works.
"""

from qflax.linen.convert_4bit import load_bnb_4bit, quantize_params_4bit, save_bnb_4bit, to_bnb_4bit_state_dict
from qflax.linen.convert_8bit import (
    dense_kernel_from_int8,
    from_bnb_state_dict_8bit,
    int8_weight_from_kernel,
    quantize_params_8bit,
    to_bnb_state_dict_8bit,
)
from qflax.linen.dense_4bit import Dense4bit, DenseFP4, DenseNF4
from qflax.linen.dense_8bit import Dense8bitLt
from qflax.linen.embed import Embed, Embed8bit, StableEmbed
from qflax.linen.embed_4bit import Embed4bit, EmbedFP4, EmbedNF4
from qflax.linen.lora import LoRADense4bit
from qflax.linen.optim_32bit import params_kept_32bit, state_labels_32bit
from qflax.linen.outlier_aware import (
    OutlierAwareDense,
    OutlierSplitWeight,
    find_outlier_dims,
    quantize_outlier_aware,
)
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
    "EmbedNF4", "LoRADense4bit", "OutlierAwareDense", "OutlierSplitWeight", "StableEmbed", "StandardDense",
    "SwitchBackDense", "SwitchBackDenseBnb", "SwitchBackDenseGlobal", "SwitchBackDenseGlobalMemEfficient",
    "SwitchBackDenseVectorwise", "dense_kernel_from_int8", "find_outlier_dims", "from_bnb_state_dict_8bit",
    "int8_weight_from_kernel", "load_bnb_4bit", "params_kept_32bit", "prepare_for_eval", "quantize_params_8bit",
    "quantize_outlier_aware", "quantize_params_4bit", "save_bnb_4bit", "state_labels_32bit",
    "to_bnb_4bit_state_dict", "to_bnb_state_dict_8bit",
]
