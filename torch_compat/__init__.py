"""torch_compat: bitsandbytes' torch API (``import torch_compat as bnb``), computed by qflax in JAX.

Importing this package sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless already set, so
that JAX and torch can share one GPU (see :mod:`torch_compat.bridge`).
"""

from torch_compat import bridge  # first: sets the JAX memory option before JAX starts
from torch_compat import functional, nn, utils
from torch_compat.autograd import MatmulLtState, matmul, matmul_4bit
from torch_compat.install import install_as_bitsandbytes

__all__ = ["MatmulLtState", "bridge", "functional", "install_as_bitsandbytes", "matmul", "matmul_4bit", "nn", "utils"]
