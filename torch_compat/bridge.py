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
        self._devices: dict[tuple[int, int], Any] = {}
        self._fast = True

    def _device_and_stream(self, dl_type: int, dl_id: int):
        key = (dl_type, dl_id)
        if key not in self._devices:
            from jax._src import xla_bridge

            backend = xla_bridge.get_backend("cpu" if dl_type == _DL_CPU else "cuda")
            device = backend.device_from_local_hardware_id(dl_id)
            stream = None
            if dl_type == _DL_CUDA:
                stream = device.get_stream_for_external_ready_events()
            self._devices[key] = (device, stream)
        return self._devices[key]

    def __call__(self, t: torch.Tensor) -> jax.Array:
        if self._fast:
            try:
                from jax._src.lib import _jax

                dl_type, dl_id = (int(v) for v in t.__dlpack_device__())
                device, stream = self._device_and_stream(dl_type, dl_id)
                return _jax.dlpack_managed_tensor_to_buffer(t.__dlpack__(stream=stream), device, stream, None, dl_type)
            except (ImportError, AttributeError, TypeError):
                self._fast = False
        return jax.dlpack.from_dlpack(t)


_import_tensor = _Importer()


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
    t = t.detach()
    if t.dtype == torch.int64:
        t = t.to(torch.int32)
    elif t.dtype not in _ALLOWED_DTYPES:
        allowed = sorted(str(d).replace("torch.", "") for d in _ALLOWED_DTYPES | {torch.int64})
        raise TypeError(f"torch_compat cannot pass a {t.dtype} tensor to JAX; allowed dtypes: {allowed}")
    return _import_tensor(t.contiguous())


def to_torch(a: Optional[jax.Array]) -> Optional[torch.Tensor]:
    """A torch tensor sharing memory with the jax.Array ``a`` (None passes through)."""
    if a is None:
        return None
    return torch.from_dlpack(a)


class WeightCache:
    """Holds a JAX pytree built from some torch tensors until one of them changes.

    The key of each source tensor is ``(data_ptr, _version, shape, dtype, device)``: an
    in-place write bumps ``_version``, a re-assignment changes the pointer. The cache is
    dropped by ``copy``/``deepcopy``/pickle (it is derived data).
    """

    def __init__(self):
        self._key = None
        self._value = None

    @staticmethod
    def _tensor_key(t: Optional[torch.Tensor]):
        if t is None:
            return None
        return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)

    def get(self, sources: Sequence[Optional[torch.Tensor]], build: Callable[[], Any]) -> Any:
        """The cached pytree, rebuilt with ``build()`` when any of ``sources`` changed."""
        key = tuple(self._tensor_key(t) for t in sources)
        if key != self._key:
            self._value = build()
            self._key = key
        return self._value

    def clear(self) -> None:
        """Forgets the cached pytree."""
        self._key = self._value = None

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


_ops: dict[tuple, JaxOp] = {}


def jax_op(fn: Callable, **static) -> JaxOp:
    """The cached :class:`JaxOp` of ``fn`` with these static (hashable) keyword arguments."""
    key = (fn, tuple(sorted(static.items())))
    op = _ops.get(key)
    if op is None:
        op = _ops[key] = JaxOp(fn, tuple(sorted(static.items())))
    return op


class JaxFunction(torch.autograd.Function):
    """torch autograd node whose forward and backward run a :class:`JaxOp` in JAX."""

    @staticmethod
    def forward(ctx, op: JaxOp, consts: Any, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
        arrays = tuple(to_jax(t) for t in tensors)
        ctx.op, ctx.consts, ctx.arrays = op, consts, arrays
        # The jax arrays share the tensors' memory; keeping the tensors alive keeps them valid.
        ctx.tensors = tensors
        return to_torch(op.forward(consts, *arrays))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        need = tuple(
            bool(n) and t is not None and t.is_floating_point()
            for n, t in zip(ctx.needs_input_grad[2:], ctx.tensors)
        )
        if not any(need):
            return (None, None) + (None,) * len(need)
        grads = ctx.op.backward(ctx.consts, ctx.arrays, to_jax(grad), need)
        return (None, None) + tuple(to_torch(g) for g in grads)


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
