"""A JAX primitive that runs one :class:`~qflax_kernels.launch.Launch` of a ``@triton.jit`` kernel.

Why not jax-triton's ``triton_call``: it lowers to the legacy custom call ``triton_kernel_call``,
which XLA never captures in its command buffers, so every kernel splits the step's CUDA graph
and pays a host launch (measured on an H200: 4.6 µs per call chained in one jit, against 1.1 µs
for an XLA op). jaxlib newer than 0.10 registers a typed-FFI target, ``triton_kernel_call_ffi``,
marked command-buffer compatible, which takes the same compressed kernel-call proto as an
``opaque`` attribute. This module compiles the kernel with Triton itself (PTX for the device's
compute capability), builds that proto with jaxlib's ``gpu_triton`` bindings, and emits one of:

- ``__gpu$xla.gpu.triton`` (what Pallas emits) for launches marked ``xla_pipeline``: XLA compiles
  the kernel's Triton IR with its own Triton and launches it as one of its kernels, at the cost
  of an XLA op (H200: 0.8 µs chained, like Pallas). Only kernels validated there use it: XLA's
  Triton differs from the installed one (it crashed compiling the 4-bit tensor-core kernel).
- ``triton_kernel_call_ffi`` where jaxlib registers it: captured by XLA's command buffers as a
  traced command (H200: 2.1 µs chained),
- the legacy ``triton_kernel_call`` otherwise (jaxlib 0.10.x): same kernel, not captured (4.4 µs).

``QFLAX_TRITON_CUSTOM_CALL=ffi|legacy|xla`` forces one for every launch (benchmarks compare
them). On CPU the primitive runs the kernel in Triton's interpreter (``TRITON_INTERPRET=1`` set
before the kernel modules are imported), so the CI tests drive the very launcher the GPU uses.

The primitive has no autodiff or batching rules of its own: the ops in ``qflax.ops`` wrap it in
``jax.custom_vjp`` and the launchers in ``jax.custom_batching.custom_vmap``.
"""

import functools
import os
import re
import threading
import zlib

import jax
import numpy as np
from jax._src import dispatch as jax_dispatch
from jax.extend import core as jex_core
from jax._src.interpreters import mlir as mlir_internal  # custom_call: not public in jax 0.11
from jax.interpreters import ad, batching, mlir

from qflax_kernels.launch import Launch, is_interpreted, kernel_arg_names

CUSTOM_CALL_ENV = "QFLAX_TRITON_CUSTOM_CALL"
FFI_TARGET = "triton_kernel_call_ffi"
LEGACY_TARGET = "triton_kernel_call"
# XLA compiles Triton IR itself (what Pallas emits): a kernel of XLA's own inside its command buffers.
XLA_TRITON_TARGET = "__gpu$xla.gpu.triton"
# Every qflax kernel assumes 16-byte aligned pointers (XLA's buffers are aligned further).
POINTER_ALIGNMENT = 16

_TRITON_TYPES = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8", "uint8": "u8",
    "int16": "i16", "uint16": "u16", "int32": "i32", "uint32": "u32", "int64": "i64", "uint64": "u64", "bool": "i1",
}

triton_call_p = jex_core.Primitive("qflax_triton_call")
triton_call_p.multiple_results = True


def triton_call(launch: Launch, *operands: jax.Array) -> tuple:
    """Runs ``launch`` on ``operands`` (the kernel's array inputs, in signature order).

    Args:
      launch: the kernel, grid, options, scalars and outputs.
      *operands: JAX arrays, one per array input of the kernel.

    Returns:
      A tuple with one array per ``launch.outputs`` entry.
    """
    launch.input_names(len(operands))  # raises on a mismatch with the kernel's signature
    return tuple(triton_call_p.bind(*operands, launch=launch))


def _abstract_eval(*avals, launch):
    del avals
    return [jax.core.ShapedArray(tuple(o.shape), np.dtype(jax.numpy.dtype(o.dtype))) for o in launch.outputs]


triton_call_p.def_abstract_eval(_abstract_eval)
# Eager calls compile the primitive alone, as jax does for its own primitives.
triton_call_p.def_impl(functools.partial(jax_dispatch.apply_primitive, triton_call_p))


def _no_rule(kind):
    def rule(*args, launch, **kwargs):
        raise NotImplementedError(f"{launch.name}: the Triton call has no {kind} rule; the qflax op around it has one")

    return rule


ad.primitive_jvps[triton_call_p] = _no_rule("differentiation")
batching.primitive_batchers[triton_call_p] = _no_rule("batching")


def triton_type(dtype) -> str:
    """Triton's name for an element type ("bf16", "i8", ...)."""
    name = np.dtype(jax.numpy.dtype(dtype)).name
    if name not in _TRITON_TYPES:
        raise TypeError(f"no Triton type for dtype {name}; supported: {sorted(_TRITON_TYPES)}")
    return _TRITON_TYPES[name]


# ---------------------------------------------------------------------------------------------- GPU


def _gpu_triton():
    from jax._src.lib import gpu_triton

    if getattr(gpu_triton, "TritonKernel", None) is None:
        raise RuntimeError("this jaxlib has no CUDA Triton bindings (jax._src.lib.gpu_triton); install jax[cuda12/13]")
    return gpu_triton


def ffi_target_available() -> bool:
    """Whether jaxlib registers the command-buffer-capturable ``triton_kernel_call_ffi`` target."""
    from jax._src.lib import gpu_triton

    lib = getattr(gpu_triton, "_cuda_triton", None)
    registrations = getattr(lib, "registrations", None)
    return registrations is not None and FFI_TARGET in registrations()


TARGETS = {"ffi": FFI_TARGET, "legacy": LEGACY_TARGET, "xla": XLA_TRITON_TARGET}


def custom_call_target(launch: Launch | None = None) -> str:
    """The custom call a launch lowers to.

    ``QFLAX_TRITON_CUSTOM_CALL`` ("ffi", "legacy", "xla") forces one for every launch; otherwise
    launches marked ``xla_pipeline`` go through XLA's own Triton pipeline and the others through
    jaxlib's FFI kernel call where this jaxlib registers it (command-buffer capturable), else
    through the legacy one.
    """
    forced = os.environ.get(CUSTOM_CALL_ENV, "").strip().lower()
    if forced not in ("", *TARGETS):
        raise ValueError(f"{CUSTOM_CALL_ENV} must be one of {sorted(TARGETS)}, got {forced!r}")
    if forced == "ffi" and not ffi_target_available():
        raise RuntimeError(f"{CUSTOM_CALL_ENV}=ffi, but this jaxlib does not register {FFI_TARGET}")
    if forced:
        return TARGETS[forced]
    if launch is not None and launch.xla_pipeline:
        return XLA_TRITON_TARGET
    return FFI_TARGET if ffi_target_available() else LEGACY_TARGET


def _signature(launch: Launch, input_avals, scalars_as_constants: bool) -> tuple:
    """(name, Triton type) of every kernel parameter, in the kernel's order."""
    names = launch.argument_names()
    types = [f"*{triton_type(a.dtype)}" for a in input_avals]
    types += ["constexpr" if scalars_as_constants else "i32"] * len(launch.scalars)
    types += [f"*{triton_type(o.dtype)}" for o in launch.outputs]
    by_name = dict(zip(names, types), **{name: "constexpr" for name, _ in launch.constexprs})
    missing = [n for n in kernel_arg_names(launch.kernel) if n not in by_name]
    if missing:
        raise ValueError(f"{launch.name}: no value for the kernel parameters {missing}")
    # Signature order = the kernel's parameter order (the compiler indexes attributes by position).
    return tuple((n, by_name[n]) for n in kernel_arg_names(launch.kernel))


@functools.lru_cache(maxsize=None)
def _compile(kernel, signature: tuple, constexprs: tuple, num_warps: int, num_stages: int, enable_fp_fusion: bool,
             compute_capability: int, maxnreg: int | None = None):
    """Triton's compilation of ``kernel`` for one signature (PTX, TTIR and metadata), cached."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", POINTER_ALIGNMENT]] for i, (_, t) in enumerate(signature) if t.startswith("*")}
    source = ASTSource(kernel, dict(signature), constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", compute_capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, num_ctas=1,
                                       enable_fp_fusion=enable_fp_fusion,
                                       **({} if maxnreg is None else dict(maxnreg=maxnreg))))


@functools.lru_cache(maxsize=None)
def _jaxlib_kernel(kernel, signature: tuple, constexprs: tuple, num_warps: int, num_stages: int,
                   enable_fp_fusion: bool, compute_capability: int, maxnreg: int | None = None):
    """The compiled kernel as a jaxlib ``TritonKernel`` (PTX; no TTIR: it would only enlarge every call's proto)."""
    gpu_triton = _gpu_triton()
    compiled = _compile(kernel, signature, constexprs, num_warps, num_stages, enable_fp_fusion, compute_capability,
                        maxnreg)
    meta = compiled.metadata
    if getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError(f"{meta.name}: kernels that need profiler scratch memory are not supported")
    args = (meta.name, num_warps, 1, meta.shared, compiled.asm["ptx"], "", compute_capability)
    scratch = getattr(meta, "global_scratch_size", 0)
    if scratch:
        # Only newer jaxlibs allocate global scratch for a kernel.
        return gpu_triton.TritonKernel(*args, scratch, getattr(meta, "global_scratch_align", 1))
    return gpu_triton.TritonKernel(*args)


def _nbytes(output) -> int:
    return int(np.prod(output.shape, dtype=np.int64)) * np.dtype(jax.numpy.dtype(output.dtype)).itemsize


def kernel_call_proto(launch: Launch, input_avals) -> bytes:
    """The zlib-compressed jaxlib kernel-call proto for ``launch`` with inputs of ``input_avals``."""
    gpu_triton = _gpu_triton()
    kernel = _jaxlib_kernel(launch.kernel, _signature(launch, input_avals, False), launch.constexprs,
                            launch.num_warps, launch.num_stages, launch.enable_fp_fusion,
                            gpu_triton.get_compute_capability(0), launch.maxnreg)
    params = [gpu_triton.create_array_parameter(0, POINTER_ALIGNMENT) for _ in input_avals]
    params += [gpu_triton.create_scalar_parameter(int(v), "i32") for _, v in launch.scalars]
    params += [gpu_triton.create_array_parameter(_nbytes(o) if o.zeroed else 0, POINTER_ALIGNMENT)
               for o in launch.outputs]
    call = gpu_triton.TritonKernelCall(kernel, *launch.grid3, params)
    return zlib.compress(call.to_proto(launch.name, b""))


def kernel_ttir(launch: Launch, input_avals) -> str:
    """Triton IR of ``launch`` with its scalars baked in as constants (for XLA's own Triton pipeline)."""
    constexprs = launch.constexprs + launch.scalars
    compiled = _compile(launch.kernel, _signature(launch, input_avals, True), constexprs, launch.num_warps,
                        launch.num_stages, launch.enable_fp_fusion, _gpu_triton().get_compute_capability(0))
    return with_register_cap(compiled.asm["ttir"], launch.maxnreg)


def with_register_cap(ttir: str, maxnreg: int | None) -> str:
    """Triton IR text with its module attributed ``ttg.maxnreg = maxnreg`` (unchanged for None).

    Triton's compiler turns its ``maxnreg`` option into this attribute after the Triton IR stage,
    and its lowering to LLVM makes it the kernel's ``.maxnreg``; XLA's pipeline, which starts from
    the Triton IR and takes no such option, runs the same lowering.

    Raises:
      ValueError: ``ttir`` has no module, or one that already caps its registers.
    """
    if maxnreg is None:
        return ttir
    head = re.search(r"^module( attributes \{)?", ttir, flags=re.M)
    if head is None or "ttg.maxnreg" in ttir[head.start():ttir.find("\n", head.start())]:
        found = "no module" if head is None else "a module that already sets ttg.maxnreg"
        raise ValueError(f"cannot cap the registers of this Triton IR: found {found}")
    cap = f'"ttg.maxnreg" = {int(maxnreg)} : i32'
    # Merged into the module's attributes where it has some.
    attributes = f"module attributes {{{cap}, " if head.group(1) else f"module attributes {{{cap}}}"
    return ttir[:head.start()] + attributes + ttir[head.end():]


def _row_major(avals):
    return [list(reversed(range(len(a.shape)))) for a in avals]


def _xla_triton_call(ctx, operands, launch, result_types):
    """``__gpu$xla.gpu.triton``: XLA compiles the Triton IR itself and launches it as one of its own
    kernels. It passes buffers only, so scalars are constants and zero-filled outputs are zero
    constants aliased to them."""
    from jax._src.lib.mlir import ir

    zeroed = [i for i, o in enumerate(launch.outputs) if o.zeroed]
    zeros = [mlir.ir_constant(np.zeros(ctx.avals_out[i].shape, ctx.avals_out[i].dtype)) for i in zeroed]
    grid = launch.grid3
    config = dict(name=ir.StringAttr.get(getattr(launch.kernel, "__name__", launch.kernel.fn.__name__)),
                  ir=ir.StringAttr.get(kernel_ttir(launch, ctx.avals_in)),
                  num_stages=mlir.i32_attr(launch.num_stages), num_warps=mlir.i32_attr(launch.num_warps),
                  grid_x=mlir.i32_attr(grid[0]), grid_y=mlir.i32_attr(grid[1]), grid_z=mlir.i32_attr(grid[2]),
                  debug=ir.BoolAttr.get(False))
    n_in = len(operands)
    avals = list(ctx.avals_in) + [ctx.avals_out[i] for i in zeroed]
    return mlir_internal.custom_call(
        XLA_TRITON_TARGET, result_types=result_types, operands=list(operands) + zeros, backend_config=config,
        api_version=4, operand_layouts=_row_major(avals), result_layouts=_row_major(ctx.avals_out),
        operand_output_aliases={n_in + k: i for k, i in enumerate(zeroed)}).results


def _gpu_lowering(ctx, *operands, launch):
    from jax._src.lib.mlir import ir

    result_types = [ir.RankedTensorType.get(a.shape, mlir.dtype_to_ir_type(a.dtype)) for a in ctx.avals_out]
    target = custom_call_target(launch)
    if target == XLA_TRITON_TARGET:
        return _xla_triton_call(ctx, operands, launch, result_types)
    opaque = kernel_call_proto(launch, ctx.avals_in)
    if target == FFI_TARGET:
        config = dict(name=ir.StringAttr.get(launch.name), opaque=ir.StringAttr.get(opaque))
        call = mlir_internal.custom_call(FFI_TARGET, result_types=result_types, operands=list(operands),
                                         backend_config=config, operand_layouts=_row_major(ctx.avals_in),
                                         result_layouts=_row_major(ctx.avals_out))
    else:
        call = mlir_internal.custom_call(LEGACY_TARGET, result_types=result_types, operands=list(operands),
                                         backend_config=opaque, api_version=2,
                                         operand_layouts=_row_major(ctx.avals_in),
                                         result_layouts=_row_major(ctx.avals_out))
    return call.results


mlir.register_lowering(triton_call_p, _gpu_lowering, platform="cuda")

# ------------------------------------------------------------------------------- CPU (interpreter)

# The interpreter keeps the running launch's grid in global state, and XLA may run independent
# callbacks on several threads: one launch at a time.
_INTERPRETER_LOCK = threading.Lock()


def _interpret(*operands, launch):
    from qflax_kernels import torch_launch

    if not is_interpreted(launch.kernel):
        raise RuntimeError(
            f"{launch.name}: on CPU the Triton kernels run in Triton's interpreter: set TRITON_INTERPRET=1 before "
            "qflax_kernels is imported")
    specs = tuple(jax.ShapeDtypeStruct(tuple(o.shape), jax.numpy.dtype(o.dtype)) for o in launch.outputs)

    def host(*arrays):
        with _INTERPRETER_LOCK:
            outs = torch_launch.run(launch, [torch_launch.from_numpy(a) for a in arrays], poison=True)
        return tuple(torch_launch.to_numpy(o) for o in outs)

    return jax.pure_callback(host, specs, *operands)


mlir.register_lowering(triton_call_p, mlir.lower_fun(_interpret, multiple_results=True), platform="cpu")
