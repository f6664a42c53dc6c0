"""Helpers to call bitsandbytes 0.49.2 (CPU) as a test oracle and move data between torch and jax."""

import bitsandbytes.functional as bnb_functional
import jax.numpy as jnp
import numpy as np
import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_to_jax(t) -> jnp.ndarray:
    """Same values, same dtype (bf16 goes through float32, which is exact)."""
    name = str(t.dtype).replace("torch.", "")
    return jnp.asarray(t.detach().float().numpy()).astype(name)


def state_dict_of(packed, state) -> dict:
    """bitsandbytes' packed state-dict entries for a weight key "weight" (what Linear4bit saves)."""
    out = {"weight": packed}
    out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out
