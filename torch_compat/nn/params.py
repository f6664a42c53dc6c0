"""``Params4bit`` and ``Int8Params``: parameters that quantize themselves on their first move to a device.

See docs/torch_compat.md#parameters.

As in bitsandbytes, a module built with these parameters holds float weights until
``.to(device)`` / ``.cuda()`` / ``.cpu()`` (of the module or the parameter) quantizes them;
the dtype argument of that call is ignored for quantization. Unlike bitsandbytes, pickling
keeps the parameter's class (bitsandbytes' unpickled object is a plain ``Parameter``
carrying the attributes).
"""

import copy
from typing import Any, Optional

import torch

from qflax import checkpoint_checks_4bit as checks_4bit
from torch_compat import functional as F
from torch_compat.quant_state import QuantState

_QUANT_TYPES = ("fp4", "nf4")


def check_quant_type(quant_type: str) -> None:
    """Raises ValueError unless ``quant_type`` is "fp4" or "nf4"."""
    if quant_type not in _QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {_QUANT_TYPES}, got {quant_type!r}")


def _parse_device(*args, **kwargs) -> tuple[Optional[torch.device], Optional[torch.dtype], bool]:
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype, non_blocking


def _rebuild_params4bit(data, requires_grad, attributes):
    param = Params4bit(data, requires_grad=requires_grad)
    param.__dict__.update(attributes)
    return param


def _rebuild_int8params(data, requires_grad, attributes):
    param = Int8Params(data, requires_grad=requires_grad)
    param.__dict__.update(attributes)
    return param


class Params4bit(torch.nn.Parameter):
    """A 4-bit weight: float ``(out, in)`` until its first device move, then packed bytes plus ``quant_state``.

    Args:
      data: the float weight (None gives an empty tensor).
      requires_grad: bitsandbytes' default False (4-bit weights are frozen).
      quant_state: the :class:`~torch_compat.functional.QuantState` of already packed ``data``.
      blocksize: elements per absmax block (None means 64).
      compress_statistics: double-quantize the absmax.
      quant_type: "fp4" or "nf4".
      quant_storage: dtype the packed bytes are viewed as.
      module: the owning module, whose ``quant_state`` is set on quantization.
      bnb_quantized: whether ``data`` already holds packed bytes.
    """

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = False,
                quant_state: Optional[QuantState] = None, blocksize: Optional[int] = None,
                compress_statistics: bool = True, quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8,
                module: Optional[torch.nn.Module] = None, bnb_quantized: bool = False) -> "Params4bit":
        check_quant_type(quant_type)
        param = torch.Tensor._make_subclass(cls, torch.empty(0) if data is None else data, requires_grad)
        param.blocksize = 64 if blocksize is None else blocksize
        param.compress_statistics = compress_statistics
        param.quant_type = quant_type
        param.quant_state = quant_state
        param.quant_storage = quant_storage
        param.bnb_quantized = bnb_quantized
        param.module = module
        return param

    def _attributes(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage", "bnb_quantized", "module"
        )}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["data"] = self.data
        state["requires_grad"] = self.requires_grad
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.requires_grad = state.pop("requires_grad")
        self.data = state.pop("data")
        self.__dict__.update(state)

    def __reduce_ex__(self, protocol):
        return _rebuild_params4bit, (self.data, self.requires_grad, dict(self.__dict__))

    def __copy__(self) -> "Params4bit":
        new = Params4bit(self.data, requires_grad=self.requires_grad)
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo) -> "Params4bit":
        new = Params4bit(copy.deepcopy(self.data, memo), requires_grad=self.requires_grad)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        # FSDP shards 4-bit weights with chunk/split; the shards keep the parent's attributes.
        if func in (torch.chunk, torch.split) and isinstance(args[0], Params4bit):
            parent = args[0]
            attrs = parent._attributes()
            return tuple(Params4bit(part, requires_grad=parent.requires_grad, **attrs) for part in result)
        return result

    @classmethod
    def from_prequantized(cls, data: torch.Tensor, quantized_stats: dict[str, Any], requires_grad: bool = False,
                          device="cuda", module: Optional[torch.nn.Module] = None, **kwargs) -> "Params4bit":
        """Wraps already packed ``data`` and its state-dict statistics (bitsandbytes' reload path).

        Args:
          data: the packed weight as saved (any quant_storage dtype).
          quantized_stats: the ``weight.*`` entries of the state dict (key prefixes allowed).
          requires_grad: kept False for 4-bit weights.
          device: where data and state go.
          module: owning module, whose ``quant_state`` is set.

        Raises:
          ValueError: the packed ``quant_state.bitsandbytes__<type>`` entry is missing or repeated,
            or ``data`` / an entry does not match it (CheckpointError, before anything is built).
          KeyError (MissingEntryError): an entry the quant state calls for is missing.
        """
        state = QuantState.from_dict(quantized_stats, device=device)
        state_keys = [k for k in quantized_stats if "quant_state" in k]
        key = state_keys[0][: state_keys[0].index("quant_state")].rstrip(".") or "weight"
        checks_4bit.check_packed(data, state.layout(), key)
        param = cls(
            data.to(device), requires_grad=requires_grad, quant_state=state, blocksize=state.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=data.dtype,
            module=module, bnb_quantized=True,
        )
        if module is not None:
            module.quant_state = state
        return param

    def _quantize(self, device) -> "Params4bit":
        weight = self.data.contiguous().to(device)
        packed, state = F.quantize_4bit(
            weight, blocksize=self.blocksize, compress_statistics=bool(self.compress_statistics),
            quant_type=self.quant_type, quant_storage=self.quant_storage,
        )
        self.data = packed
        self.quant_state = state
        self.bnb_quantized = True
        if self.module is not None:
            self.module.quant_state = state
        return self

    def cpu(self) -> "Params4bit":
        return self.to("cpu")

    # Module.half()/.float()/.bfloat16()/.double() call these on every floating parameter. A packed
    # weight keeps its bytes (bitsandbytes converts them numerically and corrupts the weight).
    def half(self, *args, **kwargs):
        return self if self.bnb_quantized else super().half(*args, **kwargs)

    def float(self, *args, **kwargs):
        return self if self.bnb_quantized else super().float(*args, **kwargs)

    def bfloat16(self, *args, **kwargs):
        return self if self.bnb_quantized else super().bfloat16(*args, **kwargs)

    def double(self, *args, **kwargs):
        return self if self.bnb_quantized else super().double(*args, **kwargs)

    def cuda(self, device=None, non_blocking: bool = False) -> "Params4bit":
        return self.to("cuda" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking = _parse_device(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            return self._quantize(device)
        if self.bnb_quantized:
            dtype = None  # packed bytes are never converted (a float quant_storage would be corrupted)
        if self.quant_state is not None and device is not None:
            self.quant_state.to(device)
        moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        attrs = self._attributes()
        attrs["module"] = None
        return Params4bit(moved, requires_grad=self.requires_grad, **attrs)


class Int8Params(torch.nn.Parameter):
    """An LLM.int8 weight: float until moved from the CPU to a device, then int8 ``CB`` with row scales ``SCB``.

    Args:
      data: the float weight ``(out, in)``.
      requires_grad: bitsandbytes' default True (modules pass ``has_fp16_weights``).
      has_fp16_weights: keep float weights (no quantization on move).
      CB: int8 codes (set by quantization).
      SCB: float32 ``(out,)`` row absmax (set by quantization).
    """

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = True, has_fp16_weights: bool = False,
                CB: Optional[torch.Tensor] = None, SCB: Optional[torch.Tensor] = None) -> "Int8Params":
        param = torch.Tensor._make_subclass(cls, torch.empty(0) if data is None else data, requires_grad)
        param.CB = CB
        param.SCB = SCB
        param.has_fp16_weights = has_fp16_weights
        return param

    def _quantize(self, device):
        if self.has_fp16_weights:
            return super().to(device)
        weight = self.data.contiguous().to(device, torch.float16)
        codes, scale, _ = F.int8_vectorwise_quant(weight)
        self.data = codes
        self.CB = codes
        self.SCB = scale
        return self

    def __reduce_ex__(self, protocol):
        return _rebuild_int8params, (self.data, self.requires_grad, dict(self.__dict__))

    def __deepcopy__(self, memo) -> "Int8Params":
        new = Int8Params(copy.deepcopy(self.data, memo), requires_grad=self.requires_grad)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to("cuda" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking = _parse_device(*args, **kwargs)
        quantized = self.data.dtype == torch.int8
        if not quantized and device is not None and device.type != "meta" and self.data.device.type == "cpu":
            return self._quantize(device)
        moved = Int8Params(
            super().to(device=device, dtype=dtype, non_blocking=non_blocking),
            requires_grad=self.requires_grad, has_fp16_weights=self.has_fp16_weights,
        )
        if quantized:
            moved.CB = moved.data
            moved.SCB = self.SCB.to(device) if self.SCB is not None and device is not None else self.SCB
        return moved
