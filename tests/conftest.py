"""Test-wide setup.

Triton kernels can only run on the CPU through Triton's interpreter, and the interpreter is chosen when a module
defining a ``@triton.jit`` kernel is imported, so the switch has to be thrown here, before any test imports
``kernels``.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vqvae.config import Config  # noqa: E402

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


# A valid value other than the default for every YAML key (cosine needs affine_reparam off; the stack's options
# need layers), so that a key the config drops or the model ignores shows up as the default coming back.
CHANGED_OPTIONS = {
    "num_codes": 32, "decay": 0.9, "eps": 1e-4, "commitment_weight": 0.5, "backend": "torch", "precision": "fast",
    "deterministic": True, "init": "kmeans++", "kmeans_init_iters": 3, "ema_warmup": False, "ema_warmup_steps": 50,
    "ema_warmup_min_rows": 8, "fit_weight_steps": 4, "affine_reparam": False, "dead_code_threshold": 0.5,
    "dead_code_memory": 10, "restart_count": 2.0, "restart_draws": "uniform", "codebook_dim": 8, "cosine": True,
    "learning": "simvq", "codebook_weight": 0.5, "rotation_trick": True,
    "num_quantizers": 2, "shared_codebook": True, "layer_dropout": True, "min_layers": 2,
}


@pytest.fixture
def changed_options() -> dict:
    """A valid value other than the default for every quantizer option that is a YAML key."""
    return dict(CHANGED_OPTIONS)


# -- the search's correctness: nearest within a justified tolerance (tests/kernels) ----------------------------

def _fp16_operand(v, amax):
    """v rounded as the kernels round their operands: scaled by the power of two that puts amax in [2**13, 2**14),
    rounded to fp16, scaled back (in fp64)."""
    scale = torch.exp2(14.0 - torch.frexp(amax.float()).exponent.double())
    return (v * scale).half().double() / scale


def _score_error_bound(x, codebook, precision):
    """Per row: max over codes of |score computed as the kernel does - exact score| (from fp64)."""
    x64, c64 = x.double(), codebook.double()
    center = c64.mean(0)
    xc, cc = x64 - center, c64 - center
    exact = (cc * cc).sum(1)[None, :] - 2 * xc @ cc.T
    if precision == "fast":
        xc, cc = _fp16_operand(xc, xc.abs().amax(1, keepdim=True)), _fp16_operand(cc, cc.abs().amax())
        approx = (c64 - center).square().sum(1)[None, :] - 2 * xc @ cc.T
    else:
        xc32, cc32 = xc.float(), cc.float()
        approx = ((cc32 * cc32).sum(1)[None, :] - 2 * xc32 @ cc32.T).double()
    return (approx - exact).abs().amax(dim=1)


def _assert_nearest(x, codebook, indices, sq_dist, precision):
    d64 = torch.cdist(x.double(), codebook.double()).square()
    assert indices.dtype == torch.int64 and sq_dist.dtype == torch.float32
    assert ((indices >= 0) & (indices < codebook.shape[0])).all(), "index out of range"
    chosen = d64.gather(1, indices[:, None]).squeeze(1)
    excess = chosen - d64.min(dim=1).values
    # 2x: the chosen and the true nearest code can each be off by the bound; 2x again for accumulation order.
    tolerance = 4 * _score_error_bound(x, codebook, precision) + 1e-9
    worst = (excess - tolerance).argmax()
    assert (excess <= tolerance).all(), f"row {worst}: {excess[worst]:.3g} farther than nearest, tol {tolerance[worst]:.3g}"
    # The reported distance is the chosen code's, computed directly in fp32.
    torch.testing.assert_close(sq_dist.double(), chosen, rtol=1e-5, atol=1e-5)


@pytest.fixture
def assert_nearest():
    """assert_nearest(x, codebook, indices, sq_dist, precision): each chosen code is a nearest one, within twice
    the worst score error the same arithmetic makes in plain PyTorch (fp32 scores for "exact", the fp16-rounded
    operands' for "fast"), and the reported distance is the chosen code's."""
    return _assert_nearest


# -- tiny training runs (tests of the application) ----------------------------------------------------------------

def _tiny_config(out_dir: Path, **train_overrides) -> Config:
    cfg = Config()
    cfg.data.source, cfg.data.image_size, cfg.data.crop_scale = "builtin", 32, 0.3
    cfg.data.samples_per_epoch, cfg.data.val_samples, cfg.data.num_workers = 64, 8, 0
    cfg.model.hidden_channels, cfg.model.residual_layers, cfg.model.residual_hidden = 16, 1, 8
    cfg.model.embedding_dim, cfg.quantizer.num_codes = 16, 64
    cfg.quantizer.decay = 0.9  # a short run: unused codes must die (and be re-seeded) within a few steps
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 3e-3, 3e-4, 2
    cfg.train.out_dir, cfg.train.batch_size, cfg.train.max_steps = str(out_dir), 8, 10
    cfg.train.eval_every = cfg.train.ckpt_every = 1000
    cfg.wandb.mode = "disabled"
    for key, value in train_overrides.items():
        setattr(cfg.train, key, value)
    return cfg


def _read_metrics(run_dir: Path, prefix: str = "train/") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.startswith(prefix) for k in r)]


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(out_dir, **train_overrides): a Config that trains a tiny VQ-VAE on the built-in images in seconds
    (W&B off, no loader workers)."""
    return _tiny_config


@pytest.fixture(scope="session")
def read_metrics():
    """read_metrics(run_dir, prefix="train/"): the rows of the run's metrics.jsonl that hold keys with the prefix."""
    return _read_metrics


# -- quantizers in a known state ----------------------------------------------------------------------------------

def _fixed_start(quantizer, seed: int = 0):
    """The same trained state everywhere (taken over, past its warm-up: `Codebook.take_over_`), so that runs differ
    only in how the data reaches the codebook."""
    k, d = quantizer.num_codes, quantizer.codebook.dim
    codes = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    quantizer.codebook.take_over_({"codes": codes, "cluster_size": torch.full((k,), 3.0), "embed_sum": codes * 3.0,
                                   "initialized": torch.tensor(True)})
    return quantizer


@pytest.fixture(scope="session")
def fixed_start():
    """fixed_start(quantizer, seed=0): the quantizer with a trained state drawn from the seed (see _fixed_start)."""
    return _fixed_start


def _train_a_few_steps(module, x, steps: int = 3):
    """A few training forwards, so that the state is no longer the constructor's; returns the module in eval."""
    module.train()
    for _ in range(steps):
        module(x + 0.1 * torch.randn_like(x))
    return module.eval()


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="session")
def train_a_few_steps():
    return _train_a_few_steps


@pytest.fixture(scope="session")
def assert_same_state():
    """assert_same_state(a, b): the two modules' state dicts hold the same keys and bit-identical tensors."""
    return _assert_same_state


# -- the reference implementations of LPIPS and the FID Inception, and stand-in weight files ------------------------

# The releases the parity tests hold our networks to, pinned by hash; their wheels are fetched by the tests
# (pip download, no dependencies: neither is installed, since both import torchvision).
REFERENCE_WHEELS = {
    "lpips": ("lpips==0.1.4", "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e"),
    "torch_fidelity": ("torch-fidelity==0.4.0", "99f4c610ea16972628eceb26afb0008e528da2d44123db947b408750efbd35d4"),
}
REFERENCE_CACHE = Path(os.environ.get("VQVAE_TEST_CACHE", Path.home() / ".cache" / "vqvae-triton-tests"))


def _reference_wheel(package: str) -> Path:
    """The folder holding the package's sources, from its wheel (fetched once into REFERENCE_CACHE). A fetch that
    fails fails the test under CI (the environment variable CI set) and skips it elsewhere, saying why."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    requirement, sha256 = REFERENCE_WHEELS[package]
    folder = REFERENCE_CACHE / f"{requirement.replace('==', '-')}-{sha256[:12]}"
    if (folder / package / "__init__.py").is_file():
        return folder
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "requirements.txt").write_text(f"{requirement} --hash=sha256:{sha256}\n")
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
             "-r", str(Path(scratch) / "requirements.txt"), "-d", scratch],
            capture_output=True, text=True, timeout=300, check=False)
        wheels = list(Path(scratch).glob("*.whl"))
        if fetched.returncode != 0 or len(wheels) != 1:
            why = (f"could not fetch the reference {requirement} (pip download exit {fetched.returncode}): "
                   f"{fetched.stderr.strip()[-400:]}")
            (pytest.fail if os.environ.get("CI") else pytest.skip)(why)
        # extracted beside the cache, then renamed into it: an interrupted run leaves no half-written package
        REFERENCE_CACHE.mkdir(parents=True, exist_ok=True)
        unpacked = Path(tempfile.mkdtemp(dir=REFERENCE_CACHE))
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(unpacked)
        if folder.exists():  # an earlier run's, incomplete
            shutil.rmtree(folder)
        os.replace(unpacked, folder)
    return folder


def _stand_in_vgg16(requires_grad=False, pretrained=True):
    """What lpips.pretrained_networks.vgg16 gives LPIPS, built here without torchvision: torchvision's VGG16
    `features` (3 x 3 convolutions with ReLUs, 2 x 2 max pools) cut after relu1_2, relu2_2, relu3_3, relu4_3 and
    relu5_3, each module at its torchvision index (`load_vgg_features` fills them)."""
    from collections import namedtuple  # noqa: PLC0415

    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    modules, channels = [], 3
    for width in plan:
        if width == "M":
            modules.append(torch.nn.MaxPool2d(2, 2))
        else:
            modules += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU(inplace=False)]
            channels = width

    class StandInVGG16(torch.nn.Module):
        cuts = (4, 9, 16, 23, 30)

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(modules)

        def forward(self, x):
            outputs, start = [], 0
            for cut in self.cuts:
                for module in self.layers[start:cut]:
                    x = module(x)
                outputs.append(x)
                start = cut
            return namedtuple("VggOutputs", ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"])(*outputs)

        def load_vgg_features(self, state):
            self.layers.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                         if k.startswith("features.")})

    return StandInVGG16().requires_grad_(requires_grad)


@pytest.fixture(scope="module")
def reference_lpips():
    """lpips 0.1.4's own package (lpips/__init__.py, lpips.py, trainer.py) with only its pretrained_networks module
    stood in (`_stand_in_vgg16`); loaded under its own name for the test module and then removed (other packages
    probe for lpips and torch_fidelity)."""
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415

    root = _reference_wheel("lpips") / "lpips"
    saved = {name: sys.modules.get(name) for name in ("lpips", "lpips.pretrained_networks", "lpips.lpips",
                                                       "lpips.trainer")}
    networks = types.ModuleType("lpips.pretrained_networks")
    networks.vgg16 = _stand_in_vgg16
    sys.modules["lpips.pretrained_networks"] = networks
    spec = importlib.util.spec_from_file_location("lpips", root / "__init__.py", submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["lpips"] = package
    spec.loader.exec_module(package)
    yield package
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


@pytest.fixture(scope="module")
def reference_inception_module():
    """torch-fidelity 0.4.0's feature_extractor_inceptionv3 module, imported under a stub parent package (its
    package __init__ imports the CLIP, VGG and DINOv2 extractors, which import torchvision)."""
    import importlib  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415

    root = _reference_wheel("torch_fidelity") / "torch_fidelity"
    names = [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]
    saved = {name: sys.modules.pop(name) for name in names}
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = [str(root)]
    sys.modules["torch_fidelity"] = stub
    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    yield module
    for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def _random_vgg16_file(path: Path) -> Path:
    """A file laid out as torchvision's vgg16-397923af.pth (features and classifier), random weights scaled so that
    activations keep their size through the 13 convolutions."""
    from vqvae.lpips import vgg16_trunk  # noqa: PLC0415

    state = {}
    for key, value in vgg16_trunk().state_dict().items():
        fan_in = value[0].numel() if value.ndim == 4 else 1
        state[f"features.{key}"] = (torch.randn_like(value) * (2 / fan_in) ** 0.5 if value.ndim == 4
                                    else 0.01 * torch.randn_like(value))
    for index, (cin, cout) in {0: (25088, 64), 3: (64, 64), 6: (64, 1000)}.items():  # small: never read
        state[f"classifier.{index}.weight"], state[f"classifier.{index}.bias"] = torch.randn(cout, cin), torch.zeros(
            cout)
    torch.save(state, path)
    return path


def _random_inception_file(path: Path) -> Path:
    """A file laid out as torch-fidelity's weights-inception-2015-12-05-6726825d.pth, random weights whose batch
    norms hold the statistics of one batch of random images, so that features stay of order one at every depth."""
    from vqvae.fid import FIDInception  # noqa: PLC0415

    network = FIDInception()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # the running statistics become the calibration batch's
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        network.train()(torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8))
    state = network.state_dict()
    state["fc.weight"], state["fc.bias"] = 0.01 * torch.randn(1008, 2048), torch.zeros(1008)
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def stand_in_weights(tmp_path_factory):
    """{"lpips": VGG16 file, "rfid": Inception file}: random weights in the published files' layouts."""
    folder = tmp_path_factory.mktemp("stand_in_weights")
    return {"lpips": _random_vgg16_file(folder / "vgg16-397923af.pth"),
            "rfid": _random_inception_file(folder / "weights-inception-2015-12-05-6726825d.pth")}
