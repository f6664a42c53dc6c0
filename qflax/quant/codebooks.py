"""Code tables of bitsandbytes 0.49.2: NF4, FP4 and the 8-bit dynamic map (docs/fourbit.md#code-tables).

The tables are float32 numpy arrays (module constants, never mutated). The decision
thresholds follow the CUDA kernels (docs/fourbit.md#rounding), which are the canonical quantizer rules
in qflax: they agree bit for bit with bitsandbytes on CUDA, and for NF4 on CPU too.
"""

import numpy as np

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (docs/fourbit.md#code-tables). Index = 4-bit code.
NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# The CUDA kernel's NF4 decision tree compares against these float32 literals with a
# strict ">": code = number of thresholds strictly below the scaled value.
NF4_THRESHOLDS = np.array(
    [
        -0.8480964004993439,
        -0.6106329262256622,
        -0.4599952697753906,
        -0.33967943489551544,
        -0.23460740596055984,
        -0.13791173323988914,
        -0.045525018125772476,
        0.03979014977812767,
        0.1202552504837513,
        0.2035212516784668,
        0.2920137718319893,
        0.3893125355243683,
        0.5016634166240692,
        0.6427869200706482,
        0.8614784181118011,
    ],
    dtype=np.float32,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit): raw magnitude per 3-bit pattern, divided by
# 12 (the exact table of get_4bit_type("fp4"); bit 3 is the sign).
_FP4_RAW_MAGNITUDE = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=np.float32)
FP4_TABLE = np.concatenate([_FP4_RAW_MAGNITUDE / 12, -_FP4_RAW_MAGNITUDE / 12]).astype(np.float32)

# CUDA's FP4 magnitude thresholds (|s| <= t picks the lower magnitude) in increasing
# order, and the 3-bit magnitude code of each interval between them.
FP4_MAGNITUDE_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=np.float32
)
FP4_MAGNITUDE_CODES = np.array([0, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)
FP4_SIGN_BIT = 8

QUANT_TYPES = ("nf4", "fp4")


def table_4bit(quant_type: str) -> np.ndarray:
    """Returns the 16-entry float32 table of a 4-bit quant type.

    Args:
      quant_type: "nf4" or "fp4".

    Returns:
      A fresh float32 numpy array of shape (16,), indexed by 4-bit code.
    """
    if quant_type == "nf4":
        return NF4_TABLE.copy()
    if quant_type == "fp4":
        return FP4_TABLE.copy()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _torch_style_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace computed the way torch's (vectorised, fused multiply-add) CPU kernel does.

    torch fills the first half as start + i*step and the second half as
    end - (steps-1-i)*step with one rounding each (an FMA); a float64 product and sum
    rounded once to float32 is the same thing. numpy's float64 linspace differs in 22
    entries of the dynamic map (docs/blockwise.md#dynamic-map).
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    index = np.arange(steps)
    from_start = (np.float64(start32) + step * index).astype(np.float32)
    from_end = (np.float64(end32) - step * (steps - 1 - index)).astype(np.float32)
    return np.where(index < steps // 2, from_start, from_end)


def _create_dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map (max_exponent_bits=7, total_bits=8), docs/blockwise.md#dynamic-map."""
    values = []
    for i in range(7):
        bounds = _torch_style_linspace_f32(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        values.append(scale * means)
        values.append(-scale * means)
    values.append(np.array([0.0, 1.0], dtype=np.float32))
    return np.sort(np.concatenate(values).astype(np.float32))


# 256 entries, index 0 = -0.99296874 (the CUDA value; bitsandbytes' CPU path later
# overwrites its cached copy with -1.0, docs/blockwise.md#dynamic-map — we never mutate ours).
DYNAMIC_MAP = _create_dynamic_map()
DYNAMIC_MAP.setflags(write=False)
for _table in (NF4_TABLE, NF4_THRESHOLDS, FP4_TABLE, FP4_MAGNITUDE_THRESHOLDS, FP4_MAGNITUDE_CODES):
    _table.setflags(write=False)


def midpoints(code: np.ndarray) -> np.ndarray:
    """Decision boundaries of a sorted code: the float32 midpoints of neighbours.

    A value equal to a midpoint goes to the lower code (bitsandbytes' tie rule).
    """
    code = np.asarray(code, dtype=np.float32)
    return ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
