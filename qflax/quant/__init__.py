"""Pure quantization math on jax arrays: code tables, 4-bit, 8-bit blockwise, LLM.int8, SwitchBack.

No Flax modules and no kernels here; every function is jit-compatible.
"""

from qflax.quant.blockwise import Blockwise8bit, dequantize_blockwise, quantize_blockwise
from qflax.quant.codebooks import DYNAMIC_MAP, FP4_TABLE, NF4_TABLE, NF4_THRESHOLDS, table_4bit
from qflax.quant.fourbit import Packed4bit, dequantize_4bit, dequantize_absmax, quantize_4bit, unpack_codes
from qflax.quant.int8 import (
    Int8Rows,
    int8_columnwise_quant,
    int8_linear_matmul,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    outlier_columns,
    outlier_mask,
    quantize_rows,
)
from qflax.quant.packing import pack_nibbles, unpack_nibbles
from qflax.quant.switchback import (
    dequantize_rowwise,
    quantize_columnwise_and_transpose,
    quantize_global,
    quantize_global_transpose,
    quantize_rowwise,
)

__all__ = [
    "Blockwise8bit", "DYNAMIC_MAP", "FP4_TABLE", "Int8Rows", "NF4_TABLE", "NF4_THRESHOLDS", "Packed4bit",
    "dequantize_4bit", "dequantize_absmax", "dequantize_blockwise", "dequantize_rowwise",
    "int8_columnwise_quant", "int8_linear_matmul", "int8_mm_dequant", "int8_vectorwise_dequant",
    "int8_vectorwise_quant", "outlier_columns", "outlier_mask", "pack_nibbles", "quantize_4bit",
    "quantize_blockwise", "quantize_columnwise_and_transpose", "quantize_global", "quantize_global_transpose",
    "quantize_rows", "quantize_rowwise", "table_4bit", "unpack_codes", "unpack_nibbles",
]
