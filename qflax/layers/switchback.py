"""SwitchBack settings shared by the Linen and NNX layers (docs/switchback.md)."""

import jax

from qflax.quant.switchback import quantize_global, quantize_rowwise

# The fixed-setting variants of SwitchBackDense: (name, bitsandbytes name, fixed settings).
FIXED_VARIANTS = (
    ("SwitchBackDenseGlobal", "SwitchBackLinearGlobal", {"vector_wise_quantization": False}),
    ("SwitchBackDenseVectorwise", "SwitchBackLinearVectorwise", {"vector_wise_quantization": True}),
    (
        "SwitchBackDenseGlobalMemEfficient",
        "SwitchBackLinearGlobalMemEfficient",
        {"vector_wise_quantization": False, "mem_efficient": True},
    ),
)


def op_variant(vector_wise_quantization: bool, mem_efficient: bool) -> str:
    """The ``qflax.ops.switchback_matmul`` variant of a layer's settings.

    Returns:
      "global", "vectorwise" or "global_mem_efficient".

    Raises:
      ValueError: vector-wise quantization with the memory-efficient backward pass (bitsandbytes
        calls ``exit(1)`` there).
    """
    if vector_wise_quantization and mem_efficient:
        raise ValueError(
            "vector_wise_quantization=True cannot be combined with mem_efficient=True: the "
            "memory-efficient backward pass exists for global (tensor-wise) quantization only"
        )
    if vector_wise_quantization:
        return "vectorwise"
    return "global_mem_efficient" if mem_efficient else "global"


def prepared_variant(vector_wise_quantization: bool) -> str:
    """The ``switchback_matmul_prepared`` variant: "vectorwise" or "global"."""
    return "vectorwise" if vector_wise_quantization else "global"


def quantize_for_eval(weight: jax.Array, vector_wise_quantization: bool) -> tuple[jax.Array, jax.Array]:
    """``prepare_for_eval``'s int8 weight and absmax of a float ``(out, in)`` weight.

    Returns:
      ``(codes int8 (out, in), scale)``: scale ``(out,)`` vector-wise, ``(1,)`` global.
    """
    return (quantize_rowwise if vector_wise_quantization else quantize_global)(weight)
