"""qflax.sharding without compiling sharded programs: the row view, per-shard decoding, specs, rules, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from qflax import bnb_format
from qflax import nnx as qnnx
from qflax import sharding as qs
from qflax.quant import dequantize_4bit, fourbit_rows, quantize_4bit, quantize_rows

quantize = jax.jit(quantize_4bit, static_argnames=("blocksize", "quant_type", "compress_statistics"))


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "tp"))


def weight(n=64, k=512, blocksize=64, quant_type="nf4", nested=True, seed=0, dtype=jnp.float32):
    w = jax.random.normal(jax.random.key(seed), (n, k), jnp.float32).astype(dtype)
    return quantize(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def abstract(n=64, k=512, blocksize=64, row_view=False):
    """The shapes of a 4-bit weight (specs need nothing else; nothing is computed)."""
    q = jax.eval_shape(lambda: quantize_4bit(jnp.zeros((n, k)), blocksize=blocksize, compress_statistics=True))
    return jax.eval_shape(fourbit_rows.to_row_view, q) if row_view else q


@pytest.mark.parametrize("quant_type,blocksize,nested,dtype", [("nf4", 64, True, "bfloat16"),
                                                                ("fp4", 128, False, "float16")])
def test_row_decode_equals_dequantize_4bit_bit_for_bit(quant_type, blocksize, nested, dtype):
    # 1280 / 64 = 20 blocks a row: the blocks of 256 straddle rows.
    q = weight(128, 1280, blocksize, quant_type, nested, dtype=dtype)
    expected = np.asarray(dequantize_4bit(q.replace(dtype=dtype)))
    for layout in (q, fourbit_rows.to_row_view(q)):
        got = np.asarray(fourbit_rows.dequantize_rows(layout, dtype))
        np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
    view = fourbit_rows.to_row_view(q)
    np.testing.assert_array_equal(np.asarray(dequantize_4bit(view)), np.asarray(dequantize_4bit(q)))


@pytest.mark.parametrize("rows,cols,row_start,col_start", [
    (64, 1280, 64, 0),    # whole rows, 1280 blocks: 5 nested blocks of its own -> kept double-quantized
    (16, 1280, 32, 0),    # whole rows, 320 blocks: not on a 256-block boundary -> absmax decoded
    (48, 320, 8, 640),    # a column block (a row-parallel shard)
])
def test_local_block_is_the_matching_slice_of_the_weight(rows, cols, row_start, col_start):
    q = weight(128, 1280, 64, "nf4", True, seed=3)
    full = np.asarray(dequantize_4bit(q))
    view = fourbit_rows.to_row_view(q)
    block = view.replace(packed=view.packed[row_start:row_start + rows, col_start // 2:(col_start + cols) // 2],
                         absmax=view.absmax[row_start:row_start + rows, col_start // 64:(col_start + cols) // 64])
    local = fourbit_rows.local_block(block, jnp.int32(row_start), jnp.int32(col_start))
    assert local.shape == (rows, cols) and local.packed.shape == (rows * cols // 2, 1)
    assert local.nested == (rows == 64)
    np.testing.assert_array_equal(np.asarray(dequantize_4bit(local)),
                                  full[row_start:row_start + rows, col_start:col_start + cols])


def test_row_view_keeps_bitsandbytes_bytes_at_the_boundaries():
    q = weight(32, 256)
    view = qs.to_row_view({"fc": q})["fc"]
    assert view.packed.shape == (32, 128) and view.absmax.shape == (32, 4)
    np.testing.assert_array_equal(np.asarray(view.packed).reshape(-1), np.asarray(q.packed).reshape(-1))
    back = qs.to_flat_layout({"fc": view})["fc"]
    expected, got = bnb_format.to_bnb_state_dict(q, "w"), bnb_format.to_bnb_state_dict(back, "w")
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))
    # A row view is not bitsandbytes' layout: loading its state dict fails loudly.
    with pytest.raises(ValueError, match="must be uint8 of shape"):
        bnb_format.from_bnb_state_dict(bnb_format.to_bnb_state_dict(view, "w"), "w")


def linen_variables():
    w8 = jax.eval_shape(quantize_rows, jnp.ones((32, 64)))
    return {"params": {"up": {"bias": jnp.zeros(64)}, "down": {"bias": jnp.zeros(32)}},
            "quantized": {"up": {"weight": abstract(row_view=True)}, "down": {"weight": w8}}}


def test_specs_follow_column_and_row_rules(mesh):
    rules = [(r"up/weight$", P("tp", None)), (r"up/bias$", P("tp")), (r"down/weight$", P(None, "tp"))]
    specs = qs.quantized_partition_specs(linen_variables(), rules, mesh)
    up = specs["quantized"]["up"]["weight"]
    assert (up.packed, up.absmax) == (P("tp"), P("tp"))
    assert (up.quant_map, up.nested_absmax, up.nested_quant_map, up.nested_offset) == (P(),) * 4
    down = specs["quantized"]["down"]["weight"]
    assert (down.codes, down.scale) == (P(None, "tp"), P())
    assert specs["params"]["up"]["bias"] == P("tp") and specs["params"]["down"]["bias"] == P()
    # Row-parallel 4-bit: the row view's second axis; flat column-parallel: the bytes' first axis.
    row = qs.quantized_partition_specs({"w": abstract(row_view=True)}, [("w", P(None, ("dp", "tp")))], mesh)["w"]
    assert (row.packed, row.absmax) == (P(None, ("dp", "tp")), P(None, ("dp", "tp")))
    flat = qs.quantized_partition_specs({"w": abstract()}, [("w", P("tp", None))], mesh)["w"]
    assert (flat.packed, flat.absmax) == (P("tp"), P("tp"))
    shardings = qs.quantized_shardings(linen_variables(), rules, mesh)
    assert shardings["quantized"]["up"]["weight"].packed.spec == P("tp")
    assert shardings["quantized"]["up"]["weight"].packed.mesh is mesh


@pytest.mark.parametrize("tree,rule,message", [
    ({"w": abstract(66, 512)}, P("tp", None), r"out_features \(66\) split over mesh axis 'tp' \(size 4\) must be a "
                                            r"multiple of 4; got 66"),
    ({"w": abstract(64, 192, row_view=True)}, P(None, "tp"),
     r"in_features \(192\) split over mesh axis 'tp' \(size 4\) must be a multiple of 4 x 64 = 256 \(splits only "
     r"at absmax-block boundaries\)"),
    ({"w": abstract()}, P(None, "tp"), r"needs the row view.*to_row_view"),
    ({"w": abstract(64, 100)}, P("tp", None), r"in_features to be a multiple of blocksize 64.*got 100"),
    ({"w": abstract()}, P("mp", None), r"names mesh axes \['mp'\]; the mesh has axes \('dp', 'tp'\)"),
    ({"w": abstract()}, P("tp", None, None), r"has 3 entries, but the array has only 2 dimensions"),
    ({"w": abstract()}, P("tp", "tp"), r"uses a mesh axis twice"),
    ({"w": jax.eval_shape(quantize_rows, jnp.ones((32, 6)))}, P(None, "tp"),
     r"int8 weight \(32, 6\).*in_features \(6\).*multiple of 4"),
    ({"w": jax.ShapeDtypeStruct((6, 8), jnp.float32)}, P("tp"),
     r"w: dimension 0 \(6\) split over mesh axis 'tp' \(size 4\)"),
])
def test_bad_splits_raise_naming_the_variable_sizes_and_allowed_values(mesh, tree, rule, message):
    with pytest.raises(ValueError, match=message):
        qs.quantized_partition_specs(tree, [("w", rule)], mesh)


def test_explicit_mesh_axes_are_refused_for_quantized_weights():
    mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match=r"split only over Auto mesh axes; \['tp'\] are Explicit.*axis_types="):
        qs.quantized_partition_specs({"w": abstract()}, [("w", P("tp", None))], mesh)
    # Replicated quantized weights and split float arrays are fine on such a mesh.
    specs = qs.quantized_partition_specs({"w": abstract(), "b": jnp.zeros(8)}, [("b", P("tp"))], mesh)
    assert specs["w"].packed == P() and specs["b"] == P("tp")


def test_malformed_rules_raise_type_errors(mesh):
    with pytest.raises(TypeError, match=r"rules\[0\] must be a \(pattern string, PartitionSpec\) pair"):
        qs.quantized_partition_specs({"w": jnp.ones(4)}, [("w",)], mesh)
    with pytest.raises(TypeError, match=r"rules\[0\] \('w'\): the spec must be a jax.sharding.PartitionSpec"):
        qs.quantized_partition_specs({"w": jnp.ones(4)}, [("w", ("tp",))], mesh)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        qs.quantized_partition_specs({"w": jnp.ones(4)}, [], "tp")


def test_rules_from_linen_annotations_transpose_kernels(mesh):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            up = nn.Dense(64, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "tp")), name="up")
            down = nn.Dense(32, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                         ("mlp", "embed")), name="down")
            return down(up(x))

    float_params = MLP().init(jax.random.key(0), jnp.ones((2, 512)))["params"]
    rules = qs.rules_from_annotations(float_params, logical_axis_rules=[("mlp", "tp"), ("embed", None)])
    variables = {"quantized": {"up": {"weight": abstract()}, "down": {"weight": jax.eval_shape(quantize_rows,
                                                                                              jnp.ones((32, 64)))}}}
    specs = qs.quantized_partition_specs(variables, rules, mesh)
    assert specs["quantized"]["up"]["weight"].packed == P("tp")             # kernel (in, out) -> weight (out, in)
    assert specs["quantized"]["down"]["weight"].codes == P(None, "tp")      # logical "mlp" -> "tp", transposed
    # The annotated tree can also be given as the rules themselves.
    direct = qs.quantized_partition_specs(variables, float_params, mesh, logical_axis_rules=[("mlp", "tp")])
    assert direct["quantized"]["down"]["weight"].codes == P(None, "tp")


def test_rules_from_nnx_annotations_transpose_kernels(mesh):
    class Model(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "tp"))
            self.up = nnx.Linear(512, 64, kernel_init=init, rngs=rngs)

    with jax.set_mesh(mesh):
        annotated, model = Model(nnx.Rngs(0)), Model(nnx.Rngs(0))
    quantized = qnnx.quantize_model(model, qnnx.Rule("*", layers="dense"))  # NF4, in place: `annotated` keeps its float kernel
    specs = qs.quantized_partition_specs(nnx.state(quantized), annotated, mesh)
    assert specs["up"]["weight"].get_value().packed == P("tp")
