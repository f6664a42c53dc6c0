"""Flax Linen modules: thin shells over qflax.ops.

Frozen quantized weights live in the variable collection "quantized" (never in "params"),
so ``jax.grad`` over ``variables["params"]`` always works.
"""

from qflax.linen.convert_8bit import (
    dense_kernel_from_int8,
    from_bnb_state_dict_8bit,
    int8_weight_from_kernel,
    quantize_dense_params,
    to_bnb_state_dict_8bit,
)
from qflax.linen.dense_8bit import Dense8bitLt
from qflax.linen.embed import Embed, Embed8bit, StableEmbed
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
    "Dense8bitLt", "Embed", "Embed8bit", "OutlierAwareDense", "OutlierSplitWeight", "StableEmbed",
    "StandardDense", "SwitchBackDense", "SwitchBackDenseBnb", "SwitchBackDenseGlobal",
    "SwitchBackDenseGlobalMemEfficient", "SwitchBackDenseVectorwise", "dense_kernel_from_int8",
    "find_outlier_dims", "from_bnb_state_dict_8bit", "int8_weight_from_kernel", "params_kept_32bit",
    "prepare_for_eval", "quantize_dense_params", "quantize_outlier_aware", "state_labels_32bit",
    "to_bnb_state_dict_8bit",
]
