"""Bit-exactness of qflax.quant 4-bit against bitsandbytes 0.49.2 on CPU (docs/fourbit.md, docs/state_dict.md).

bitsandbytes' CPU path differs from its CUDA rules in known places (docs/fourbit.md#rounding),
so: NF4 codes are compared byte for byte on full blocks, except elements sitting on a
decision midpoint to within float32 rounding (there the independent CUDA-rule reference of
cuda_rules.py must agree with us); trailing partial blocks of fp16/bf16 input (which
bitsandbytes scales in half precision) and all FP4 codes are compared against the CUDA-rule
reference, and FP4 values against bitsandbytes' dequantization within tolerance.
"""

import itertools
import json
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from qflax import bnb_format, quant
from qflax.quant import blockwise, codebooks
from tests.qflax import cuda_rules
from tests.qflax.bnb_oracle import TORCH_DTYPES, bnb_functional as F, state_dict_of, torch, torch_to_jax

DTYPES = ["float32", "float16", "bfloat16"]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = [(64, 128), (30, 70), (3, 1000)]  # full blocks; partial trailing blocks; one partial block for big bs
# A pairwise covering set of dtype x blocksize x shape x nested (24 cases instead of all 144): every
# blocksize meets every dtype and every shape, both nested settings, and so on for every pair of factors.
# Shapes and nesting rotate with (dtype + blocksize) so that the pairs come out as Latin squares.
NF4_CASES = [
    (dtype, blocksize, SHAPES[(d + b) % 3], (d + b) % 2 == 1)
    for b, blocksize in enumerate(BLOCKSIZES)
    for d, dtype in enumerate(DTYPES)
]


def _near_midpoint(scaled: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Elements within 2 float32 ulps of a midpoint between neighbouring table entries."""
    mids = (table[:-1].astype(np.float64) + table[1:]) / 2
    dist = np.min(np.abs(scaled.astype(np.float64)[:, None] - mids[None, :]), axis=1)
    return dist <= 2 * np.spacing(np.float32(1))


def test_nf4_cases_cover_every_pair_of_settings():
    factors = [DTYPES, BLOCKSIZES, SHAPES, [False, True]]
    for i, j in itertools.combinations(range(4), 2):
        seen = {(case[i], case[j]) for case in NF4_CASES}
        assert seen == set(itertools.product(factors[i], factors[j])), (i, j)


@pytest.mark.parametrize("dtype,blocksize,shape,nested", NF4_CASES)
def test_nf4_bytes_match_bitsandbytes(dtype, blocksize, shape, nested):
    # crc32, not hash(): str hashes change from process to process (PYTHONHASHSEED).
    torch.manual_seed(zlib.crc32(repr((dtype, blocksize, shape, nested)).encode()))
    a = torch.randn(*shape, dtype=TORCH_DTYPES[dtype]) * 3
    packed_bnb, state = F.quantize_4bit(a, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    q = quant.quantize_4bit(torch_to_jax(a), blocksize, "nf4", compress_statistics=nested)

    ours = np.asarray(quant.unpack_codes(q))
    theirs = np.asarray(quant.unpack_nibbles(jnp.asarray(packed_bnb.numpy())))[: a.numel()]
    n = a.numel()
    full = (n // blocksize) * blocksize
    trailing_half_precision = dtype != "float32" and full < n
    compare_upto = full if trailing_half_precision else n
    differ = np.nonzero(ours[:compare_upto] != theirs[:compare_upto])[0]
    flat = a.float().numpy().reshape(-1)
    ref_codes, ref_absmax = cuda_rules.quantize(flat, blocksize, "nf4")
    if differ.size:
        scaled = flat[differ] * (np.float32(1) / ref_absmax[differ // blocksize])
        assert _near_midpoint(scaled, cuda_rules.NF4).all(), f"codes differ away from midpoints at {differ[:10]}"
        np.testing.assert_array_equal(ours[differ], ref_codes[differ])
    assert differ.size <= max(2, n // 10000)
    # Everything (incl. half-precision trailing blocks) follows the CUDA rules exactly.
    np.testing.assert_array_equal(np.asarray(q.packed), cuda_rules.pack(ref_codes))
    # Our checkpoint entries decode (by the independent numpy reader, from the packed JSON on) to what
    # qflax decodes, in float32. (bitsandbytes' own CPU decoder is not the oracle here: it misdecodes its
    # own (64, 128) weights at blocksizes 256 and 512, docs/deviations.md#cpu-decoder.)
    decoded = cuda_rules.dequantize(bnb_format.to_bnb_state_dict(q)).reshape(shape)
    ours_f32 = np.asarray(quant.dequantize_4bit(q.replace(dtype="float32")))
    np.testing.assert_allclose(ours_f32, decoded, rtol=2 * np.finfo(np.float32).eps, atol=0)

    if not nested:
        np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
        return
    # Double quantization: the offset is a float32 mean; ours is correctly rounded (checked
    # against float64), torch's threaded cascade sum may be a few ulps off; allow 4 ulps there, and check the nested
    # statistics bit for bit and the nested codes up to bitsandbytes' CPU search (below), given
    # bitsandbytes' own offset.
    offset_bnb = np.float32(state.offset.item())
    exact = np.float32(np.mean(ref_absmax.astype(np.float64)))
    assert abs(np.float32(q.nested_offset) - exact) <= np.spacing(exact)
    assert abs(np.float32(q.nested_offset) - offset_bnb) <= 4 * np.spacing(offset_bnb)
    raw_absmax = jnp.asarray(ref_absmax)
    codes, nested_absmax = blockwise.quantize_flat(
        raw_absmax - jnp.float32(offset_bnb), jnp.asarray(codebooks.DYNAMIC_MAP), 256
    )
    np.testing.assert_array_equal(np.asarray(nested_absmax), state.state2.absmax.numpy())
    # 8-bit codes of the absmax: equal, except that bitsandbytes' CPU binary search sometimes
    # returns the neighbour of the nearest dynamic-map entry (seen next to the table's ends);
    # there our code must be the nearest entry and theirs the adjacent one.
    their_codes = state.absmax.numpy()
    ours_codes = np.asarray(codes)
    differ = np.nonzero(ours_codes != their_codes)[0]
    if differ.size:
        table = np.asarray(codebooks.DYNAMIC_MAP, np.float64)
        centred = (ref_absmax.astype(np.float32) - offset_bnb)[differ] / np.asarray(nested_absmax)[differ // 256]
        nearest = np.argmin(np.abs(table[None, :] - centred.astype(np.float64)[:, None]), axis=1)
        np.testing.assert_array_equal(ours_codes[differ], nearest)
        assert (np.abs(np.argsort(np.argsort(table))[their_codes[differ]]
                       - np.argsort(np.argsort(table))[ours_codes[differ]]) == 1).all()
    assert differ.size <= 1
    if np.float32(q.nested_offset) == offset_bnb:
        np.testing.assert_array_equal(np.asarray(q.absmax), np.asarray(codes))
        np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (4, 64)])
def test_state_dict_json_bytes_match_bitsandbytes(dtype, nested, shape):
    torch.manual_seed(7)
    a = torch.randn(*shape, dtype=TORCH_DTYPES[dtype])
    packed_bnb, state = F.quantize_4bit(a, blocksize=64, quant_type="nf4", compress_statistics=nested)
    theirs = state_dict_of(packed_bnb, state)
    q = quant.quantize_4bit(torch_to_jax(a), 64, "nf4", compress_statistics=nested)
    ours = bnb_format.to_bnb_state_dict(q)
    assert set(ours) == set(theirs)
    key = "weight.quant_state.bitsandbytes__nf4"
    their_json = json.loads(bytes(theirs[key].numpy()))
    our_json = json.loads(bytes(ours[key]))
    if nested:
        # Same ulp allowance as above; everything else byte-identical.
        assert abs(np.float32(our_json["nested_offset"]) - np.float32(their_json["nested_offset"])) <= 4 * np.spacing(
            np.float32(their_json["nested_offset"])
        )
        our_json["nested_offset"] = their_json["nested_offset"]
    assert json.dumps(our_json).encode() == bytes(theirs[key].numpy())
    for k in ours:
        if k == key:
            continue
        assert ours[k].dtype == theirs[k].numpy().dtype and ours[k].shape == tuple(theirs[k].shape), k
    np.testing.assert_array_equal(ours["weight.quant_map"], theirs["weight.quant_map"].numpy())
    if nested:
        # bitsandbytes' CPU path writes -1.0 into entry 0 of its dynamic map (docs/blockwise.md#dynamic-map);
        # we keep CUDA's value.
        np.testing.assert_array_equal(ours["weight.nested_quant_map"][1:], theirs["weight.nested_quant_map"].numpy()[1:])
        assert ours["weight.nested_quant_map"][0] == np.float32(-0.99296874)


def test_json_bytes_exact_when_offset_agrees():
    # fp16 inputs give absmax values whose float32 sum is exact: the whole JSON must match byte for byte.
    torch.manual_seed(3)
    a = torch.randn(4, 64, dtype=torch.float16)
    packed_bnb, state = F.quantize_4bit(a, blocksize=64, quant_type="fp4", compress_statistics=True)
    q = quant.quantize_4bit(torch_to_jax(a), 64, "fp4", compress_statistics=True)
    key = "weight.quant_state.bitsandbytes__fp4"
    assert bytes(bnb_format.to_bnb_state_dict(q)[key]) == bytes(state_dict_of(packed_bnb, state)[key].numpy())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
def test_fp4_follows_cuda_rules_and_dequantizes_like_bitsandbytes(dtype, blocksize):
    torch.manual_seed(11)
    a = torch.randn(30, 70, dtype=TORCH_DTYPES[dtype])
    q = quant.quantize_4bit(torch_to_jax(a), blocksize, "fp4")
    ref_codes, ref_absmax = cuda_rules.quantize(a.float().numpy(), blocksize, "fp4")
    np.testing.assert_array_equal(np.asarray(q.packed), cuda_rules.pack(ref_codes))
    np.testing.assert_array_equal(np.asarray(q.absmax), ref_absmax)
    # bitsandbytes decodes our bytes (its C++ kernel, exact table) to what we decode.
    sd = bnb_format.to_bnb_state_dict(q)
    state = F.QuantState.from_dict({k: torch.from_numpy(v) for k, v in sd.items() if k != "weight"}, device="cpu")
    theirs = F.dequantize_4bit(torch.from_numpy(sd["weight"]), state)
    ours = np.asarray(quant.dequantize_4bit(q).astype(jnp.float32))
    np.testing.assert_allclose(ours, theirs.float().numpy(), rtol=1e-3, atol=1e-3 * float(ref_absmax.max()))
    # And its own FP4 quantization disagrees with the CUDA rules only on a small fraction (docs/fourbit.md#rounding).
    packed_bnb, _ = F.quantize_4bit(a, blocksize=blocksize, quant_type="fp4")
    theirs_codes = np.asarray(quant.unpack_nibbles(jnp.asarray(packed_bnb.numpy())))
    assert np.mean(theirs_codes != ref_codes) < 0.02


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_bitsandbytes_checkpoint_loads_and_decodes_identically(quant_type, nested):
    torch.manual_seed(5)
    a = torch.randn(96, 64, dtype=torch.bfloat16)
    packed_bnb, state = F.quantize_4bit(a, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    q = bnb_format.from_bnb_state_dict(state_dict_of(packed_bnb, state))
    assert q.shape == (96, 64) and q.dtype == "bfloat16" and q.quant_type == quant_type and q.nested == nested
    ours = np.asarray(quant.dequantize_4bit(q).astype(jnp.float32))
    theirs = F.dequantize_4bit(packed_bnb, state).float().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-2, atol=1e-6)
    if quant_type == "nf4":
        np.testing.assert_array_equal(ours, theirs)
