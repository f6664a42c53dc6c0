"""``OutlierAwareLinear`` (docs/int8.md#outlier-aware): a base class; subclasses quantize around outlier dimensions."""

import torch
from torch import nn

from torch_compat.utils import OutlierTracer


class OutlierAwareLinear(nn.Linear):
    """Linear layer that asks :class:`~torch_compat.utils.OutlierTracer` for its outlier dims at the first call.

    Subclasses implement ``quantize_weight(w, outlier_idx)`` (run once, at the first forward)
    and ``forward_with_outliers(x, outlier_idx)``. Unlike bitsandbytes 0.49.2 (whose forward
    returns None), ``forward`` returns ``forward_with_outliers(x, self.outlier_dim)``.
    """

    def __init__(self, input_features, output_features, bias=True, device=None):
        super().__init__(input_features, output_features, bias, device)
        self.outlier_dim = None
        self.is_quantized = False

    def forward_with_outliers(self, x: torch.Tensor, outlier_idx):
        raise NotImplementedError("Please override the `forward_with_outliers(self, x, outlier_idx)` function")

    def quantize_weight(self, w: torch.Tensor, outlier_idx):
        raise NotImplementedError("Please override the `quantize_weights(self, w, outlier_idx)` function")

    def forward(self, x: torch.Tensor):
        if self.outlier_dim is None:
            tracer = OutlierTracer.get_instance()
            if not tracer.is_initialized():
                print("Please use OutlierTracer.initialize(model) before using the OutlierAwareLinear layer")
            self.outlier_dim = tracer.get_outliers(self.weight)
        if not self.is_quantized:
            w = self.quantize_weight(self.weight, self.outlier_dim)
            with torch.no_grad():
                self.weight.copy_(w)
            self.is_quantized = True
        return self.forward_with_outliers(x, self.outlier_dim)
