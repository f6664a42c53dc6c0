"""torch <-> JAX bridge: zero-copy DLPack transfers, cached jitted calls, autograd through JAX vjps.

Every torch_compat layer computes in JAX. A call crosses the boundary like this:

1. Input tensors are made contiguous (a no-op when they already are) and handed to JAX by
   DLPack, sharing memory (same data pointer), on the device they live on (CPU or the same
   CUDA GPU).
2. A :class:`JaxOp` (one per function and static configuration, created once and cached)
   runs its ``jax.jit``-compiled function; jit keeps one executable per shape/dtype/device.
3. The result goes back to torch by DLPack, again without a copy.
4. When torch needs gradients, :class:`JaxFunction` (a ``torch.autograd.Function``) runs the
   jitted JAX vjp in ``backward``.

Frozen weights (packed 4-bit data, int8 rows) are converted once into JAX pytrees and kept
in a :class:`WeightCache` until one of their torch tensors changes (its data pointer, shape
or in-place ``_version`` counter).

GPU memory: JAX would otherwise grab 75 % of the GPU at start-up, leaving torch nothing, so
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set (only if the user did not set it) when this
module is imported, which must happen before JAX initialises its GPU backend to take effect.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from typing import Any, Callable, Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import torch  # noqa: E402

from qflax.ops import dispatch  # noqa: E402

from torch_compat import forwards  # noqa: E402

# DLPack device types (dlpack.h): the only two torch_compat moves data between.
_DL_CPU, _DL_CUDA = 1, 2

# torch dtypes DLPack carries to JAX unchanged. int64 is narrowed to int32 first (index
# tensors; JAX runs without x64) and float64 is refused (no bitsandbytes layer takes it).
_ALLOWED_DTYPES = {
    torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16, torch.int32, torch.bool,
}


class _Importer:
    """torch tensor -> jax.Array by DLPack, with a fast path that skips jax's per-call Python checks.

    ``jax.dlpack.from_dlpack`` spends ~30 µs in Python per call (device lookup, dtype
    canonicalisation, placement); the fast path calls the same jaxlib routine directly with
    a cached device (~7 µs). If the private routine is missing or has another signature (a
    different jaxlib), the public function is used from then on.
    """

    def __init__(self):
        self._devices: dict[torch.device, tuple] = {}
        try:
            from jax._src.lib import _jax

            self._to_buffer = _jax.dlpack_managed_tensor_to_buffer
        except (ImportError, AttributeError):
            self._to_buffer = None

    def _device_info(self, t: torch.Tensor) -> tuple:
        info = self._devices.get(t.device)
        if info is None:
            from jax._src import xla_bridge

            dl_type, dl_id = (int(v) for v in t.__dlpack_device__())
            backend = xla_bridge.get_backend("cpu" if dl_type == _DL_CPU else "cuda")
            device = backend.device_from_local_hardware_id(dl_id)
            stream = device.get_stream_for_external_ready_events() if dl_type == _DL_CUDA else None
            info = self._devices[t.device] = (device, stream, dl_type)
        return info

    def __call__(self, t: torch.Tensor) -> jax.Array:
        if self._to_buffer is not None:
            device, stream, dl_type = self._device_info(t)
            try:
                return self._to_buffer(t.__dlpack__(stream=stream), device, stream, None, dl_type)
            except TypeError:
                self._to_buffer = None
        return jax.dlpack.from_dlpack(t)


_import_tensor = _Importer()

# torch.compile cannot trace DLPack or JAX: every function that crosses to JAX runs eagerly, with a
# graph break around it (the CUDA kernels are to become torch.library custom ops, traced as such).
_eager = torch.compiler.disable


@_eager
def to_jax(t: Optional[torch.Tensor]) -> Optional[jax.Array]:
    """A jax.Array sharing memory with ``t`` (after ``.contiguous()``), on ``t``'s device.

    Args:
      t: a CPU or CUDA tensor (None passes through). It is detached first; int64 is narrowed
        to int32 (a copy) because JAX runs without 64-bit integers.

    Returns:
      The jax.Array, or None.

    Raises:
      TypeError: ``t`` has a dtype JAX cannot take (float64, complex, ...).
    """
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    if t.dtype in _ALLOWED_DTYPES:
        return _import_tensor(t if t.is_contiguous() else t.contiguous())
    if t.dtype == torch.int64:
        return _import_tensor(t.to(torch.int32).contiguous())
    allowed = sorted(str(d).replace("torch.", "") for d in _ALLOWED_DTYPES | {torch.int64})
    raise TypeError(f"torch_compat cannot pass a {t.dtype} tensor to JAX; allowed dtypes: {allowed}")


@_eager
def to_torch(a: Optional[jax.Array]) -> Optional[torch.Tensor]:
    """A torch tensor sharing memory with the jax.Array ``a`` (None passes through)."""
    if a is None:
        return None
    return torch.from_dlpack(a)


class WeightCache:
    """Holds a JAX pytree built from some torch tensors until one of them changes.

    A source counts as changed when it is another tensor object, or its data pointer moved
    (``param.data = ...``), or its ``_version`` counter rose (an in-place write such as
    ``load_state_dict``'s ``copy_``). The cache keeps the source tensors alive, so a freed
    tensor's address can never be mistaken for a live one. It is dropped by
    ``copy``/``deepcopy``/pickle (it is derived data).
    """

    def __init__(self):
        self._sources: list = []
        self._value = None

    @_eager
    def get(self, sources: Sequence[Optional[torch.Tensor]], build: Callable[[], Any]) -> Any:
        """The cached pytree, rebuilt with ``build()`` when any of ``sources`` changed."""
        cached = self._sources
        if len(cached) != len(sources) or any(
            t is not old or (t is not None and (t._version != version or t.data_ptr() != ptr))
            for t, (old, version, ptr) in zip(sources, cached)
        ):
            self._value = build()
            self._sources = [(t, None if t is None else t._version, None if t is None else t.data_ptr())
                             for t in sources]
        return self._value

    def clear(self) -> None:
        """Forgets the cached pytree."""
        self._sources, self._value = [], None

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __deepcopy__(self, memo):
        return WeightCache()

    def __copy__(self):
        return WeightCache()


class JaxOp:
    """A pure JAX function ``fn(consts, *arrays, **static)`` with its jitted forward and vjp.

    ``consts`` is a pytree of frozen (non-differentiated) jax arrays, e.g. a Packed4bit
    weight; ``arrays`` are the values that come from torch tensors and may need gradients.
    Get instances with :func:`jax_op` so that each configuration is compiled once.
    """

    def __init__(self, fn: Callable, static: tuple):
        self.fn = fn
        self.static = dict(static)
        # Whether the vjp reads the values of the arrays (not only of consts and the cotangent).
        self.reads_inputs = fn not in forwards.VJP_READS_NO_INPUTS
        self.forward = jax.jit(lambda consts, *arrays: fn(consts, *arrays, **self.static))
        self._backward = jax.jit(self._vjp, static_argnums=(3,))

    def _vjp(self, consts, arrays, grad, need):
        wanted = [i for i, n in enumerate(need) if n]

        def of_wanted(*values):
            full = list(arrays)
            for i, value in zip(wanted, values):
                full[i] = value
            return self.fn(consts, *full, **self.static)

        _, pullback = jax.vjp(of_wanted, *(arrays[i] for i in wanted))
        grads = iter(pullback(grad))
        return tuple(next(grads) if n else None for n in need)

    def backward(self, consts, arrays: tuple, grad: jax.Array, need: tuple) -> tuple:
        """Gradients for the arrays flagged in ``need`` (None for the others)."""
        return self._backward(consts, arrays, grad, need)

    def __reduce__(self):
        # Pickled (with a module that holds it) as a reference to the shared cached instance.
        return _rebuild_op, (self.fn, tuple(sorted(self.static.items())))


_ops: dict[tuple, JaxOp] = {}


def jax_op(fn: Callable, **static) -> JaxOp:
    """The cached :class:`JaxOp` of ``fn`` with these static (hashable) keyword arguments."""
    key = (fn, tuple(sorted(static.items())))
    op = _ops.get(key)
    if op is None:
        op = _ops[key] = JaxOp(fn, tuple(sorted(static.items())))
    return op


def _rebuild_op(fn: Callable, static: tuple) -> JaxOp:
    return jax_op(fn, **dict(static))


class JaxFunction(torch.autograd.Function):
    """torch autograd node whose forward and backward run a :class:`JaxOp` in JAX."""

    @staticmethod
    def forward(ctx, op: JaxOp, consts: Any, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
        arrays = tuple(to_jax(t) for t in tensors)
        ctx.op, ctx.consts, ctx.arrays = op, consts, arrays
        # torch runs the backward of CUDA tensors on its autograd thread, outside the caller's
        # `use_backend` context (a per-thread setting): the backward applies the forward's choice.
        ctx.backend = dispatch.requested_backend()
        # The jax arrays share the tensors' memory, so the tensors must stay alive. When the vjp reads
        # their values, save_for_backward also records their versions: backward then raises, as
        # torch.nn.Linear does, if one was modified in place in between (instead of differentiating at
        # the new values). A vjp linear in them (frozen-weight matmuls) reads no values: as in
        # bitsandbytes, ``x += layer(x)`` stays fine there.
        if op.reads_inputs:
            ctx.save_for_backward(*tensors)
        else:
            ctx.unread_tensors = tensors
        return to_torch(op.forward(consts, *arrays))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # saved_tensors raises "modified by an inplace operation" if one was.
        tensors = ctx.saved_tensors if ctx.op.reads_inputs else ctx.unread_tensors
        need = tuple(
            bool(n) and t is not None and t.is_floating_point()
            for n, t in zip(ctx.needs_input_grad[2:], tensors)
        )
        if not any(need):
            return (None, None) + (None,) * len(need)
        with dispatch.use_backend(ctx.backend):
            grads = ctx.op.backward(ctx.consts, ctx.arrays, to_jax(grad), need)
        return (None, None) + tuple(to_torch(g) for g in grads)


@_eager
def call(op: JaxOp, consts: Any, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """Runs ``op`` on torch tensors; records an autograd node only when a gradient can flow.

    Args:
      op: from :func:`jax_op`.
      consts: pytree of frozen jax arrays (from a :class:`WeightCache`), or None.
      *tensors: torch tensors (or None) passed to the JAX function after ``consts``.

    Returns:
      The result as a torch tensor on the inputs' device.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return JaxFunction.apply(op, consts, *tensors)
    return to_torch(op.forward(consts, *(to_jax(t) for t in tensors)))
