"""Shared fixtures: bitsandbytes 0.49.2 (the oracle) and a seeded generator."""

import pytest
import torch


@pytest.fixture(scope="session")
def bnb_ref():
    """The real bitsandbytes (CPU build), imported once."""
    return pytest.importorskip("bitsandbytes")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
