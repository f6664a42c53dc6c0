"""Tampered 4-bit and 8-bit checkpoints: each case edits a good state dict and names the error it must raise.

Every case is a ``(name, edit, exception type, key the message must name)`` tuple; ``edit`` takes
and returns a dict of numpy arrays with bitsandbytes' keys for one weight under "weight".
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from qflax import bnb_format, quant
from qflax.checkpoint_checks import CheckpointError, CheckpointTypeError, MissingEntryError, UnexpectedEntryError

STATE = "weight.quant_state.bitsandbytes__nf4"
OUT, IN = 16, 64


def good_4bit(nested: bool) -> dict:
    """A bitsandbytes-format NF4 state dict of a (16, 64) weight, with a float32 bias."""
    w = jax.random.normal(jax.random.key(3), (OUT, IN), jnp.float32)
    sd = bnb_format.to_bnb_state_dict(quant.quantize_4bit(w, 64, "nf4", compress_statistics=nested))
    sd["bias"] = np.linspace(-1, 1, OUT, dtype=np.float32)
    return sd


def _json(sd: dict, **changes) -> dict:
    meta = json.loads(bytes(sd[STATE]))
    for field, value in changes.items():
        if value is _DROP:
            meta.pop(field)
        else:
            meta[field] = value
    sd[STATE] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    return sd


def _raw(sd: dict, text: bytes) -> dict:
    sd[STATE] = np.frombuffer(text, np.uint8).copy()
    return sd


def _set(key, value):
    def edit(sd):
        sd[key] = value(sd[key]) if callable(value) else value
        return sd

    return edit


def _drop(key):
    def edit(sd):
        del sd[key]
        return sd

    return edit


_DROP = object()
NF4_AS_FP4 = quant.FP4_TABLE.astype(np.float32)

# (name, nested, edit, exception, key named in the message)
CASES_4BIT = [
    ("packed truncated by 8 bytes", True, _set("weight", lambda a: a[:-8]), CheckpointError, "'weight'"),
    ("packed cast to float32", True, _set("weight", lambda a: a.astype(np.float32)), CheckpointError, "'weight'"),
    ("packed cast to float16", False, _set("weight", lambda a: a.astype(np.float16)), CheckpointError, "'weight'"),
    ("packed flat", False, _set("weight", lambda a: a.reshape(-1)), CheckpointError, "'weight'"),
    ("packed int64 storage", False, _set("weight", lambda a: a.astype(np.int64)), CheckpointError, "'weight'"),
    ("packed complex", False, _set("weight", lambda a: a.astype(np.complex64)), CheckpointTypeError, "'weight'"),
    ("nested_absmax missing", True, _drop("weight.nested_absmax"), MissingEntryError, "weight.nested_absmax"),
    ("nested_quant_map missing", True, _drop("weight.nested_quant_map"), MissingEntryError, "weight.nested_quant_map"),
    ("absmax missing", False, _drop("weight.absmax"), MissingEntryError, "weight.absmax"),
    ("quant_map missing", False, _drop("weight.quant_map"), MissingEntryError, "weight.quant_map"),
    ("packed missing", False, _drop("weight"), MissingEntryError, "'weight'"),
    ("quant state missing", False, _drop(STATE), KeyError, "quant_state"),
    ("quant_map short", False, _set("weight.quant_map", lambda a: a[:8]), CheckpointError, "weight.quant_map"),
    ("quant_map NaN", False, _set("weight.quant_map", lambda a: np.where(np.arange(16) == 3, np.nan, a).astype(np.float32)),
     CheckpointError, "weight.quant_map"),
    ("quant_map is FP4's", False, _set("weight.quant_map", NF4_AS_FP4), CheckpointError, "weight.quant_map"),
    ("quant_map unsorted", False, _set("weight.quant_map", lambda a: a[::-1].copy()), CheckpointError,
     "weight.quant_map"),
    ("quant_map float64", False, _set("weight.quant_map", lambda a: a.astype(np.float64)), CheckpointTypeError,
     "weight.quant_map"),
    ("nested map unsorted", True, _set("weight.nested_quant_map", lambda a: a[::-1].copy()), CheckpointError,
     "weight.nested_quant_map"),
    ("nested map short", True, _set("weight.nested_quant_map", lambda a: a[:255]), CheckpointError,
     "weight.nested_quant_map"),
    ("absmax negative", False, _set("weight.absmax", lambda a: -a), CheckpointError, "weight.absmax"),
    ("absmax one short", False, _set("weight.absmax", lambda a: a[:-1]), CheckpointError, "weight.absmax"),
    ("absmax float not codes", True, _set("weight.absmax", lambda a: a.astype(np.float32)), CheckpointTypeError,
     "weight.absmax"),
    ("absmax codes not float", False, _set("weight.absmax", lambda a: a.astype(np.uint8)), CheckpointTypeError,
     "weight.absmax"),
    ("nested_absmax negative", True, _set("weight.nested_absmax", lambda a: -a - 1), CheckpointError,
     "weight.nested_absmax"),
    ("nested_absmax too long", True, _set("weight.nested_absmax", lambda a: np.r_[a, a]), CheckpointError,
     "weight.nested_absmax"),
    ("nested_offset null", True, lambda sd: _json(sd, nested_offset=None), CheckpointError, "nested_offset"),
    ("nested_offset NaN", True, lambda sd: _json(sd, nested_offset=float("nan")), CheckpointError, "nested_offset"),
    ("nested_offset Infinity", True, lambda sd: _json(sd, nested_offset=float("inf")), CheckpointError,
     "nested_offset"),
    ("nested_offset string", True, lambda sd: _json(sd, nested_offset="0.1"), CheckpointError, "nested_offset"),
    ("nested_offset dropped", True, lambda sd: _json(sd, nested_offset=_DROP), CheckpointError, "nested_offset"),
    ("nested_dtype float16", True, lambda sd: _json(sd, nested_dtype="float16"), CheckpointError, "nested_dtype"),
    ("nested_blocksize 0", True, lambda sd: _json(sd, nested_blocksize=0), ValueError, "nested_blocksize"),
    ("blocksize 64.0", False, lambda sd: _json(sd, blocksize=64.0), CheckpointTypeError, "blocksize"),
    ("blocksize '64'", False, lambda sd: _json(sd, blocksize="64"), CheckpointTypeError, "blocksize"),
    ("blocksize true", False, lambda sd: _json(sd, blocksize=True), CheckpointTypeError, "blocksize"),
    ("blocksize 0", False, lambda sd: _json(sd, blocksize=0), ValueError, "blocksize"),
    ("blocksize 128", False, lambda sd: _json(sd, blocksize=128), CheckpointError, "weight.absmax"),
    ("blocksize 48", False, lambda sd: _json(sd, blocksize=48), ValueError, "blocksize"),
    ("dtype float64", False, lambda sd: _json(sd, dtype="float64"), ValueError, "dtype"),
    ("shape larger", False, lambda sd: _json(sd, shape=[OUT + 1, IN]), CheckpointError, "weight"),
    ("shape wraps int64", False, lambda sd: _json(sd, shape=[2**62, 4]), CheckpointError, "weight"),
    ("shape 2**32 x 2**32", False, lambda sd: _json(sd, shape=[2**32, 2**32]), CheckpointError, "weight"),
    ("shape negative", False, lambda sd: _json(sd, shape=[-OUT, -IN]), CheckpointError, "shape"),
    ("shape zero", False, lambda sd: _json(sd, shape=[0, IN]), CheckpointError, "shape"),
    ("shape float", False, lambda sd: _json(sd, shape=[16.0, 64]), CheckpointTypeError, "shape"),
    ("shape string", False, lambda sd: _json(sd, shape="16,64"), CheckpointTypeError, "shape"),
    ("JSON quant_type fp4", False, lambda sd: _json(sd, quant_type="fp4"), ValueError, "quant_type"),
    ("JSON unknown field", False, lambda sd: _json(sd, surprise=1), UnexpectedEntryError, "surprise"),
    ("JSON field dropped", False, lambda sd: _json(sd, dtype=_DROP), CheckpointError, "dtype"),
    ("JSON not UTF-8", False, lambda sd: _raw(sd, b"\xff\xfe{}"), CheckpointError, "UTF-8"),
    ("JSON not an object", False, lambda sd: _raw(sd, b"[1, 2]"), CheckpointError, "JSON object"),
    ("JSON truncated", False, lambda sd: _raw(sd, bytes(sd[STATE])[:-5]), CheckpointError, "JSON"),
    ("JSON entry float", False, _set(STATE, lambda a: a.astype(np.float32)), CheckpointTypeError, "quant_state"),
    ("extra key", False, _set("weight.surprise", np.zeros(1, np.float32)), UnexpectedEntryError, "weight.surprise"),
    ("nested keys, plain JSON", False, _set("weight.nested_absmax", np.ones(1, np.float32)), UnexpectedEntryError,
     "weight.nested_absmax"),
]


def good_int8() -> dict:
    """A bitsandbytes Linear8bitLt state dict (weight int8 (16, 64), SCB, weight_format, bias)."""
    w = jax.random.normal(jax.random.key(4), (OUT, IN), jnp.float32)
    sd = bnb_format.to_bnb_int8_state_dict(quant.quantize_rows(w))
    sd["bias"] = np.linspace(-1, 1, OUT, dtype=np.float32)
    return sd


CASES_INT8 = [
    ("float weight with SCB", _set("weight", lambda a: a.astype(np.float32)), CheckpointTypeError, "'weight'"),
    ("uint8 weight with SCB", _set("weight", lambda a: a.view(np.uint8)), CheckpointTypeError, "'weight'"),
    ("int8 weight without SCB", _drop("SCB"), MissingEntryError, "SCB"),
    ("SCB short", _set("SCB", lambda a: a[:-1]), CheckpointError, "'SCB'"),
    ("SCB negative", _set("SCB", lambda a: -a), CheckpointError, "'SCB'"),
    ("SCB float16", _set("SCB", lambda a: a.astype(np.float16)), CheckpointTypeError, "'SCB'"),
    ("weight 1-D", _set("weight", lambda a: a.reshape(-1)), CheckpointTypeError, "'weight'"),
    ("weight_format col32", _set("weight_format", np.array(1, np.uint8)), ValueError, "col32"),
    ("weight_format 7", _set("weight_format", np.array(7, np.uint8)), ValueError, "got 7"),
    ("weight_format 0.5", _set("weight_format", np.array(0.5, np.float32)), CheckpointTypeError, "weight_format"),
    ("weight_format two entries", _set("weight_format", np.zeros(2, np.uint8)), CheckpointTypeError, "weight_format"),
]
