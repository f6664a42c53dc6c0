"""Bad arguments get an exception of the right type that names the argument (no IndexError, ZeroDivisionError...)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_compat as bnb
from qflax import linen as qnn
from qflax import nnx as qnnx
from qflax import ops, quant

W = jnp.ones((8, 64), jnp.float32)
Q = quant.quantize_4bit(W)
SCALAR = jnp.float32(1.0)

CASES = [
    ("quantize_4bit blocksize 64.0", lambda: quant.quantize_4bit(W, blocksize=64.0), ValueError, "blocksize"),
    ("quantize_4bit blocksize 0", lambda: quant.quantize_4bit(W, blocksize=0), ValueError, "blocksize"),
    ("quantize_4bit blocksize True", lambda: quant.quantize_4bit(W, blocksize=True), ValueError, "blocksize"),
    ("quantize_blockwise blocksize 64.0", lambda: quant.quantize_blockwise(W, blocksize=64.0), ValueError, "blocksize"),
    ("quantize_4bit quant_type list", lambda: quant.quantize_4bit(W, quant_type=["nf4"]), ValueError, "quant_type"),
    ("dequantize_4bit absmax short", lambda: quant.dequantize_4bit(Q.replace(absmax=Q.absmax[:-1])), ValueError,
     "absmax"),
    ("dequantize_4bit blocksize 0", lambda: quant.dequantize_4bit(Q.replace(blocksize=0)), ValueError, "blocksize"),
    ("dequantize_4bit not Packed4bit", lambda: quant.dequantize_4bit(W), TypeError, "Packed4bit"),
    ("matmul_4bit absmax short", lambda: ops.matmul_4bit(jnp.ones((2, 64)), Q.replace(absmax=Q.absmax[:3])),
     ValueError, "absmax"),
    ("matmul_4bit quant_map short", lambda: ops.matmul_4bit(jnp.ones((2, 64)), Q.replace(quant_map=Q.quant_map[:8])),
     ValueError, "quant_map"),
    ("embed_4bit packed short", lambda: ops.embed_4bit(jnp.asarray([0]), Q.replace(packed=Q.packed[:-1])), ValueError,
     "q"),
    ("matmul_4bit scalar x", lambda: ops.matmul_4bit(SCALAR, Q), ValueError, "x"),
    ("matmul_8bit scalar x", lambda: ops.matmul_8bit(SCALAR, quant.quantize_rows(W)), ValueError, "x"),
    ("matmul_8bit_trainable scalar x", lambda: ops.matmul_8bit_trainable(SCALAR, W), ValueError, "x"),
    ("switchback scalar x", lambda: ops.switchback_matmul(SCALAR, W), ValueError, "x"),
    ("switchback_prepared scalar x", lambda: ops.switchback_matmul_prepared(SCALAR, *quant.quantize_global(W)),
     ValueError, "x"),
    ("int8_vectorwise_quant scalar", lambda: quant.int8_vectorwise_quant(SCALAR), ValueError, "x"),
    ("quantize_rowwise scalar", lambda: quant.quantize_rowwise(SCALAR), ValueError, "x"),
    ("quantize_rows scalar", lambda: quant.quantize_rows(SCALAR), ValueError, "w"),
    ("embed float ids", lambda: ops.embed_8bit(jnp.ones(2), quant.quantize_rows(W)), TypeError, "ids"),
    ("embed bool ids", lambda: ops.embed_4bit(np.ones(2, bool), Q), TypeError, "ids"),
    ("nnx Embed4bit features 0", lambda: qnnx.Embed4bit(4, 0, rngs=nnx.Rngs(0)), ValueError, "features"),
    ("nnx Dense4bit blocksize 64.0", lambda: qnnx.Dense4bit(64, 8, blocksize=64.0, rngs=nnx.Rngs(0)), ValueError,
     "blocksize"),
    ("linen DenseNF4 blocksize 0", lambda: qnn.DenseNF4(8, blocksize=0).init(jax.random.key(0), jnp.ones((1, 64))), ValueError,
     "blocksize"),
    ("torch quantize_4bit blocksize 0", lambda: bnb.functional.quantize_4bit(torch.randn(64), blocksize=0),
     ValueError, "blocksize"),
    ("torch dequantize_4bit blocksize 0", lambda: bnb.functional.dequantize_4bit(
        torch.zeros(32, 1, dtype=torch.uint8), absmax=torch.ones(1), out=torch.empty(64), blocksize=0),
     ValueError, "blocksize"),
    ("torch dequantize_4bit absmax long", lambda: bnb.functional.dequantize_4bit(
        torch.zeros(32, 1, dtype=torch.uint8), absmax=torch.ones(5), out=torch.empty(64), blocksize=64),
     ValueError, "absmax"),
    ("torch Params4bit blocksize 0", lambda: bnb.nn.Params4bit(torch.randn(8, 64), blocksize=0).to("cpu"),
     ValueError, "blocksize"),
    ("torch matmul_4bit packed short", lambda: bnb.matmul_4bit(torch.randn(2, 64), *_short_packed()), ValueError,
     "weight"),
]


def _short_packed():
    packed, state = bnb.functional.quantize_4bit(torch.randn(8, 64), quant_type="nf4")
    return packed[:-4].t(), state


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_raises_a_named_error(case):
    _, call, exc, name = case
    with pytest.raises(exc, match=name):
        call()
