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


def pytest_configure(config):
    """Triton 3.6's interpreter fails under numpy >= 2.4 (every kernel test, with "only 0-dimensional arrays can be
    converted to Python scalars"); say so once instead. The fix is the `triton36` extra (README, Tests)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy  # noqa: PLC0415
    import triton  # noqa: PLC0415
    from packaging.version import Version  # noqa: PLC0415

    if Version(triton.__version__) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"):
        pytest.exit(f"triton {triton.__version__}'s interpreter needs numpy < 2.4 (installed: {numpy.__version__}): "
                    'pip install -e ".[test,triton36]"', returncode=4)


TEST_TIMEOUT_S = 600  # about 6x the slowest test (~105 s): a hang (e.g. a stuck gloo rank) fails one test, not the run


def pytest_collection_modifyitems(items):
    """Benchmarks (bench/) may run longer; only the tests get the limit."""
    for item in items:
        item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


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
