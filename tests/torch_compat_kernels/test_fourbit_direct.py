"""Linear4bit's direct path (``qflax::matmul_4bit`` / ``grad_input_4bit`` on the torch tensors) vs the DLPack paths.

Against JAX running the same kernel the outputs and input gradients are bit-identical (one
launch builder, one kernel); against the XLA reference they agree to the rounding of the
activation dtype. Kernels run in Triton's interpreter on CPU tensors.
"""

import os

import pytest
import torch

import torch_compat as tc
from tests.torch_compat_kernels import paths
from torch_compat import direct_path

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the direct path runs on CPU only in Triton's interpreter")

OP = direct_path.LINEAR_4BIT
N, K = 72, 256  # N is no multiple of the tiles; K is 4 blocks of 64 or 2 of 128
TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
SAME_KERNEL = {torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float32: 1e-6}
# (quant_type, blocksize, double quantization, activation dtype)
COMBOS = [
    ("nf4", 64, False, torch.float16),
    ("nf4", 64, True, torch.float32),
    ("fp4", 128, True, torch.float16),
    ("fp4", 64, False, torch.bfloat16),
    ("nf4", 128, False, torch.float32),
]


def make_layer(quant_type, blocksize, nested, bias=True, compute_dtype=None, n=N, k=K, seed=0):
    torch.manual_seed(seed)
    layer = tc.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, compress_statistics=nested,
                             quant_type=quant_type)
    layer.weight.blocksize = blocksize
    return layer.to("cpu")


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("combo", range(len(COMBOS)))
def test_forward_and_input_gradient_match_the_jax_kernel_path(combo, rows, gen):
    quant_type, blocksize, nested, dtype = COMBOS[combo]
    layer = make_layer(quant_type, blocksize, nested, bias=bool(combo % 2))
    x = torch.randn(rows, K, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(rows, N, generator=gen).to(dtype)
    ours = paths.direct(layer, x, OP, g)
    (ours_grad,) = paths.grads(x)
    theirs = paths.jax_kernel(layer, x, OP, g)
    (theirs_grad,) = paths.grads(x)
    assert ours.dtype == dtype and ours.shape == (rows, N) and torch.isfinite(ours).all()
    if nested:
        # JAX's forward decodes double-quantized absmax with XLA before the kernel, the direct path
        # inside it: the same formula, but XLA may contract its multiply-add, so float32 absmax can
        # differ in the last bit. Same kernel otherwise: far below the dtype's rounding.
        assert paths.relative_error(ours, theirs) < SAME_KERNEL[dtype]
    else:
        assert torch.equal(ours, theirs)
    assert torch.equal(ours_grad, theirs_grad)
    reference = paths.jax_xla(layer, x, OP, g)
    (reference_grad,) = paths.grads(x)
    assert paths.relative_error(ours, reference) < TOLERANCE[dtype]
    assert paths.relative_error(ours_grad, reference_grad) < TOLERANCE[dtype]


def test_bias_gradient_and_leading_dims_match_the_xla_path(gen):
    layer = make_layer("nf4", 64, True)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, K, generator=gen).requires_grad_()
    g = torch.randn(2, 3, N, generator=gen)
    ours = paths.direct(layer, x, OP, g)
    ours_grads = paths.grads(x, layer.bias)
    reference = paths.jax_xla(layer, x, OP, g)
    reference_grads = paths.grads(x, layer.bias)
    assert ours.shape == (2, 3, N)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the bias gradient is the column sum of G: an independent number
    torch.testing.assert_close(ours_grads[1], g.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_compute_dtype_differs_from_the_input_dtype(gen):
    # float16 input, float32 compute: the float32 kernel runs, the output comes back in float16.
    layer = make_layer("fp4", 64, False, compute_dtype=torch.float32)
    x = torch.randn(3, K, generator=gen).half()
    ours = paths.direct(layer, x, OP)
    assert ours.dtype == torch.float16
    assert torch.equal(ours, paths.jax_kernel(layer, x, OP))


def test_non_contiguous_input(gen):
    layer = make_layer("nf4", 64, False)
    x = torch.randn(K, 4, generator=gen).T
    assert not x.is_contiguous()
    assert torch.equal(paths.direct(layer, x, OP), paths.direct(layer, x.contiguous(), OP))


def test_weights_are_converted_once_and_follow_in_place_writes(gen, monkeypatch):
    from torch_compat import cuda_weights

    layer = make_layer("nf4", 64, False)
    built = []
    original = cuda_weights.fourbit_views
    monkeypatch.setattr(cuda_weights, "fourbit_views", lambda *a: built.append(1) or original(*a))
    x = torch.randn(2, K, generator=gen)
    for _ in range(3):
        paths.direct(layer, x, OP)
    assert len(built) == 1
    other = make_layer("nf4", 64, False, seed=1)
    with torch.no_grad():  # load_state_dict's in-place copy_ of other bytes and statistics
        layer.weight.copy_(other.weight)
        layer.weight.quant_state.absmax.copy_(other.weight.quant_state.absmax)
        layer.bias.copy_(other.bias)
    assert torch.equal(paths.direct(layer, x, OP), paths.jax_kernel(other, x, OP))
    assert len(built) == 1  # the kernel's views share memory with the parameter and its statistics
    # a loaded checkpoint replaces the parameter: the cache is rebuilt
    layer.load_state_dict(make_layer("nf4", 64, False, seed=2).state_dict())
    assert torch.equal(paths.direct(layer, x, OP), paths.jax_kernel(make_layer("nf4", 64, False, seed=2), x, OP))
    assert len(built) == 2
    # a statistic the kernel needs in another dtype is copied once, and copied again after an in-place write
    # (the JAX bridge takes float32 tables only, as checkpoints do: compare with float32 twins)
    state = layer.weight.quant_state
    before = paths.direct(layer, x, OP)
    state.code = state.code.double()
    first = paths.direct(layer, x, OP)
    assert torch.equal(first, before) and len(built) == 3
    with torch.no_grad():
        state.code.mul_(0.5)
    halved = paths.direct(layer, x, OP)
    assert len(built) == 4 and not torch.equal(halved, first)
    assert torch.equal(paths.direct(layer, x, OP), halved) and len(built) == 4
    state.code = state.code.float()
    assert torch.equal(halved, paths.jax_kernel(layer, x, OP))


def test_eager_plan_replays_the_first_calls_decisions_until_something_changes(gen, monkeypatch):
    # After one plain eager call a layer keeps its launch decision (kernel_layers._EagerPlan4bit);
    # the next same-looking call skips the checks, and any change of input, backend, bias or need
    # for autograd goes back through them.
    from qflax.ops import use_backend
    from torch_compat import kernel_layers

    layer = make_layer("nf4", 64, True)
    x = torch.randn(3, K, generator=gen)
    with torch.no_grad():
        first = paths.direct(layer, x, OP)
        assert isinstance(layer.__dict__.get("_eager_plan"), kernel_layers._EagerPlan4bit)
        checks = []
        real_use_kernel = direct_path.use_kernel
        monkeypatch.setattr(direct_path, "use_kernel", lambda *a: checks.append(a) or real_use_kernel(*a))
        assert torch.equal(paths.direct(layer, x, OP), first) and not checks  # replayed: no checks
        assert direct_path.last_path(OP) == direct_path.KERNEL
        paths.direct(layer, torch.randn(4, K, generator=gen), OP)  # another shape: checked again
        assert len(checks) == 1
        with use_backend("xla"):  # another backend asked for: the DLPack path, as without a plan
            assert paths.relative_error(layer(x), first) < TOLERANCE[torch.float32]
        assert direct_path.last_path(OP) == direct_path.DLPACK
        layer.bias = torch.nn.Parameter(layer.bias + 1.0, requires_grad=False)  # a replaced bias is seen
        assert torch.allclose(paths.direct(layer, x, OP), first + 1.0, atol=1e-5)
    import copy
    import pickle

    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):  # copies start without a plan
        assert twin.__dict__.get("_eager_plan") is None
        with torch.no_grad():
            assert torch.equal(paths.direct(twin, x, OP), paths.direct(layer, x, OP))
    xg = x.clone().requires_grad_()
    out = paths.direct(layer, xg, OP, torch.ones(3, N))  # autograd needs the custom op: no plan
    (grad,) = paths.grads(xg)
    assert out.grad_fn is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_state_dict_keeps_bitsandbytes_bytes(gen):
    layer = make_layer("nf4", 64, True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    paths.direct(layer, torch.randn(3, K, generator=gen), OP)
    after = layer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_policy_picks_the_dlpack_path(gen):
    layer = make_layer("nf4", 64, False)
    x = torch.randn(2, K, generator=gen)
    layer(x)  # auto on CPU: the kernels run only on CUDA tensors
    assert direct_path.last_path(OP) == direct_path.DLPACK
    paths.jax_xla(layer, x, OP)
    # blocksize 256 has no kernel: DLPack, where JAX names the reason
    odd = make_layer("nf4", 256, False)
    from qflax.ops import use_backend

    with use_backend("triton"), pytest.raises(ValueError, match="blocksize"):
        odd(x)
    assert direct_path.last_path(OP) == direct_path.DLPACK


def test_auto_uses_the_kernels_on_cuda_within_the_measured_rows(monkeypatch):
    monkeypatch.setattr(direct_path, "_device_supported_cached", lambda device_type, index, dtype: device_type == "cuda")
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv(direct_path.ENV_VAR, raising=False)
    max_rows = direct_path.fourbit_max_rows(4096, "bfloat16")
    assert max_rows == 512
    assert direct_path.use_kernel(OP, cuda, "bfloat16", True, 512 <= max_rows)
    assert not direct_path.use_kernel(OP, cuda, "bfloat16", True, 513 <= max_rows)
    assert not direct_path.use_kernel(OP, cuda, "bfloat16", False, True)
    assert not direct_path.use_kernel(OP, torch.device("cpu"), "bfloat16", True, True)
    with direct_path.dlpack_only():
        assert not direct_path.use_kernel(OP, cuda, "bfloat16", True, True)
    monkeypatch.setenv(direct_path.ENV_VAR, "0")
    assert not direct_path.use_kernel(OP, cuda, "bfloat16", True, True)
