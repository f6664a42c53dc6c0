"""Shared fixtures: bitsandbytes 0.49.2 (the oracle) and a seeded generator."""

import bitsandbytes
import pytest
import torch


@pytest.fixture(scope="session")
def bnb_ref():
    """The real bitsandbytes (CPU build): a pinned oracle, so a missing one is an error, never a skip."""
    return bitsandbytes


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
