"""bitsandbytes.utils' names: OutlierTracer, find_outlier_dims, packed-dict helpers, weight-format maps."""

import json
from typing import Any, Optional

import numpy as np
import torch

from qflax.bnb_format import WEIGHT_FORMATS

LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {name: code for code, name in WEIGHT_FORMATS.items()}
INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = dict(WEIGHT_FORMATS)


def pack_dict_to_tensor(source_dict: dict[str, Any]) -> torch.Tensor:
    """A uint8 tensor holding the UTF-8 bytes of ``json.dumps(source_dict)``."""
    blob = np.frombuffer(json.dumps(source_dict).encode("utf-8"), dtype=np.uint8).copy()
    return torch.from_numpy(blob)


def unpack_tensor_to_dict(tensor_data: torch.Tensor) -> dict[str, Any]:
    """Inverse of :func:`pack_dict_to_tensor`."""
    return json.loads(bytes(tensor_data.cpu().numpy()).decode("utf-8"))


def find_outlier_dims(weight: torch.Tensor, reduction_dim: int = 0, zscore: float = 4.0, topk: Optional[int] = None,
                      rdm: bool = False) -> torch.Tensor:
    """Indices of dimensions whose standard deviation (over ``reduction_dim``) is an outlier.

    Args:
      weight: 2-D tensor.
      reduction_dim: dimension the std is taken over.
      zscore: a dimension is an outlier when the z-score of its std exceeds this.
      topk: instead, the ``topk`` dimensions of largest std.
      rdm: instead, ``topk`` random indices in ``[0, weight.shape[1])``.

    Returns:
      int64 index tensor.
    """
    if rdm:
        return torch.randint(0, weight.shape[1], size=(topk,), device=weight.device).long()
    std = weight.std(reduction_dim)
    z = (std - std.mean()) / std.std()
    if topk is not None:
        return torch.topk(std.abs(), k=topk, dim=0).indices
    return torch.where(z > zscore)[0]


def outlier_hook(module: torch.nn.Module, inputs: tuple) -> None:
    """Forward pre-hook of :class:`OutlierTracer`: records outlier dims the first time a weight is seen."""
    assert isinstance(module, torch.nn.Linear)
    tracer = OutlierTracer.get_instance()
    key = tracer.get_hvalue(module.weight)
    if key in tracer.hvalue2outlier_idx:
        # Second pass over the model: tracing is complete.
        for hook in tracer.hooks:
            hook.remove()
        return
    idx = find_outlier_dims(module.weight)
    tracer.outliers.append(idx)
    tracer.hvalues.append(key)
    if len(tracer.outliers) > 1:
        if idx.numel() > 0:
            assert idx.max() < module.weight.shape[1]
        tracer.hvalue2outlier_idx[key] = idx
        return
    # The first Linear has no preceding weight: use its input (std z-score over tokens, and |x| > 6).
    x = inputs[0]
    by_std = find_outlier_dims(x.reshape(-1, x.shape[-1]), reduction_dim=1, zscore=3)
    large = (x.abs() > 6).sum(dim=list(range(x.dim() - 1)))
    tracer.hvalue2outlier_idx[key] = torch.cat([by_std, torch.where(large > 0)[0]]).unique()


class OutlierTracer:
    """Process-wide tracer of outlier dimensions per Linear weight (use :meth:`get_instance`)."""

    _instance = None

    def __init__(self):
        raise RuntimeError("Call get_instance() instead")

    @classmethod
    def get_instance(cls) -> "OutlierTracer":
        """The singleton."""
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
        return cls._instance

    def initialize(self, model: torch.nn.Module) -> None:
        """Resets the records and hooks every ``nn.Linear`` of ``model`` with :func:`outlier_hook`."""
        self.last_w = None
        self.current_outlier_dims = None
        self.hvalues = []
        self.outliers = []
        self.hvalue2outlier_idx = {}
        self.initialized = True
        self.hooks = [m.register_forward_pre_hook(outlier_hook) for m in model.modules()
                      if isinstance(m, torch.nn.Linear)]

    def is_initialized(self) -> bool:
        """Whether :meth:`initialize` has run."""
        return getattr(self, "initialized", False)

    def get_hvalue(self, weight: torch.Tensor) -> int:
        """Identity of a weight: the address of its storage."""
        return weight.data.untyped_storage().data_ptr()

    def get_outliers(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """The recorded outlier dims of ``weight`` (None if unknown or not initialised)."""
        if not self.is_initialized():
            print("Outlier tracer is not initialized...")
            return None
        return self.hvalue2outlier_idx.get(self.get_hvalue(weight))
