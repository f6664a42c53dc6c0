"""torch_compat: bitsandbytes' torch API (``import torch_compat as bnb``), computed by qflax in JAX."""
