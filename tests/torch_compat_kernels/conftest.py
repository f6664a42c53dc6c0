"""torch_compat's direct kernel path on CPU: the ``qflax::`` custom ops run their kernels in Triton's interpreter.

Importing the kernel tests' conftest sets ``TRITON_INTERPRET=1`` (where no GPU is present) before
any kernel module is imported, and patches the interpreter's bfloat16 dot.
"""

from tests.kernels import conftest as _kernels_conftest  # noqa: F401

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
