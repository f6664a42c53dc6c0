"""The weights of the torch_compat layers as the Triton kernels read them, built once per module.

The 4-bit kernels read bitsandbytes' layout directly, so the kernel's view of a ``Params4bit``
is the packed bytes flattened (a view of the parameter, whatever its quant_storage dtype) and
the QuantState's tensors as contiguous float32 (the absmax stays uint8 codes under double
quantization; the offset becomes a (1,) tensor). For a bitsandbytes weight every piece is a
view or the state's own tensor: nothing is copied, and in-place writes (``load_state_dict``'s
``copy_``) show through. Converting dtypes or devices copies once.

Eagerly the views are cached per module (:class:`KernelWeightCache`: rebuilt when the parameter
or a state tensor is replaced, and, where a piece had to be copied, when its source is written in
place), which saves their Python cost on every call. Under torch.compile they are taken from the live parameter as traced
tensor ops, which cost nothing in the compiled graph and never go stale. The parameter itself
is untouched, so ``state_dict()`` keeps bitsandbytes' bytes.

CUDA graphs (torch.compile's "reduce-overhead") copy every graph input that is not a parameter
or buffer into graph-owned memory before each replay. The statistics live in the QuantState (or
``state.SCB``), not in parameters, so the first eager call marks those CUDA tensors with
``torch._dynamo.mark_static_address`` (guarded: replacing one recompiles) and replays read them
in place. A model compiled before any eager call still computes correctly, with those copies.
"""

from typing import Callable, NamedTuple, Optional, Sequence

import torch


class FourBitWeight(NamedTuple):
    """The kernel inputs of one 4-bit weight (``qflax_kernels.fourbit_launch.weight_inputs`` order)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_map: Optional[torch.Tensor]
    nested_absmax: Optional[torch.Tensor]
    nested_offset: Optional[torch.Tensor]


def _f32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32).contiguous()


def fourbit_views(weight: torch.Tensor, state) -> FourBitWeight:
    """The kernel inputs of a packed 4-bit ``weight`` and its QuantState, on the weight's device.

    Args:
      weight: the packed parameter, ``(bytes // itemsize, 1)`` of any quant_storage dtype.
      state: its :class:`~torch_compat.quant_state.QuantState`.

    Returns:
      A :class:`FourBitWeight` (views where the dtypes already match).
    """
    device = weight.device
    packed = weight.detach().contiguous().view(torch.uint8).reshape(-1)
    if not state.nested:
        return FourBitWeight(packed, _f32(state.absmax, device), _f32(state.code, device), None, None, None)
    # Double quantization: the absmax stays uint8 codes, decoded inside the kernel.
    absmax = state.absmax.to(device=device, dtype=torch.uint8).contiguous()
    return FourBitWeight(packed, absmax, _f32(state.code, device), _f32(state.state2.code, device),
                         _f32(state.state2.absmax, device), _f32(state.offset, device).reshape(1))


class KernelWeightCache:
    """Kernel views of some source tensors, kept until a source is replaced (or, if copied, written).

    Identity checks alone suffice while every view shares memory with its source: an in-place
    write shows through the view. Only when the build copied something (another dtype or
    device) are the sources' ``_version`` counters compared as well, as
    :class:`torch_compat.bridge.WeightCache` does. The sources are kept alive, so a freed
    tensor's identity is never mistaken for a live one. Dropped by copy and deepcopy.
    """

    def __init__(self):
        self._sources: tuple = ()
        self._versions = None
        self._value = None

    def get(self, sources: Sequence[Optional[torch.Tensor]], build: Callable[[], tuple]) -> tuple:
        """The views of ``sources``, from ``build()`` when they changed."""
        if (self._value is None or len(sources) != len(self._sources)
                or any(a is not b for a, b in zip(sources, self._sources))
                or (self._versions is not None and self._versions != _versions(sources))):
            value = build()
            sources = tuple(sources)
            storages = {_storage(t) for t in sources if t is not None}
            aliased = all(v is None or _storage(v) in storages for v in value)
            self._sources, self._value = sources, value
            self._versions = None if aliased else _versions(sources)
        return self._value

    def __deepcopy__(self, memo):
        return KernelWeightCache()

    def __copy__(self):
        return KernelWeightCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def _versions(sources) -> list:
    return [None if t is None else t._version for t in sources]


def _storage(t: torch.Tensor) -> tuple:
    # Views share their source's storage (a view's own data_ptr may sit at an offset into it).
    return t.device, t.untyped_storage().data_ptr()


def _mark_static(tensors) -> None:
    for t in tensors:
        if t is not None and t.is_cuda and not isinstance(t, torch.nn.Parameter):
            torch._dynamo.mark_static_address(t, guard=True)


def _cached(layer, sources: list, build):
    cache = layer.__dict__.get("_kernel_weight")
    if cache is None:
        cache = layer.__dict__["_kernel_weight"] = KernelWeightCache()

    def build_and_mark():
        _mark_static(sources)
        return build()

    return cache.get(sources, build_and_mark)


def fourbit_weight(layer) -> FourBitWeight:
    """The kernel inputs of ``layer.weight`` (a quantized Params4bit), cached on the layer when eager."""
    weight = layer.weight
    state = weight.quant_state
    if torch.compiler.is_compiling():
        return fourbit_views(weight, state)
    return _cached(layer, [weight, *state.tensors()], lambda: fourbit_views(weight, state))


def int8_weight(layer, codes: torch.Tensor, scale: torch.Tensor) -> tuple:
    """``(codes, float32 scale)`` of a frozen int8 layer as the kernels take them, cached on the layer when eager."""
    build = lambda: (codes.detach().contiguous(), _f32(scale, codes.device))  # noqa: E731
    if torch.compiler.is_compiling():
        return build()
    return _cached(layer, [codes, scale], build)
