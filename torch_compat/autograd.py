"""``MatmulLtState``, ``matmul`` (LLM.int8) and ``matmul_4bit`` (docs/torch_compat.md#autograd), computed in JAX."""

import dataclasses
from typing import Optional

import torch

from qflax.quant import Int8Rows
from torch_compat import bridge, forwards
from torch_compat.quant_state import QuantState


@dataclasses.dataclass
class MatmulLtState:
    """LLM.int8 state of one layer: the int8 weight ``CB`` (out, in), its row absmax ``SCB`` and options.

    The dataclass fields (compared by ``==``) are bitsandbytes'; ``CxB``, ``SB``, ``CxBt``,
    ``SBt``, ``CBt``, ``subB``, ``outlier_pool`` and ``force_no_igemmlt`` are kept for
    compatibility and unused. ``idx`` holds the outlier column indices of the last forward
    (``threshold > 0``).
    """

    _tile_indices: Optional[torch.Tensor] = None
    force_no_igemmlt: bool = False
    CB: Optional[torch.Tensor] = None
    CxB: Optional[torch.Tensor] = None
    SB: Optional[torch.Tensor] = None
    SCB: Optional[torch.Tensor] = None
    CxBt: Optional[torch.Tensor] = None
    SBt: Optional[torch.Tensor] = None
    CBt: Optional[torch.Tensor] = None
    subB: Optional[torch.Tensor] = None
    outlier_pool: Optional[torch.Tensor] = None
    idx: Optional[torch.Tensor] = None

    has_accumulated_gradients = False
    threshold = 0.0
    is_training = True
    has_fp16_weights = True
    use_pool = False
    formatB = "row"

    def defer_idx(self, columns: torch.Tensor, count: Optional[torch.Tensor] = None) -> None:
        """Sets ``idx`` from the device, read on the host only when ``idx`` is read.

        Finding the indices waits for the device; deferring it keeps a forward free of host
        synchronisation, as bitsandbytes' callers rarely read ``idx``.

        Args:
          columns: a boolean ``(in_features,)`` column mask; or, with ``count``, int32 columns
            whose first ``count`` entries are the outlier columns in increasing order (the int8
            quantizer kernel's list).
          count: int32 ``(1,)``, the number of outlier columns at the front of ``columns``.
        """
        self.__dict__["idx"] = None
        self.__dict__["_idx_columns"] = columns if count is None else (columns, count)

    def reset_grads(self) -> None:
        """Drops the quantized weight (it is re-made at the next forward)."""
        self.CB = self.CxB = self.SB = self.SCB = self.CxBt = self.SBt = self.CBt = None

    @property
    def tile_indices(self):
        raise ValueError("tile_indices is no longer supported.")


class _DeferredIdx:
    """``MatmulLtState.idx``: a plain attribute, except after :meth:`MatmulLtState.defer_idx`, whose
    column mask becomes the sorted int64 indices on first read (one host synchronisation then)."""

    def __get__(self, state, owner=None):
        if state is None:
            return None  # the dataclass default
        columns = state.__dict__.get("_idx_columns")
        if isinstance(columns, tuple):
            partition, count = columns
            state.__dict__["idx"] = partition[: int(count.item())].to(torch.int64)
            state.__dict__["_idx_columns"] = None
        elif columns is not None:
            state.__dict__["idx"] = torch.nonzero(columns).flatten()
            state.__dict__["_idx_columns"] = None
        return state.__dict__.get("idx")

    def __set__(self, state, value):
        state.__dict__["_idx_columns"] = None
        state.__dict__["idx"] = value


MatmulLtState.idx = _DeferredIdx()  # after the dataclass is built: ``idx`` stays one of its fields


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean (in_features,) mask of the columns of ``x`` (leading dims flattened) holding any ``|x| >= threshold``."""
    with torch.no_grad():
        return (x.reshape(-1, x.shape[-1]).abs() >= threshold).any(0)


def matmul(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None, state: Optional[MatmulLtState] = None,
           threshold: float = 0.0, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LLM.int8 ``A @ B.T + bias`` in ``A.dtype``.

    ``B`` is the weight ``(out, in)``: a float weight is quantized on every call and gets the
    true gradient ``G^T A``; an int8 weight uses ``state.SCB`` (or ``B.SCB``) as row scales.

    Raises:
      ValueError: an int8 ``B`` without row scales.
    """
    state = state or MatmulLtState()
    if threshold > 0.0:
        state.threshold = threshold
    if B.dtype == torch.int8:
        scale = state.SCB if state.SCB is not None else getattr(B, "SCB", None)
        if scale is None:
            raise ValueError("an int8 B needs its row scales in state.SCB (or B.SCB)")
        w = Int8Rows(codes=bridge.to_jax(B), scale=bridge.to_jax(scale))
        result = bridge.call(bridge.jax_op(forwards.linear_8bit, threshold=float(state.threshold)), w, A, bias)
    else:
        result = bridge.call(
            bridge.jax_op(forwards.linear_8bit_trainable, threshold=float(state.threshold)), None, A, B, bias
        )
    if state.threshold > 0:
        state.defer_idx(outlier_columns(A, state.threshold))
    if out is not None:
        out.copy_(result)
        return out
    return result


def matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState, out: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A @ W.T + bias`` in ``A.dtype`` for the packed 4-bit weight ``B`` (or ``B.t()``) and its state.

    Unlike bitsandbytes on CPU, ``quant_state.dtype`` is not overwritten with ``A.dtype``.
    """
    q = quant_state.to_packed4bit(B)
    result = bridge.call(bridge.jax_op(forwards.linear_4bit, compute_dtype=None), q, A, bias)
    if out is not None:
        out.copy_(result)
        return out
    return result
