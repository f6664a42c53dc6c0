"""qflax layers as Flax NNX modules: thin shells over :mod:`qflax.ops` and :mod:`qflax.layers`, twins of
:mod:`qflax.linen` (which this package never imports).

Frozen quantized weights live in :class:`QuantizedWeight` (an ``nnx.Variable`` that is not
an ``nnx.Param``), so ``nnx.grad``, ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``nnx.jit``,
``nnx.split``/``nnx.merge``, ``nnx.vmap``/``nnx.scan`` and orbax work unchanged.
:func:`quantize_model` quantizes a float model with a :class:`QuantRules`;
:func:`to_bnb_checkpoint` / :func:`from_bnb_checkpoint` write and read bitsandbytes checkpoints.
"""

from qflax.layers.outliers import OutlierSplitWeight
from qflax.layers.rules import QuantRules, Rule
from qflax.nnx.bnb import from_bnb_checkpoint, to_bnb_checkpoint
from qflax.nnx.checkpoint import restore_checkpoint, save_checkpoint
from qflax.nnx.convert import quantize_model
from qflax.nnx.deprecated import load_bnb_state_dict, to_bnb_state_dict
from qflax.nnx.embedding import Embed, StableEmbed, optim_32bit_filter
from qflax.nnx.fourbit import Dense4bit, DenseFP4, DenseNF4, Embed4bit, EmbedFP4, EmbedNF4
from qflax.nnx.int8 import Dense8bitLt, Embed8bit
from qflax.nnx.linen_interop import from_linen_variables, to_linen_variables
from qflax.nnx.outlier_aware import OutlierAwareDense, OutlierDims, find_outlier_dims, quantize_outlier_aware
from qflax.nnx.switchback import (
    StandardDense,
    SwitchBackDense,
    SwitchBackDenseBnb,
    SwitchBackDenseGlobal,
    SwitchBackDenseGlobalMemEfficient,
    SwitchBackDenseVectorwise,
    prepare_for_eval,
)
from qflax.nnx.variables import QuantizedWeight

__all__ = [
    "Dense4bit", "Dense8bitLt", "DenseFP4", "DenseNF4", "Embed", "Embed4bit", "Embed8bit", "EmbedFP4", "EmbedNF4",
    "OutlierAwareDense", "OutlierDims", "OutlierSplitWeight", "QuantRules", "QuantizedWeight", "Rule",
    "StableEmbed", "StandardDense", "SwitchBackDense", "SwitchBackDenseBnb", "SwitchBackDenseGlobal",
    "SwitchBackDenseGlobalMemEfficient", "SwitchBackDenseVectorwise", "find_outlier_dims",
    "from_bnb_checkpoint", "from_linen_variables", "optim_32bit_filter", "prepare_for_eval", "quantize_model",
    "quantize_outlier_aware", "restore_checkpoint", "save_checkpoint", "to_bnb_checkpoint",
    "to_linen_variables",
    # Deprecated aliases, removed in the next release.
    "load_bnb_state_dict", "to_bnb_state_dict",
]
