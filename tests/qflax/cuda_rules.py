"""A small, independent numpy reference of bitsandbytes' CUDA 4-bit rules (docs/fourbit.md#rounding).

Written from the tables of docs/fourbit.md, not from qflax's code: thresholds are derived here as float64
midpoints of the tables, FP4 codes by an explicit if-chain, and packing by plain loops over
numpy arrays.
"""

import numpy as np

NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)
FP4_MAGNITUDE = {0: 0.0, 1: 0.0625, 2: 8.0, 3: 12.0, 4: 4.0, 5: 6.0, 6: 2.0, 7: 3.0}
FP4 = np.array([FP4_MAGNITUDE[i % 8] / 12 * (-1 if i >= 8 else 1) for i in range(16)], dtype=np.float32)


def nf4_code(s: float) -> int:
    thresholds = np.float32((NF4[:-1] + NF4[1:]) / 2)
    return int(np.sum(np.float32(s) > thresholds))


def fp4_code(s: float) -> int:
    sign = 8 if s < 0 else 0
    a = abs(s)
    if a <= np.float32(0.00260417):
        m = 0
    elif a <= np.float32(0.0859375):
        m = 1
    elif a <= np.float32(0.20833333):
        m = 6
    elif a <= np.float32(0.29166667):
        m = 7
    elif a <= np.float32(0.4166667):
        m = 4
    elif a <= np.float32(0.583333):
        m = 5
    elif a <= np.float32(0.8333333):
        m = 2
    else:
        m = 3
    return m | sign


def quantize(x: np.ndarray, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (codes per element, flat, padded to even length; float32 absmax per block)."""
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    nblocks = -(-n // blocksize)
    absmax = np.array([np.abs(flat[b * blocksize:(b + 1) * blocksize]).max() for b in range(nblocks)], np.float32)
    encode = nf4_code if quant_type == "nf4" else fp4_code
    codes = []
    for i in range(n + n % 2):
        b = i // blocksize
        if absmax[b] == 0:
            # qflax's one deliberate deviation: an all-zero block gets the code of 0.0
            # (CUDA emits code 0 there, which NF4 decodes as -absmax).
            codes.append(7 if quant_type == "nf4" else 0)
            continue
        value = flat[i] if i < n else np.float32(0)
        codes.append(encode(value * (np.float32(1) / absmax[b])))
    return np.array(codes, dtype=np.uint8), absmax


def pack(codes: np.ndarray) -> np.ndarray:
    """Two codes per byte, even element in the high nibble; shape (len/2, 1)."""
    out = np.zeros((len(codes) // 2, 1), np.uint8)
    for j in range(len(codes) // 2):
        out[j, 0] = (int(codes[2 * j]) << 4) | int(codes[2 * j + 1])
    return out


def dequantize(entries: dict, prefix: str = "weight") -> np.ndarray:
    """Decodes bitsandbytes' state-dict entries of a 4-bit weight to float32 values, flat.

    Element ``i`` is ``quant_map[code_i] * absmax[i // blocksize]``; a double-quantized absmax is
    ``nested_quant_map[code_b] * nested_absmax[b // nested_blocksize] + nested_offset``, all in float32.
    """
    import json

    meta = json.loads(bytes(next(v for k, v in entries.items() if ".quant_state." in k)))
    n = int(np.prod(meta["shape"]))
    packed = np.asarray(entries[prefix]).reshape(-1)
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]
    absmax = np.asarray(entries[f"{prefix}.absmax"])
    if "nested_offset" in meta:
        blocks = np.arange(absmax.size) // meta["nested_blocksize"]
        scale = np.asarray(entries[f"{prefix}.nested_absmax"], np.float32)[blocks]
        absmax = np.asarray(entries[f"{prefix}.nested_quant_map"], np.float32)[absmax] * scale
        absmax = absmax + np.float32(meta["nested_offset"])
    table = np.asarray(entries[f"{prefix}.quant_map"], np.float32)
    return table[codes] * absmax.astype(np.float32)[np.arange(n) // meta["blocksize"]]
