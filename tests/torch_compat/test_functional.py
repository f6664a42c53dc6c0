"""torch_compat.functional against bitsandbytes.functional 0.49.2 on CPU."""

import numpy as np
import pytest
import torch

import torch_compat as tc

F = tc.functional


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_nf4_packed_bytes_and_state_identical(bnb_ref, gen, dtype, blocksize):
    A = torch.randn(96, 128, generator=gen).to(dtype)
    q_ref, s_ref = bnb_ref.functional.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
    q, s = F.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape and torch.equal(q, q_ref)
    assert s == s_ref
    packed, packed_ref = s.as_dict(packed=True), s_ref.as_dict(packed=True)
    assert list(packed) == list(packed_ref)
    for k in packed:
        assert packed[k].dtype == packed_ref[k].dtype and torch.equal(packed[k], packed_ref[k]), k
    unpacked, unpacked_ref = s.as_dict(), s_ref.as_dict()
    assert {k: v for k, v in unpacked.items() if not torch.is_tensor(v)} == {
        k: v for k, v in unpacked_ref.items() if not torch.is_tensor(v)}
    # dequantization: independent numpy decode of the bytes (table[code] * absmax[i // blocksize])
    codes = np.stack([q.numpy().reshape(-1) >> 4, q.numpy().reshape(-1) & 15], 1).reshape(-1)
    expected = s_ref.code.numpy()[codes] * np.repeat(s_ref.absmax.numpy(), blocksize)[: codes.size]
    torch.testing.assert_close(F.dequantize_4bit(q, s), torch.from_numpy(expected).reshape(A.shape).to(dtype),
                               atol=0, rtol=0)
    if blocksize < 256:  # bitsandbytes' own CPU dequant is wrong at blocksize 256 on this AVX512 machine
        torch.testing.assert_close(F.dequantize_4bit(q, s), bnb_ref.functional.dequantize_4bit(q_ref, s_ref),
                                   atol=0, rtol=0)


def test_nested_state_round_trips_and_matches_bnb_codes(bnb_ref, gen):
    A = torch.randn(64, 256, generator=gen)
    q_ref, s_ref = bnb_ref.functional.quantize_4bit(A, quant_type="nf4", compress_statistics=True)
    q, s = F.quantize_4bit(A, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q, q_ref) and torch.equal(s.absmax, s_ref.absmax) and s.absmax.dtype == torch.uint8
    # the offset (a float32 mean) may differ in its last bit from torch's sum (README), and so may nested_absmax
    torch.testing.assert_close(s.state2.absmax, s_ref.state2.absmax, atol=0, rtol=1e-6)
    back = F.QuantState.from_dict(s.as_dict(packed=True), device="cpu")
    assert back == s
    # a bitsandbytes state dict decodes to bitsandbytes' own dequantization
    ref_back = F.QuantState.from_dict(s_ref.as_dict(packed=True), device="cpu")
    torch.testing.assert_close(F.dequantize_4bit(q_ref, ref_back), bnb_ref.functional.dequantize_4bit(q_ref, s_ref),
                               atol=1e-6, rtol=1e-6)


def test_from_dict_errors_like_bnb(bnb_ref, gen):
    _, s = F.quantize_4bit(torch.randn(64, 64, generator=gen), quant_type="nf4")
    packed = s.as_dict(packed=True)
    for qs_cls in (F.QuantState, bnb_ref.functional.QuantState):
        with pytest.raises(ValueError, match="found neither"):
            qs_cls.from_dict({k: v for k, v in packed.items() if "quant_state" not in k}, device="cpu")
        with pytest.raises(ValueError, match="exactly one"):
            qs_cls.from_dict(dict(packed, **{"x.quant_state.bitsandbytes__fp4": packed[
                "quant_state.bitsandbytes__nf4"]}), device="cpu")
        with pytest.raises(ValueError):
            qs_cls.from_dict(s.as_dict(), device="cpu")  # unpacked dicts are rejected
        with pytest.raises(AssertionError):
            qs_cls.from_dict(dict(packed, bias=torch.zeros(1)), device="cpu")


def test_fp4_uses_exact_table_and_odd_counts_pad(gen):
    assert F.get_4bit_type("fp4")[2].item() == pytest.approx(2 / 3, abs=1e-7)
    A = torch.randn(7, 9, generator=gen)  # 63 elements: bitsandbytes' CPU path raises, we pad
    q, s = F.quantize_4bit(A, quant_type="fp4")
    assert q.shape == (32, 1) and F.dequantize_4bit(q, s).shape == (7, 9)
    assert (F.dequantize_4bit(q, s) - A).abs().max() <= A.abs().max() * 0.25


def test_quant_storage_views(gen):
    A = torch.randn(32, 64, generator=gen)
    q8, s = F.quantize_4bit(A, quant_type="nf4")
    for storage, itemsize in ((torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4)):
        q, s2 = F.quantize_4bit(A, quant_type="nf4", quant_storage=storage)
        assert q.dtype == storage and q.shape == (1024 // itemsize, 1)
        assert torch.equal(q.view(torch.uint8).reshape(-1, 1), q8)
        torch.testing.assert_close(F.dequantize_4bit(q, s2), F.dequantize_4bit(q8, s), atol=0, rtol=0)


def test_blockwise_matches_bnb_and_never_mutates_the_map(bnb_ref, gen):
    A = torch.randn(5000, generator=gen)
    code = F.create_dynamic_map()
    before = code.clone()
    q, s = F.quantize_blockwise(A, code=code, blocksize=256)
    assert torch.equal(code, before)
    q_ref, s_ref = bnb_ref.functional.quantize_blockwise(A, blocksize=256)
    # bitsandbytes' CPU map has -1.0 in entry 0 after this call (docs/blockwise.md#dynamic-map); codes only differ
    # at the extreme
    assert (q.int() - q_ref.int()).abs().max() <= 1 and (q != q_ref).float().mean() < 1e-3
    torch.testing.assert_close(s.absmax, s_ref.absmax, atol=0, rtol=0)
    torch.testing.assert_close(F.dequantize_blockwise(q, s), bnb_ref.functional.dequantize_blockwise(q_ref, s_ref),
                               atol=0.02, rtol=0.02)
    qn, sn = F.quantize_blockwise(A, blocksize=256, nested=True)
    assert sn.nested and sn.absmax.dtype == torch.uint8
    torch.testing.assert_close(F.dequantize_blockwise(qn, sn), F.dequantize_blockwise(q, s), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_int8_primitives_match_bnb(bnb_ref, gen, threshold):
    A = (torch.randn(12, 40, generator=gen) * 1.5).half()
    CA, rs, cols = F.int8_vectorwise_quant(A, threshold)
    CA_r, rs_r, cols_r = bnb_ref.functional.int8_vectorwise_quant(A, threshold)
    assert torch.equal(CA, CA_r) and torch.equal(rs, rs_r)
    assert (cols is None and cols_r is None) or torch.equal(cols, cols_r)
    torch.testing.assert_close(F.int8_vectorwise_dequant(CA, rs), bnb_ref.functional.int8_vectorwise_dequant(CA, rs))
    B, _, _ = F.int8_vectorwise_quant(torch.randn(24, 40, generator=gen))
    acc = F.int8_linear_matmul(CA, B)
    assert acc.dtype == torch.int32 and torch.equal(acc, bnb_ref.functional.int8_linear_matmul(CA, B))
    col_stats = torch.rand(24, generator=gen) + 0.5
    bias = torch.randn(24, generator=gen)
    out = F.int8_mm_dequant(acc, rs, col_stats, bias=bias)
    out_ref = bnb_ref.functional.int8_mm_dequant(acc, rs, col_stats, bias=bias)
    assert out.dtype == out_ref.dtype == torch.float16
    torch.testing.assert_close(out, out_ref, atol=2e-3, rtol=2e-3)


def test_gemv_4bit_requires_state(gen):
    q, s = F.quantize_4bit(torch.randn(16, 64, generator=gen), quant_type="nf4")
    with pytest.raises(ValueError, match="state cannot be None"):
        F.gemv_4bit(torch.randn(1, 64), q.t())
    out = F.gemv_4bit(torch.randn(1, 64, generator=gen).bfloat16(), q.t(), state=s)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 16)
