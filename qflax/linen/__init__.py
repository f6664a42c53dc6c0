"""Flax Linen modules over qflax.ops: 4-bit Dense/Embed layers, QLoRA adapters and weight converters."""

from qflax.linen.convert_4bit import load_bnb_4bit, quantize_params_4bit, save_bnb_4bit, to_bnb_4bit_state_dict
from qflax.linen.dense_4bit import Dense4bit, DenseFP4, DenseNF4
from qflax.linen.embed_4bit import Embed4bit, EmbedFP4, EmbedNF4
from qflax.linen.lora import LoRADense4bit

__all__ = [
    "Dense4bit", "DenseFP4", "DenseNF4", "Embed4bit", "EmbedFP4", "EmbedNF4", "LoRADense4bit",
    "load_bnb_4bit", "quantize_params_4bit", "save_bnb_4bit", "to_bnb_4bit_state_dict",
]
