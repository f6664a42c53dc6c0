"""XLA stand-ins for the Triton launchers, to test the kernels' partitioning rules on CPU.

Triton's interpreter runs through ``pure_callback``, and a host callback cannot run inside the
per-shard program a ``custom_partitioning`` rule builds (JAX drops its callback table: the
process crashes). So these tests swap the launchers, the lowest layer below qflax's kernel
branches, for XLA computations of the same function, and record the shapes each call saw:
everything above them (dispatch, the partitioning rules, shard offsets, statistics, psums)
runs as on a GPU. The per-shard code with the real interpreted kernels is tested under
``shard_map`` in tests/kernels/test_sharded_kernels_interpret.py.
"""

import jax.numpy as jnp

from qflax.quant import int8 as int8_quant
from qflax.quant import scaling
from qflax.quant.fourbit import Packed4bit, dequantize_4bit


class Recorder:
    """The stand-ins, and the weight shapes the launches received (traced per call site)."""

    def __init__(self):
        self.calls = []

    def _weight(self, packed, absmax, quant_map, shape, blocksize, nested_absmax=None, nested_quant_map=None,
                nested_offset=None, dtype="float32"):
        offset = None if nested_offset is None else jnp.reshape(nested_offset, ())
        return Packed4bit(packed=packed.reshape(-1, 1), absmax=absmax.reshape(-1), quant_map=quant_map,
                          shape=tuple(shape), dtype=dtype, blocksize=blocksize, nested_absmax=nested_absmax,
                          nested_quant_map=nested_quant_map, nested_offset=offset)

    def matmul_4bit(self, x, packed, absmax, quant_map, *, shape, blocksize, bias=None, plan_override=None,
                    **nested):
        self.calls.append(("matmul_4bit", tuple(shape), nested.get("nested_absmax") is not None))
        w = dequantize_4bit(self._weight(packed, absmax, quant_map, shape, blocksize, dtype=x.dtype.name, **nested))
        y = jnp.dot(x.reshape(-1, shape[1]), w.T, preferred_element_type=jnp.float32)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(x.dtype).reshape(*x.shape[:-1], shape[0])

    def grad_input_4bit(self, g, packed, absmax, quant_map, *, shape, blocksize, plan_override=None, **nested):
        self.calls.append(("grad_input_4bit", tuple(shape), nested.get("nested_absmax") is not None))
        w = dequantize_4bit(self._weight(packed, absmax, quant_map, shape, blocksize, dtype=g.dtype.name, **nested))
        return jnp.dot(g, w, preferred_element_type=jnp.float32).astype(g.dtype)

    def quantize_rowwise(self, x, threshold=0.0, col_mask=None, llm_int8_scale=False):
        assert llm_int8_scale, "only the LLM.int8 quantizer is stood in for"
        self.calls.append(("quantize_rowwise", tuple(x.shape), threshold > 0))
        x32 = x.astype(jnp.float32)
        if threshold > 0:
            x32 = jnp.where(jnp.abs(x32) >= threshold, jnp.float32(0), x32)
        absmax = scaling.absmax(x32, axis=1)
        codes = int8_quant.llm_int8_codes(x32, absmax[:, None])
        if threshold > 0:
            codes = jnp.where(col_mask.astype(bool)[None, :], jnp.int8(0), codes)
        return codes, absmax

    def quantize_rows_outliers(self, x, threshold, col_mask=None):
        self.calls.append(("quantize_rows_outliers", tuple(x.shape), True))
        mask = int8_quant.outlier_mask(x, threshold) if col_mask is None else col_mask.astype(bool)
        codes, absmax = self.quantize_rowwise(x, threshold, mask, llm_int8_scale=True)
        self.calls.pop()  # one call recorded, not two
        columns = jnp.argsort(~mask, stable=True).astype(jnp.int32)
        return codes, absmax, columns, jnp.sum(mask, dtype=jnp.int32).reshape(1), mask.astype(jnp.int8)

    def int8_matmul_dequant(self, a, b, a_scale, b_scale, bias=None, out_dtype=jnp.float32, x=None,
                            outlier_idx=None, outlier_count=None, outlier_weight=None, config=None,
                            outlier_mask=None):
        self.calls.append(("int8_matmul_dequant", tuple(b.shape), x is not None))
        out = int8_quant.int8_mm_dequant(int8_quant.int8_linear_matmul(a, b), a_scale, b_scale)
        if x is not None:
            used = jnp.arange(outlier_idx.shape[0]) < outlier_count[0]
            mask = jnp.zeros(x.shape[1], jnp.int32).at[outlier_idx].max(used.astype(jnp.int32)) > 0
            w = int8_quant.int8_vectorwise_dequant(b, b_scale).astype(jnp.float32)
            out = out + jnp.dot(jnp.where(mask[None, :], x, 0).astype(jnp.float32), w.T)
        if bias is not None:
            out = out + bias.astype(jnp.float32)
        return out.astype(out_dtype)

    def shapes(self, name: str) -> set:
        """Weight shapes the launcher ``name`` was traced with."""
        return {shape for kind, shape, _ in self.calls if kind == name}


def install(monkeypatch) -> Recorder:
    """Swaps the 4-bit and int8 launchers for XLA stand-ins and lets "triton" dispatch on CPU."""
    from qflax.ops import dispatch
    from qflax_kernels import fourbit_jax, int8_launch

    recorder = Recorder()
    monkeypatch.setattr(fourbit_jax, "matmul_4bit", recorder.matmul_4bit)
    monkeypatch.setattr(fourbit_jax, "grad_input_4bit", recorder.grad_input_4bit)
    monkeypatch.setattr(int8_launch, "quantize_rowwise", recorder.quantize_rowwise)
    monkeypatch.setattr(int8_launch, "quantize_rows_outliers", recorder.quantize_rows_outliers)
    monkeypatch.setattr(int8_launch, "int8_matmul_dequant", recorder.int8_matmul_dequant)
    monkeypatch.setattr(dispatch, "kernel_runtime", lambda: "interpreter")
    return recorder
