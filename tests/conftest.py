"""Test-wide setup.

Triton kernels can only run on the CPU through Triton's interpreter, and the interpreter is chosen when a module
defining a ``@triton.jit`` kernel is imported, so the switch has to be thrown here, before any test imports
``kernels``.
"""

import os

import numpy as np
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


@pytest.fixture
def hub_dataset(tmp_path):
    """A Hugging Face dataset written as a hub repository holds one (data/<split>-00000-of-00001.parquet), which
    `datasets.load_dataset(folder)` reads offline as it reads a downloaded one. Split `s` of n images holds images
    of width `WIDTHS[s] + i`, so a test can tell which image it got; the first is grayscale.
    `hub_dataset(column="image", splits={"train": 6, "validation": 3})` returns the folder."""
    import datasets  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    def write(column: str = "image", splits: dict | None = None):
        root = tmp_path / "hub_dataset"
        features = datasets.Features({column: datasets.Image(), "text": datasets.Value("string")})
        rng = np.random.default_rng(0)
        for split, count in (splits or {"train": 6, "validation": 3}).items():
            arrays = [rng.integers(0, 256, (20, HUB_WIDTHS[split] + i, 3), dtype=np.uint8) for i in range(count)]
            images = [Image.fromarray(a[..., 0] if i == 0 else a) for i, a in enumerate(arrays)]
            table = datasets.Dataset.from_dict({column: images, "text": [f"caption {i}" for i in range(count)]},
                                               features=features)
            (root / "data").mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
        return root

    return write


HUB_WIDTHS = {"train": 20, "validation": 40, "test": 60}


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws fresh random inputs, but a failure can be replayed: the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
