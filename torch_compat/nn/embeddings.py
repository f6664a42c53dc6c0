"""Embedding, StableEmbedding, Embedding8bit, Embedding4bit/FP4/NF4 (docs/embeddings.md).

``Embedding`` and ``StableEmbedding`` hold float tables and look them up with torch (there
is nothing to quantize); the 8-bit and 4-bit tables are gathered and dequantized by qflax
in JAX.
"""

import warnings

import torch
import torch.nn.functional as torch_F
from torch import nn

from qflax.quant import Int8Rows
from torch_compat import bridge, forwards
from torch_compat.nn.checkpoint import FourBitCheckpoint, Int8Checkpoint
from torch_compat.nn.params import Int8Params, Params4bit, check_quant_type
from torch_compat.quant_state import dtype_name


def _xavier_with_padding(module: nn.Embedding) -> None:
    nn.init.xavier_uniform_(module.weight)
    if module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].fill_(0)


class Embedding(nn.Embedding):
    """``torch.nn.Embedding`` with bitsandbytes' xavier-uniform init and zeroed padding row."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, device=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, device=device)

    def reset_parameters(self) -> None:
        _xavier_with_padding(self)


class StableEmbedding(nn.Embedding):
    """Embedding followed by a LayerNorm (computed in the default dtype), output in the weight's dtype.

    Unlike bitsandbytes 0.49.2, ``device`` and ``dtype`` are honoured (bitsandbytes passes them
    into the wrong positional slots: ``device`` freezes the weight, ``dtype`` raises).
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(embedding_dim, device=device)

    def reset_parameters(self) -> None:
        _xavier_with_padding(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        emb = torch_F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                self.scale_grad_by_freq, self.sparse)
        return self.norm(emb.to(torch.get_default_dtype())).to(self.weight.dtype)


def _check_ids(input: torch.Tensor, num_embeddings: int) -> None:
    if input.is_floating_point() or input.dtype == torch.bool:
        raise TypeError(f"embedding indices must be an integer tensor, got {input.dtype}")
    if input.numel() and (int(input.min()) < 0 or int(input.max()) >= num_embeddings):
        raise IndexError(f"embedding indices must lie in [0, {num_embeddings}), got [{int(input.min())}, "
                         f"{int(input.max())}]")


class Embedding8bit(Int8Checkpoint, nn.Embedding):
    """Embedding with an int8 table (per-row absmax), quantized on the first ``.to(device)``.

    Output ``(*input.shape, embedding_dim)`` in the construction dtype. Unlike bitsandbytes
    0.49.2, ``state_dict()``/``load_state_dict()`` work (keys ``weight`` int8, ``SCB``,
    ``weight_format``, as Linear8bitLt).
    """

    def __init__(self, num_embeddings, embedding_dim, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Int8Params(self.weight.data, has_fp16_weights=False, requires_grad=False)
        self._register_load_state_dict_pre_hook(self._check_weight_format)
        self._jax_weight = bridge.WeightCache()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.int8 or self.weight.SCB is None:
            raise RuntimeError("Embedding layer is not quantized. Please call .cuda() or .to(device) first.")
        _check_ids(input, self.num_embeddings)
        weight, scale = self.weight, self.weight.SCB
        rows = self._jax_weight.get(
            [weight, scale], lambda: Int8Rows(codes=bridge.to_jax(weight), scale=bridge.to_jax(scale))
        )
        op = bridge.jax_op(forwards.embedding_8bit, dtype=dtype_name(self.dtype))
        return bridge.call(op, rows, input)


class Embedding4bit(FourBitCheckpoint, nn.Embedding):
    """Embedding with a 4-bit table (blocks of 64 over the flattened table), quantized on the first ``.to``.

    Output ``(*input.shape, embedding_dim)`` in the construction dtype. Unlike bitsandbytes
    0.49.2, ``state_dict()``/``load_state_dict()`` work (Linear4bit's key format).
    """

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_type="fp4", quant_storage=torch.uint8,
                 device=None):
        check_quant_type(quant_type)
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Params4bit(self.weight.data, requires_grad=False, compress_statistics=None,
                                 quant_type=quant_type, quant_storage=quant_storage, module=self)
        self.quant_state = None
        self.quant_storage = quant_storage
        self._jax_weight = bridge.WeightCache()
        if embedding_dim % self.weight.blocksize != 0:
            warnings.warn(
                f"Embedding size {embedding_dim} is not divisible by block size {self.weight.blocksize}. "
                "This will lead to slow inference.", UserWarning, stacklevel=2,
            )

    def _weight_shape(self):
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.fix_4bit_weight_quant_state_from_module()
        _check_ids(input, self.num_embeddings)
        weight, state = self.weight, self.weight.quant_state
        q = self._jax_weight.get([weight, *state.tensors()], lambda: state.to_packed4bit(weight))
        op = bridge.jax_op(forwards.embedding_4bit, dtype=dtype_name(self.dtype))
        return bridge.call(op, q, input)


class EmbeddingFP4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="fp4"``."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, quant_type="fp4", quant_storage=quant_storage,
                         device=device)


class EmbeddingNF4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="nf4"``."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, quant_type="nf4", quant_storage=quant_storage,
                         device=device)
