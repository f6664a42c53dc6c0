"""Launch plans, argument checks and dispatch of the 4-bit kernels (no GPU needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qflax.ops import fourbit_kernels
from qflax.quant import fourbit
from qflax_kernels import fourbit_jax, fourbit_plan


@pytest.mark.parametrize("m", [1, 2, 16, 17, 64, 200, 256, 1024, 4096])
@pytest.mark.parametrize("n, k", [(8192, 8192), (14336, 4096), (4096, 14336), (1000, 768), (64, 320)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_plan_grid_covers_the_output_and_split_divides_k(m, n, k, dtype):
    plan = fourbit_plan.plan_matmul(m, n, k, 64, dtype)
    blocks = k // 64
    if plan.kernel == "word_gemv":
        assert m == 1 and dtype == "bfloat16" and plan.grid == (-(-n // plan.block_n), plan.split_k)
        assert plan.words % 32 == 0 and plan.num_warps == plan.words // 32  # one thread per word
        assert (k // 8) % (plan.words * plan.split_k) == 0
        assert (k // 8) // plan.words // plan.split_k <= fourbit_plan.WORD_GEMV_MAX_STEPS
    elif plan.kernel == "mma":
        assert dtype == "bfloat16" and plan.grid == (-(-m // plan.block_m), -(-n // plan.block_n), plan.split_k)
        assert plan.block_m >= 16 and plan.block_k % 64 == 0 and (k // plan.block_k) % plan.split_k == 0
    else:
        assert dtype == "float32" and blocks % (plan.split_k * plan.group) == 0
        assert plan.split_k == 1 or blocks // plan.split_k >= 8
        if plan.kernel == "gemv":
            assert m == 1 and plan.grid == (-(-n // plan.block_n), plan.split_k)
        else:
            assert plan.grid == (-(-m // plan.block_m), -(-n // plan.block_n), plan.split_k)
            assert plan.block_m >= 16  # tensor-core dots need 16 rows


def test_one_row_of_16_bit_activations_takes_the_word_gemv_when_k_allows():
    assert fourbit_plan.plan_matmul(1, 8192, 8192, 64, "float16").kernel == "word_gemv"
    assert fourbit_plan.plan_matmul(1, 64, 320, 64, "bfloat16").kernel == "mma"  # 40 words a row: no warp of them
    assert fourbit_plan.plan_matmul(2, 8192, 8192, 64, "bfloat16").kernel == "mma"
    long_rows = fourbit_plan.plan_matmul(1, 4096, 65536, 64, "bfloat16")  # 64 steps of 128 words
    assert long_rows.split_k == 2 and long_rows.grid == (512, 2)


def test_split_k_partial_sums_stay_small():
    # M=256 on 8192x8192 (float32 kernels): partials of one split are 8 MiB against a 32 MiB weight.
    assert fourbit_plan.plan_matmul(256, 8192, 8192, 64, "float32").split_k == 1
    assert fourbit_plan.plan_matmul(1, 8192, 8192, 64, "float32").split_k > 1
    for m in (2, 16, 64, 256, 1024):
        plan = fourbit_plan.plan_matmul(m, 8192, 8192, 64, "bfloat16")
        # float32 partials written and read back stay within the weight's bytes
        assert plan.split_k == 1 or 2 * plan.split_k * 4 * m * 8192 <= 8192 * 8192 // 2


def test_plan_rejects_bad_overrides():
    with pytest.raises(ValueError, match="split_k"):
        fourbit_plan.plan_matmul(1, 128, 64 * 12, 64, "float32", override=dict(split_k=8))
    with pytest.raises(ValueError, match="gemv kernel takes one row"):
        fourbit_plan.plan_matmul(3, 128, 256, 64, override=dict(kernel="gemv"))
    with pytest.raises(ValueError, match="word_gemv kernel takes one row"):
        fourbit_plan.plan_matmul(3, 128, 256, 64, "bfloat16", override=dict(kernel="word_gemv"))
    with pytest.raises(ValueError, match="words per step must be a multiple of 32"):
        fourbit_plan.plan_matmul(1, 128, 320, 64, "bfloat16", override=dict(kernel="word_gemv"))
    with pytest.raises(ValueError, match="split_k must divide"):
        fourbit_plan.plan_matmul(16, 128, 64 * 12, 64, "bfloat16", override=dict(block_k=128, split_k=4))
    with pytest.raises(ValueError, match="takes float16 or bfloat16 activations, got float32"):
        fourbit_plan.plan_matmul(1, 128, 256, 64, "float32", override=dict(kernel="word_gemv"))
    with pytest.raises(ValueError, match="kernel must be one of"):
        fourbit_plan.plan_matmul(16, 128, 256, 64, "bfloat16", override=dict(kernel="fast"))


@pytest.mark.parametrize(
    "n, k, blocksize, dtype, message",
    [
        (64, 256, 256, "bfloat16", "blocksize must be one of"),
        (64, 256, 32, "float16", "blocksize must be one of"),
        (64, 256, 64, "int8", "dtype must be one of"),
        (64, 96, 64, "float32", "multiple of blocksize"),
    ],
)
def test_unsupported_arguments_are_named(n, k, blocksize, dtype, message):
    assert message in fourbit_plan.unsupported_reason(n, k, blocksize, dtype)


def test_launcher_raises_before_launching_for_unsupported_blocksize():
    q = fourbit.quantize_4bit(jnp.ones((64, 256), jnp.float32), blocksize=256)
    with pytest.raises(ValueError, match=r"blocksize must be one of \(64, 128\)"):
        fourbit_jax.matmul_4bit(jnp.ones((1, 256), jnp.bfloat16), q.packed, q.absmax, q.quant_map,
                                shape=q.shape, blocksize=q.blocksize)


def test_unsupported_reason_names_what_the_kernels_cannot_run():
    q64 = fourbit.quantize_4bit(jnp.ones((64, 256), jnp.float32), blocksize=64)
    assert fourbit_kernels.unsupported_reason(jnp.ones((4, 8, 256), jnp.bfloat16), q64, "bfloat16") is None
    assert fourbit_kernels.unsupported_reason(jnp.ones((5000, 256), jnp.float32), q64, "float32") is None
    q256 = fourbit.quantize_4bit(jnp.ones((64, 256), jnp.float32), blocksize=256)
    assert "blocksize" in fourbit_kernels.unsupported_reason(jnp.ones((1, 256), jnp.bfloat16), q256, "bfloat16")
    q_odd_k = fourbit.quantize_4bit(jnp.ones((64, 96), jnp.float32), blocksize=64)
    assert "multiple of blocksize" in fourbit_kernels.unsupported_reason(jnp.ones((1, 96), jnp.bfloat16), q_odd_k,
                                                                         "bfloat16")
    assert "no rows" in fourbit_kernels.unsupported_reason(jnp.ones((0, 256), jnp.bfloat16), q64, "bfloat16")


def test_is_faster_follows_the_measured_row_bounds():
    q64 = fourbit.quantize_4bit(jnp.ones((64, 256), jnp.float32), blocksize=64)
    assert fourbit_kernels.is_faster(jnp.ones((4, 8, 256), jnp.float32), q64, "float32")  # 32 rows
    assert not fourbit_kernels.is_faster(jnp.ones((33, 256), jnp.float32), q64, "float32")
    assert fourbit_kernels.is_faster(jnp.ones((512, 256), jnp.float16), q64, "float16")
    assert not fourbit_kernels.is_faster(jnp.ones((513, 256), jnp.float16), q64, "float16")
    wide = fourbit.quantize_4bit(jnp.ones((8192, 64), jnp.float32), blocksize=64)
    assert fourbit_kernels.is_faster(jnp.ones((256, 64), jnp.float32), wide, "float32")
    assert not fourbit_kernels.is_faster(jnp.ones((257, 64), jnp.float32), wide, "float32")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU answer")
def test_auto_never_picks_the_interpreter_on_cpu():
    from qflax import ops

    q = fourbit.quantize_4bit(jnp.ones((64, 256), jnp.float32), blocksize=64)
    ops.matmul_4bit(jnp.ones((1, 256), jnp.bfloat16), q)
    assert ops.last_path("matmul_4bit") == "xla"


def test_only_the_unsplit_word_gemv_goes_through_xlas_triton_pipeline():
    """XLA's own Triton crashed compiling the split-K reduction and the tensor-core kernel (H200)."""
    from qflax_kernels import fourbit_launch

    def launch(m, **override):
        return fourbit_launch.matmul_launch(m, 256, 4096, 64, x_dtype="bfloat16", nested=False, has_bias=False,
                                            override=override)

    assert launch(1).xla_pipeline and launch(1).constexpr_dict()["SPLIT_K"] == 1
    assert not launch(1, split_k=2).xla_pipeline
    assert not launch(16).xla_pipeline
    assert launch(16).outputs[2].zeroed == (launch(16).constexpr_dict()["SPLIT_K"] > 1)
