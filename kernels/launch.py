"""What one launch of a ``@triton.jit`` kernel is: kernel, grid, compile options, arguments, outputs.

A :class:`Launch` is plain data, built by each op's launch builder (``fourbit_launch``,
``int8_launch_specs``) from problem sizes alone. Three runners consume the same object, so the
kernel's arguments are put together in exactly one place per op:

- ``qflax_kernels.triton_call``: a JAX primitive (GPU: one custom call that XLA captures in
  its command buffers; CPU: Triton's interpreter, for the CI tests),
- ``qflax_kernels.torch_launch``: Triton's own launcher on torch tensors (torch_compat on CUDA,
  the tile tuner, interpreter runs).

Argument convention of every qflax kernel, in signature order: the array inputs, then the
runtime scalars (int32, e.g. the number of rows ``M``, so a new batch size reuses the compiled
kernel), then the outputs, then the ``tl.constexpr`` parameters.
"""

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Output:
    """One output buffer of a launch.

    Attributes:
      shape: its shape.
      dtype: numpy dtype name ("bfloat16", "float32", "int8", "int32", ...).
      zeroed: whether it must be zero-filled before the kernel runs (counters, atomics).
    """

    shape: tuple
    dtype: str
    zeroed: bool = False


@dataclasses.dataclass(frozen=True)
class Launch:
    """Everything needed to run one kernel, independent of the framework that runs it.

    Attributes:
      kernel: the ``@triton.jit`` function (or its interpreted twin under TRITON_INTERPRET=1).
      grid: launch grid, 1 to 3 ints.
      num_warps: warps per program.
      num_stages: software-pipelining depth.
      constexprs: (name, value) pairs of the kernel's ``tl.constexpr`` parameters.
      scalars: (name, value) pairs of the int32 runtime scalars, in signature order.
      outputs: the output buffers, in signature order.
      name: a readable name for profiles and error messages.
      enable_fp_fusion: let the compiler contract multiply-adds (off where bit-exact rounding
        against a reference matters, e.g. the quantizers).
      xla_pipeline: the kernel is known to compile and run correctly through XLA's own Triton
        pipeline (``triton_call``'s ``__gpu$xla.gpu.triton`` target, launched like an XLA kernel);
        others use jaxlib's kernel-call custom call.
      maxnreg: cap on registers per thread (PTX ``.maxnreg``), or None for the compiler's choice.
        A compile option of Triton's; XLA's pipeline gets it as the Triton IR module's
        ``ttg.maxnreg`` attribute (what Triton's own pipeline sets from that option).
    """

    kernel: Any
    grid: tuple
    num_warps: int
    num_stages: int
    constexprs: tuple
    scalars: tuple
    outputs: tuple
    name: str
    enable_fp_fusion: bool = True
    xla_pipeline: bool = False
    maxnreg: Optional[int] = None

    def __post_init__(self):
        if not 1 <= len(self.grid) <= 3 or any(int(g) < 1 for g in self.grid):
            raise ValueError(f"{self.name}: grid must have 1 to 3 positive entries, got {self.grid}")
        if self.maxnreg is not None and not (isinstance(self.maxnreg, int) and 24 <= self.maxnreg <= 255):
            raise ValueError(f"{self.name}: maxnreg must be None or an int in [24, 255], got {self.maxnreg!r}")

    @property
    def grid3(self) -> tuple:
        """The grid padded to three dimensions."""
        return tuple(int(g) for g in self.grid) + (1,) * (3 - len(self.grid))

    def constexpr_dict(self) -> dict:
        return dict(self.constexprs)

    def argument_names(self) -> tuple:
        """The kernel's non-constexpr parameter names: inputs, scalars, outputs."""
        constexpr_names = {name for name, _ in self.constexprs}
        return tuple(n for n in kernel_arg_names(self.kernel) if n not in constexpr_names)

    def input_names(self, num_inputs: int) -> tuple:
        """Names of the array inputs, checking the signature against ``num_inputs`` inputs.

        Raises:
          ValueError: the kernel's signature does not have ``num_inputs`` inputs, then the
            scalars, then the outputs.
        """
        names = self.argument_names()
        expected = num_inputs + len(self.scalars) + len(self.outputs)
        scalar_names = tuple(n for n, _ in self.scalars)
        if len(names) != expected or names[num_inputs:num_inputs + len(scalar_names)] != scalar_names:
            raise ValueError(
                f"{self.name}: kernel parameters {names} do not match {num_inputs} inputs, scalars {scalar_names} "
                f"and {len(self.outputs)} outputs")
        return names[:num_inputs]


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs in Triton's interpreter)."""
    return type(kernel).__name__ == "InterpretedFunction"


def kernel_arg_names(kernel) -> tuple:
    """Parameter names of a ``@triton.jit`` function (compiled or interpreted)."""
    names = getattr(kernel, "arg_names", None)
    if names is None:  # the interpreter wraps the JITFunction
        names = kernel.fn.arg_names
    return tuple(names)


def make_launch(kernel, grid, *, num_warps: int, num_stages: int, constexprs: dict, outputs, name: str,
                scalars: dict | None = None, enable_fp_fusion: bool = True, xla_pipeline: bool = False,
                maxnreg: Optional[int] = None) -> Launch:
    """Builds a :class:`Launch` with its dicts frozen into sorted-by-signature tuples (hashable)."""
    order = {n: i for i, n in enumerate(kernel_arg_names(kernel))}
    missing = [n for n in list(constexprs) + list(scalars or {}) if n not in order]
    if missing:
        raise ValueError(f"{name}: the kernel has no parameters {missing}")
    return Launch(
        kernel=kernel, grid=tuple(int(g) for g in grid), num_warps=int(num_warps), num_stages=int(num_stages),
        constexprs=tuple(sorted(constexprs.items(), key=lambda kv: order[kv[0]])),
        scalars=tuple(sorted(((k, int(v)) for k, v in (scalars or {}).items()), key=lambda kv: order[kv[0]])),
        outputs=tuple(outputs), name=name, enable_fp_fusion=enable_fp_fusion, xla_pipeline=xla_pipeline,
        maxnreg=maxnreg)
