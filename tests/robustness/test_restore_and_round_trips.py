"""NNX orbax restore against mismatched models, and byte-identical round trips (dtypes and shapes too)."""

import numpy as np
import pytest
import torch

import torch_compat as bnb
from flax import nnx
from qflax.checkpoint_checks import dtype_name
from qflax import nnx as qnnx
from qflax.linen import from_bnb_checkpoint, to_bnb_checkpoint
from tests.robustness.tampering import IN, OUT, good_4bit

pytest.importorskip("orbax.checkpoint")


def _linear():
    return nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "saved,target",
    [
        (dict(cls="DenseNF4", compress_statistics=True), dict(cls="DenseNF4", compress_statistics=False)),
        (dict(cls="DenseNF4", compress_statistics=False), dict(cls="DenseNF4", compress_statistics=True)),
        (dict(cls="DenseNF4", compress_statistics=True), dict(cls="DenseFP4", compress_statistics=True)),
        (dict(cls="DenseFP4", compress_statistics=False), dict(cls="DenseNF4", compress_statistics=False)),
        (dict(cls="DenseNF4", blocksize=64), dict(cls="DenseNF4", blocksize=128)),
    ],
)
def test_restore_into_other_quantization_settings_raises_and_changes_nothing(tmp_path, saved, target):
    linear = _linear()
    make = lambda spec: getattr(qnnx, spec["cls"]).from_linear(  # noqa: E731
        linear, **{k: v for k, v in spec.items() if k != "cls"}
    )
    qnnx.save_checkpoint(str(tmp_path / "ck"), make(saved))
    model = make(target)
    before = qnnx.to_bnb_checkpoint(model)
    with pytest.raises(ValueError, match="weight"):
        qnnx.restore_checkpoint(str(tmp_path / "ck"), model)
    after = qnnx.to_bnb_checkpoint(model)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_restore_into_the_same_settings_is_byte_identical(tmp_path):
    source = qnnx.DenseNF4.from_linear(_linear())
    qnnx.save_checkpoint(str(tmp_path / "ck"), source)
    model = qnnx.restore_checkpoint(str(tmp_path / "ck"), qnnx.DenseNF4.from_linear(nnx.Linear(IN, OUT, rngs=nnx.Rngs(9))))
    a, b = qnnx.to_bnb_checkpoint(source), qnnx.to_bnb_checkpoint(model)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _as_torch(sd):
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linen_bnb_checkpoint_round_trip_keeps_bytes_dtypes_and_shapes(storage, bias_dtype):
    layer = bnb.nn.LinearNF4(IN, OUT, quant_storage=storage).to("cpu")
    layer.bias.data = layer.bias.data.to(bias_dtype)
    sd = {f"fc.{k}": v for k, v in layer.state_dict().items()}
    back = to_bnb_checkpoint(from_bnb_checkpoint(sd))
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        got = back[key]
        assert dtype_name(got) == str(value.dtype).replace("torch.", ""), key
        assert tuple(got.shape) == tuple(value.shape), key
        raw = value.contiguous().view(torch.uint8).numpy() if value.dim() else value.view(torch.uint8).numpy()
        assert np.asarray(got).tobytes() == raw.tobytes(), key


def test_torch_compat_state_dict_round_trip_is_byte_identical():
    sd = _as_torch(good_4bit(True))
    layer = bnb.nn.LinearNF4(IN, OUT)
    layer.load_state_dict(sd)
    again = layer.state_dict()
    assert again.keys() == sd.keys()
    assert all(again[k].dtype == sd[k].dtype and torch.equal(again[k], sd[k]) for k in sd)
