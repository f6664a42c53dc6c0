"""``QuantState``: bitsandbytes' 4-bit / blockwise state container over torch tensors (docs/state_dict.md).

It holds the same fields as bitsandbytes' class and serialises to the same dicts (the packed
JSON entry is byte-identical). ``to_packed4bit``/``from_packed4bit`` convert to and from
qflax's :class:`~qflax.quant.Packed4bit` pytree, which is what the JAX side computes with.
"""

from typing import Any, Optional

import numpy as np
import torch

from qflax import bnb_format
from qflax import checkpoint_checks_4bit as checks_4bit
from qflax.quant import Packed4bit
from torch_compat import bridge

_PACKED_SUFFIXES = ("bitsandbytes__fp4", "bitsandbytes__nf4")


def dtype_name(dtype: torch.dtype) -> str:
    """bitsandbytes' dtype string: ``str(dtype)`` without "torch." ("float16", "bfloat16", ...)."""
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name such as "float16" (as ``getattr(torch, name)``)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must name a torch dtype such as 'float16', got {name!r}")
    return dtype


class QuantState:
    """State of a 4-bit (or 8-bit blockwise) quantized tensor; bitsandbytes' field names and methods.

    Attributes:
      absmax: float32 per-block absmax, or uint8 codes when nested.
      shape: ``torch.Size`` of the original tensor.
      code: the code table (``quant_map``).
      dtype: the original (dequantisation) dtype.
      blocksize: elements per block.
      quant_type: "nf4"/"fp4" (None for 8-bit blockwise states).
      offset: 0-dim float32 tensor (nested only).
      state2: the nested ``QuantState`` of the absmax (nested only).
    """

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None, offset=None,
                 state2=None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __getitem__(self, idx):
        """Legacy list view ``[absmax, shape, dtype, blocksize, [offset, state2] or None, quant_type]``."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device) -> "QuantState":
        """Rebuilds a state from the packed form of :meth:`as_dict` (as bitsandbytes, docs/state_dict.md#quantstate).

        Args:
          qs_dict: entries as in a state dict; key prefixes (up to the last ".") are ignored.
          device: where the tensors go.

        Raises:
          ValueError: no packed ``quant_state.bitsandbytes__<type>`` entry, or more than one, or
            an entry contradicts the JSON (CheckpointError, see :mod:`qflax.checkpoint_checks_4bit`).
          KeyError (MissingEntryError): a statistics entry the JSON calls for is missing.
          AssertionError: an unknown key is present (bitsandbytes raises the same type; ours is
            also a ValueError naming the key).
        """
        packed = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if not packed and "quant_type" not in qs_dict:
            raise ValueError("Expected packed or unpacked quant_state items, found neither")
        if len(packed) != 1 or packed[0].split(".")[-1] not in _PACKED_SUFFIXES:
            raise ValueError(
                f"There should be exactly one `quant_state` item with ending from {list(_PACKED_SUFFIXES)}.\n"
                f"Detected {packed}."
            )
        qs_dict = dict(qs_dict)
        state_key = packed[0]
        _, layout = checks_4bit.parse_quant_state(
            qs_dict.pop(state_key), state_key, state_key.rsplit("bitsandbytes__", 1)[1]
        )
        prefix = state_key[: state_key.index("quant_state")].rstrip(".")
        tensors = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        # Every entry is checked against the JSON before anything is built (the unknown-key error is
        # also the AssertionError bitsandbytes raises).
        checks_4bit.check_4bit_entries(layout, tensors, prefix)
        state2 = offset = None
        if layout.nested:
            offset = torch.tensor(layout.nested_offset, dtype=torch.float32, device=device)
            state2 = cls(
                absmax=tensors["nested_absmax"].to(device),
                blocksize=layout.nested_blocksize,
                code=tensors["nested_quant_map"].to(device),
                dtype=torch.float32,
            )
        return cls(
            quant_type=layout.quant_type,
            absmax=tensors["absmax"].to(device),
            blocksize=layout.blocksize,
            code=tensors["quant_map"].to(device),
            dtype=torch_dtype(layout.dtype),
            shape=torch.Size(layout.shape),
            offset=offset,
            state2=state2,
        )

    def layout(self) -> checks_4bit.Layout4bit:
        """The checked layout this state declares (raises CheckpointError for impossible settings)."""
        fields = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                  "dtype": dtype_name(self.dtype) if self.dtype is not None else None,
                  "shape": None if self.shape is None else list(self.shape)}
        if self.nested:
            fields.update(nested_blocksize=self.state2.blocksize, nested_dtype=dtype_name(self.state2.dtype),
                          nested_offset=float(self.offset))
        return checks_4bit.layout_from_fields(fields, "quant_state")

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a dict; ``packed=True`` gives the tensors-only form used in state dicts.

        With ``packed=True`` the non-tensor items become one uint8 CPU tensor
        ``quant_state.bitsandbytes__<quant_type>`` holding their JSON, written by
        :func:`qflax.bnb_format.encode_quant_state` (byte-identical to bitsandbytes').
        """
        items = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            items.update(
                nested_absmax=self.state2.absmax,
                nested_blocksize=self.state2.blocksize,
                nested_quant_map=self.state2.code.clone(),
                nested_dtype=dtype_name(self.state2.dtype),
                nested_offset=self.offset.item(),
            )
        if not packed:
            return items
        tensors = {k: v for k, v in items.items() if isinstance(v, torch.Tensor)}
        nested = (items["nested_blocksize"], items["nested_dtype"], items["nested_offset"]) if self.nested else None
        meta = bnb_format.encode_quant_state(self.quant_type, self.blocksize, items["dtype"], items["shape"], nested)
        blob = torch.from_numpy(np.frombuffer(meta, np.uint8).copy())
        tensors[f"{bnb_format.QUANT_STATE_KEY}{self.quant_type}"] = blob
        return tensors

    def to(self, device) -> None:
        """Moves the state's tensors to ``device`` in place (as bitsandbytes)."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)

    def __eq__(self, other) -> bool:
        # Duck-typed, so a state compares equal to bitsandbytes' own QuantState with the same contents.
        fields = ("absmax", "shape", "code", "dtype", "blocksize", "quant_type", "offset", "state2")
        if not all(hasattr(other, f) for f in fields):
            return False
        close = lambda a, b: a is b or (a is not None and b is not None and torch.allclose(a, b, atol=1e-6))  # noqa: E731
        return (
            close(self.absmax, other.absmax)
            and self.shape == other.shape
            and close(self.code, other.code)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and (self.offset == other.offset if self.offset is not None and other.offset is not None
                 else self.offset is other.offset)
            and (self.state2 == other.state2 if self.state2 is not None and other.state2 is not None
                 else self.state2 is other.state2)
        )

    __hash__ = None

    def tensors(self) -> list[Optional[torch.Tensor]]:
        """Every tensor the state holds (cache keys for the JAX copies)."""
        if not self.nested:
            return [self.absmax, self.code]
        return [self.absmax, self.code, self.offset, self.state2.absmax, self.state2.code]

    def to_packed4bit(self, packed: torch.Tensor) -> Packed4bit:
        """The qflax pytree of this state and its packed bytes (any quant_storage dtype), on their device.

        Raises:
          ValueError (CheckpointError): the packed bytes or statistics do not match the state's
            shape, blocksize or quant type (dtypes and lengths are checked, not values).
        """
        layout = self.layout()
        if packed.dim() == 2 and packed.shape[0] == 1:  # Linear4bit passes weight.t()
            packed = packed.t()
        checks_4bit.check_packed(packed, layout, "weight")
        stats = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested:
            stats.update(nested_absmax=self.state2.absmax, nested_quant_map=self.state2.code)
        checks_4bit.check_4bit_entries(layout, stats, "weight", values=False)
        data = packed.detach().contiguous().view(torch.uint8).reshape(-1, 1)
        fields = dict(
            packed=bridge.to_jax(data),
            absmax=bridge.to_jax(self.absmax),
            quant_map=bridge.to_jax(self.code.float()),
            shape=tuple(self.shape),
            dtype=dtype_name(self.dtype),
            blocksize=int(self.blocksize),
            quant_type=self.quant_type,
            quant_storage=dtype_name(packed.dtype),
        )
        if self.nested:
            fields.update(
                nested_absmax=bridge.to_jax(self.state2.absmax.float()),
                nested_quant_map=bridge.to_jax(self.state2.code.float()),
                nested_offset=bridge.to_jax(self.offset.float().reshape(())),
                nested_blocksize=int(self.state2.blocksize),
            )
        return Packed4bit(**fields)

    @classmethod
    def from_packed4bit(cls, q: Packed4bit) -> "QuantState":
        """A state (torch tensors on the arrays' device) describing a qflax :class:`Packed4bit`."""
        state2 = offset = None
        if q.nested:
            state2 = cls(
                absmax=bridge.to_torch(q.nested_absmax),
                code=bridge.to_torch(q.nested_quant_map),
                blocksize=q.nested_blocksize,
                dtype=torch.float32,
            )
            offset = bridge.to_torch(q.nested_offset.reshape(()))
        return cls(
            absmax=bridge.to_torch(q.absmax),
            shape=torch.Size(q.shape),
            code=bridge.to_torch(q.quant_map),
            blocksize=q.blocksize,
            quant_type=q.quant_type,
            dtype=torch_dtype(q.dtype),
            offset=offset,
            state2=state2,
        )

