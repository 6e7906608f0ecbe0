"""Test-wide setup.

Triton kernels can only run on the CPU through Triton's interpreter, and the interpreter is chosen when a module
defining a ``@triton.jit`` kernel is imported, so the switch has to be thrown here, before any test imports
``kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws fresh random inputs, but a failure can be replayed: the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
