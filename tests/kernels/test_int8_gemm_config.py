"""The int8 GEMM's launch configuration: register caps, the custom call each launch takes, and
(compiled for sm_90 on this CPU) what every variant asks of an H100/H200's shared memory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qflax_kernels import int8_gemm, int8_specs, triton_call
from qflax_kernels.launch import Launch, Output, make_launch

# The most dynamic shared memory one program may have on sm_90 (227 KiB).
SM90_MAX_SHARED_BYTES = 232448


def _gemm(m, n=14336, k=4096, dtype="bfloat16", **kwargs):
    kwargs.setdefault("has_outliers", True)
    return int8_specs.gemm_launch(m, n, k, dtype, has_bias=False, b_scale_global=False, **kwargs)


def test_outlier_tiles_of_128_rows_are_register_capped():
    capped = _gemm(512)
    assert capped.maxnreg == int8_gemm.OUTLIER_TILE_MAXNREG
    assert capped.xla_pipeline  # the cap reaches XLA's pipeline as a Triton IR module attribute
    # The same tiles without outliers, decode tiles, the big tiles and float32 x stay uncapped.
    for launch in (_gemm(512, has_outliers=False), _gemm(16), _gemm(1), _gemm(2048),
                   _gemm(512, dtype="float32", dot_ieee=True)):
        assert launch.maxnreg is None and launch.xla_pipeline, launch.constexpr_dict()
    # A tuning config is taken as given: no cap unless it names one.
    config = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    assert _gemm(512, config=config).maxnreg is None
    assert _gemm(512, config=dict(config, maxnreg=96)).maxnreg == 96


def test_masked_outlier_pass_steps_narrow_k_tiles_outside_decode():
    assert _gemm(512).constexpr_dict()["MASKED_BLOCK_K"] == 32
    decode = _gemm(1).constexpr_dict()
    assert decode["MASKED_BLOCK_K"] == decode["BLOCK_K"]


def _launch(**kwargs):
    base = dict(kernel=int8_gemm.int8_matmul_dequant_kernel, grid=(1,), num_warps=4, num_stages=2, constexprs=(),
                scalars=(), outputs=(Output((1, 1), "bfloat16"),), name="gemm")
    return Launch(**dict(base, **kwargs))


@pytest.mark.parametrize("maxnreg", [0, 300, 12.5, "128"])
def test_launch_refuses_a_register_cap_out_of_range(maxnreg):
    with pytest.raises(ValueError, match=r"maxnreg must be None or an int in \[24, 255\], got"):
        _launch(maxnreg=maxnreg)


def test_make_launch_refuses_a_register_cap_out_of_range():
    with pytest.raises(ValueError, match="maxnreg must be None or an int"):
        make_launch(int8_gemm.int8_matmul_dequant_kernel, (1,), num_warps=4, num_stages=2, constexprs={},
                    outputs=(), name="gemm", maxnreg=256)


def test_register_cap_goes_into_the_triton_ir_module_attributes():
    ttir = '#loc = loc("k.py":1:0)\nmodule {\n  tt.func public @k() {\n  }\n}\n'
    assert triton_call.with_register_cap(ttir, None) == ttir
    capped = triton_call.with_register_cap(ttir, 128)
    assert capped.splitlines()[1] == 'module attributes {"ttg.maxnreg" = 128 : i32} {'
    assert capped.splitlines()[2:] == ttir.splitlines()[2:]
    merged = triton_call.with_register_cap('module attributes {"ttg.num-warps" = 8 : i32} {\n}', 96)
    assert merged.splitlines()[0] == 'module attributes {"ttg.maxnreg" = 96 : i32, "ttg.num-warps" = 8 : i32} {'
    with pytest.raises(ValueError, match="found no module"):
        triton_call.with_register_cap("tt.func @k()", 128)
    with pytest.raises(ValueError, match="already sets ttg.maxnreg"):
        triton_call.with_register_cap(capped, 64)


# Compiled by a fresh interpreter: this process imported the kernels under TRITON_INTERPRET=1.
_COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    import jax
    import triton
    from qflax_kernels import int8_specs, triton_call

    out = []
    for m, n, k, dtype, w_dtype, kwargs in json.loads(sys.argv[1]):
        launch = int8_specs.gemm_launch(m, n, k, dtype, has_bias=False, b_scale_global=False, **kwargs)
        shapes = [((m, k), "int8"), ((n, k), "int8"), ((m,), "float32"), ((n,), "float32"), ((n,), "float32"),
                  ((m, k), dtype), ((k,), "int32"), ((1,), "int32"), ((k,), "int8"), ((n, k), w_dtype)]
        avals = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
        compiled = triton_call._compile(launch.kernel, triton_call._signature(launch, avals, False),
                                        launch.constexprs, launch.num_warps, launch.num_stages,
                                        launch.enable_fp_fusion, 90, launch.maxnreg)
        # The Triton IR XLA's pipeline gets (uncapped compile + module attribute), compiled from text.
        path = os.path.join(tempfile.gettempdir(), f"qflax_gemm_{os.getpid()}_{len(out)}.ttir")
        with open(path, "w") as f:
            uncapped = triton_call._compile(launch.kernel, triton_call._signature(launch, avals, True),
                                            launch.constexprs + launch.scalars, launch.num_warps, launch.num_stages,
                                            launch.enable_fp_fusion, 90)
            f.write(triton_call.with_register_cap(uncapped.asm["ttir"], launch.maxnreg))
        from triton.backends.compiler import GPUTarget
        from_ttir = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
        os.remove(path)
        out.append(dict(shared=compiled.metadata.shared, capped=".maxnreg" in compiled.asm["ptx"],
                        capped_from_ttir=".maxnreg" in from_ttir.asm["ptx"]))
    print(json.dumps(out))
""")

# The variants with the most shared memory (the masked outlier pass's x tiles are half precision)
# and the register-capped one.
_VARIANTS = [
    (2048, 4096, 4096, "bfloat16", "bfloat16", dict(has_outliers=True)),
    (2048, 4096, 4096, "bfloat16", "bfloat16", dict(has_outliers=True, outlier_w_float=True)),
    (2048, 4096, 4096, "bfloat16", "float16", dict(has_outliers=True, outlier_w_float=True)),
    (1, 4096, 4096, "float32", "float32", dict(has_outliers=True, dot_ieee=True)),
    (512, 14336, 4096, "float16", "float16", dict(has_outliers=True)),
]


def test_gemm_variants_compile_for_sm90_within_its_shared_memory():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as err:
        pytest.skip(f"Triton has no NVIDIA backend here: {err}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(_VARIANTS)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    for variant, got in zip(_VARIANTS, compiled):
        assert got["shared"] <= SM90_MAX_SHARED_BYTES, (variant, got)
    assert [got["capped"] for got in compiled] == [False, False, False, False, True]
    assert [got["capped_from_ttir"] for got in compiled] == [False, False, False, False, True]
