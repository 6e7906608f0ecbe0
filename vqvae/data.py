"""Images for training: a hub dataset, a local folder, or the photographs that scikit-image ships.

Every source is a list of images that can be loaded one at a time (``ImageSource``). A fixed permutation splits
it into training and validation images; ``ImageDataset`` turns either part into tensors in [-1, 1]: a random
square crop (side in [crop_scale, 1] x the short side), a resize to ``image_size`` and a random flip.

The randomness of a sample depends only on (seed, epoch, index), never on a worker's or the process's RNG: any
number of workers gives the same batches, and a resumed run sees the batches an uninterrupted run would have.
Batches come from ``ResumableBatchSampler``, whose order depends on (seed, epoch) and which can start part-way;
with several processes it cuts each global batch into one share per rank.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from vqvae.config import DataConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Photographs in scikit-image's package data. They are read straight from its folder, and only those present
# are used: skimage.data's loader functions fetch some images through pooch, which needs the network.
BUILTIN_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "rocket.jpg", "camera.png", "coins.png", "moon.png", "brick.png",
    "grass.png", "gravel.png", "cell.png",
)
BUILTIN_SAMPLES, BUILTIN_VAL_SAMPLES = 1024, 64
# The built-in photographs are too few to hold whole ones out (one photo would be the validation set): the last
# quarter of every photo, along its long side, is held out instead, and training crops come from the rest.
BUILTIN_VAL_SHARE = 0.25
VAL_EPOCH = -1  # the epoch number validation samples are drawn with: a fixed, separate stream


class DataError(RuntimeError):
    pass


class ImageSource:
    """A list of images, loaded by position as RGB PIL images."""

    def __init__(self, name: str, items: list, load, skipped: int = 0, cache: bool = False):
        self.name, self.items, self._load = name, items, load
        self.skipped = skipped  # files left out because they could not be read
        self.cache = {} if cache else None  # decoded images, for a source of a few photographs cropped many times

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Image.Image:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        image = to_rgb(self._load(self.items[i]))
        if self.cache is not None:
            image.load()
            self.cache[i] = image
        return image

    def describe(self, i: int) -> str:
        """Item ``i`` as a message names it, without loading it (a hub row would be decoded again)."""
        if isinstance(self.items, _HubRows):
            return f"row {self.items.positions[i]} of {self.name}"
        if isinstance(self.items[i], tuple):  # a region of a photo (split_regions)
            path, part, _ = self.items[i]
            return f"{path} ({part} region)"
        return str(self.items[i])

    def subset(self, positions) -> ImageSource:
        if isinstance(self.items, _HubRows):
            items = self.items.subset(positions)
        else:
            items = [self.items[int(p)] for p in positions]
        return ImageSource(self.name, items, self._load, self.skipped, cache=self.cache is not None)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # composite onto white: dropping alpha would expose whatever colour the transparent pixels happen to hold
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255).round().astype(np.uint8))
    return image.convert("RGB")


# ---- the three sources ----

def builtin_source() -> ImageSource:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    paths = [folder / name for name in BUILTIN_PHOTOS if (folder / name).is_file()]
    if not paths:
        raise DataError(f"none of scikit-image's photographs were found in {folder}; "
                        f"reinstall scikit-image or use data.source=folder")
    return ImageSource("builtin", [str(p) for p in paths], _open_image, cache=True)


def folder_source(path: str) -> ImageSource:
    """Every jpg/png/webp under ``path``; files that cannot be read as images are skipped and reported."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (set data.path to a folder of jpg, png or webp images)")
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    good, bad = [], []
    for p in candidates:
        (good if _readable(p) else bad).append(p)
    if bad:
        shown = ", ".join(str(p.relative_to(root)) for p in bad[:5]) + (", ..." if len(bad) > 5 else "")
        print(f"data: skipped {len(bad)} unreadable image file(s) of {len(candidates)} in {root}: {shown}",
              file=sys.stderr)
    if not good:
        raise DataError(f"no readable jpg, png or webp images under {root} ({len(bad)} unreadable)")
    return ImageSource(f"folder:{root}", [str(p) for p in good], _open_image, skipped=len(bad))


def hf_source(cfg: DataConfig, split: str | None = None) -> ImageSource:
    """A split of a hub dataset (``cfg.split`` unless given), through the ``datasets`` library (an optional
    extra), cached under ``cfg.cache_dir``. ``cfg.name`` may also be a local folder of a dataset's files (e.g.
    ``data/train-*.parquet``), which the library reads as it reads a downloaded one."""
    split = split or cfg.split
    try:
        import datasets
    except ImportError:
        raise DataError("data.source 'hf' needs the datasets library: pip install 'vqvae-triton[datasets]' "
                        "(or pip install datasets), or use data.source=folder with data.path=<image folder>") from None
    cache_dir = cfg.cache_dir or None
    online = _hub_reachable()
    try:
        with _hub_offline(not online):
            ds = datasets.load_dataset(cfg.name, split=split, cache_dir=cache_dir)
    except Exception as e:  # the datasets library raises many types here (ConnectionError, FileNotFoundError, ...)
        where = cache_dir or "the datasets cache (HF_HOME / HF_DATASETS_CACHE)"
        if online:
            raise DataError(f"could not load hub dataset '{cfg.name}' (split '{split}'): "
                            f"{type(e).__name__}: {e}") from e
        why = ("HF_HUB_OFFLINE is set" if _env_offline() else "the Hugging Face hub cannot be reached")
        raise DataError(
            f"could not load hub dataset '{cfg.name}': {why} and no cached copy "
            f"was found in {where}. Either run once where the hub is reachable (the dataset is cached for later "
            f"runs), or train on a local folder of images instead: "
            f"--data.source=folder --data.path=/path/to/images") from e
    if cfg.image_key not in ds.column_names:
        raise DataError(f"hub dataset '{cfg.name}' (split '{split}') has no column '{cfg.image_key}' "
                        f"(data.image_key); its columns are {ds.column_names}")
    ds = ds.select_columns([cfg.image_key])
    return ImageSource(f"hf:{cfg.name}:{split}", _HubRows(ds, cfg.image_key), _identity)


class _HubRows:
    """Rows of a hub dataset as a list-like of images; pickles cheaply into workers (the table is memory-mapped)."""

    def __init__(self, ds, key: str, positions=None):
        self.ds, self.key = ds, key
        self.positions = list(range(len(ds))) if positions is None else positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        value = self.ds[self.positions[i]][self.key]
        if isinstance(value, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
            import io
            value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else _open_image(value["path"])
        return value

    def subset(self, positions) -> _HubRows:
        return _HubRows(self.ds, self.key, [self.positions[int(p)] for p in positions])


def make_source(cfg: DataConfig) -> ImageSource:
    if cfg.source == "builtin":
        return builtin_source()
    if cfg.source == "folder":
        return folder_source(cfg.path)
    return hf_source(cfg)


def split_source(source: ImageSource, val_fraction: float, seed: int) -> tuple[ImageSource, ImageSource]:
    """Hold out ``val_fraction`` of the images (at least one, and at least one left to train on)."""
    n = len(source)
    if n < 2:
        raise DataError(f"{source.name} has {n} image(s); at least 2 are needed to hold one out for validation")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    # a generator of its own: the split must not depend on, or disturb, the training RNG
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return source.subset(sorted(order[n_val:])), source.subset(sorted(order[:n_val]))


def split_regions(source: ImageSource, share: float) -> tuple[ImageSource, ImageSource]:
    """Every image in both parts: its first ``1 - share`` along the long side for training, the rest for
    validation. Disjoint pixels of every image, so the validation figures cover all of their content."""
    train = ImageSource(source.name, [(p, "train", share) for p in source.items], _open_region, source.skipped,
                        cache=source.cache is not None)
    val = ImageSource(source.name, [(p, "val", share) for p in source.items], _open_region, source.skipped,
                      cache=source.cache is not None)
    return train, val


def _open_region(item) -> Image.Image:
    path, part, share = item
    with Image.open(path) as image:
        image.load()
        w, h = image.size
        cut = round((w if w >= h else h) * (1.0 - share))
        if w >= h:
            box = (0, 0, cut, h) if part == "train" else (cut, 0, w, h)
        else:
            box = (0, 0, w, cut) if part == "train" else (0, cut, w, h)
        return image.crop(box)


# ---- samples and batches ----

class ImageDataset(Dataset):
    """Crops of a source's images as float tensors (3, size, size) in [-1, 1].

    Indexed by ``(epoch, i)``, or by a plain ``i`` for ``epoch`` (the validation set's fixed VAL_EPOCH); item
    ``i`` is image ``i % len(source)``, so a dataset can be longer than its source (crops of a few photographs).
    """

    def __init__(self, source: ImageSource, image_size: int, crop_scale: float, hflip: bool, seed: int,
                 length: int = 0, epoch: int = 0):
        self.source, self.size, self.crop_scale, self.hflip, self.seed = source, image_size, crop_scale, hflip, seed
        self.length, self.epoch = length or len(source), epoch
        self.failed: set[int] = set()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key) -> torch.Tensor:
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        rng = np.random.default_rng([self.seed, epoch + 1, i])  # entries must be non-negative; VAL_EPOCH is -1
        image = self._load(i % len(self.source))
        return to_tensor(random_crop(image, self.size, self.crop_scale, self.hflip, rng))

    def _load(self, i: int) -> Image.Image:
        # A file can change on disk after the start-up check, and hub rows are not checked at all: report a bad
        # one once and use the next image, so one bad file cannot stop a run.
        for step in range(len(self.source)):
            j = (i + step) % len(self.source)
            if j in self.failed:
                continue
            try:
                image = self.source.load(j)
                image.load()
                return image
            except Exception as e:
                self.failed.add(j)
                warnings.warn(f"data: skipping unreadable image {self.source.describe(j)}: {e}")
        raise DataError(f"no image of {self.source.name} could be read")


def random_crop(image: Image.Image, size: int, crop_scale: float, hflip: bool, rng) -> Image.Image:
    w, h = image.size
    side = max(1, round(min(w, h) * rng.uniform(crop_scale, 1.0)))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = image.resize((size, size), Image.BICUBIC, box=(x, y, x + side, y + side), reducing_gap=3.0)
    if hflip and rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return crop


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 pixels, rounded: the inverse of `to_tensor` for every level (truncation would
    move 63 of the 256 levels of a round trip down by one)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, for image files."""
    return to_pixels(images).permute(0, 2, 3, 1).cpu().numpy()


class ResumableBatchSampler(Sampler):
    """Endless batches of ``(epoch, index)`` keys: a fresh permutation per epoch from (seed, epoch), whole batches
    only, starting after ``start_batch`` batches have already been drawn.

    With ``world_size`` processes, each epoch's permutation is cut into global batches of
    ``batch_size * world_size`` samples and rank ``r`` takes the ``r``-th slice of each: the ranks see disjoint
    shares of every global batch, and a batch still depends only on (seed, epoch, position), so ``start_batch``
    (counted in global batches, the same number on every rank) resumes every rank where it stopped. With one
    process this is the plain sampler.
    """

    def __init__(self, length: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        global_batch = batch_size * world_size
        if length < global_batch:
            shown = f"{batch_size}" if world_size == 1 else f"{batch_size} x {world_size} processes"
            raise DataError(f"the training set has {length} samples, fewer than one batch of {shown}; "
                            f"lower train.batch_size or raise data.samples_per_epoch")
        self.length, self.batch_size, self.seed, self.start_batch = length, batch_size, seed, start_batch
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = length // global_batch

    def __iter__(self):
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        global_batch = self.batch_size * self.world_size
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.length)
            for b in range(offset, self.batches_per_epoch):
                start = b * global_batch + self.rank * self.batch_size
                yield [(epoch, int(i)) for i in order[start:start + self.batch_size]]
            epoch, offset = epoch + 1, 0


def make_datasets(cfg: DataConfig, seed: int, augment: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """Training and validation datasets. With ``augment=False`` the training images get the validation
    treatment too (fixed crops, no flips): the deterministic views that ``vqvae.encode`` writes codes for."""
    source = make_source(cfg)
    builtin = cfg.source == "builtin"
    if builtin:
        train_src, val_src = split_regions(source, BUILTIN_VAL_SHARE)
    elif cfg.val_split:  # a hub dataset's own validation split
        train_src, val_src = source, hf_source(cfg, cfg.val_split)
    else:
        train_src, val_src = split_source(source, cfg.val_fraction, seed)
    n_train = cfg.samples_per_epoch or (BUILTIN_SAMPLES if builtin else len(train_src))
    n_val = cfg.val_samples or (BUILTIN_VAL_SAMPLES if builtin else len(val_src))
    train = ImageDataset(train_src, cfg.image_size, cfg.crop_scale, cfg.hflip and augment, seed, n_train,
                         epoch=0 if augment else VAL_EPOCH)
    val = ImageDataset(val_src, cfg.image_size, cfg.crop_scale, False, seed, n_val, epoch=VAL_EPOCH)
    return train, val


def make_loader(dataset: ImageDataset, batch_size: int, num_workers: int, seed: int = 0, start_batch: int = 0,
                train: bool = True, pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Training: endless batches from ``start_batch`` on, this rank's share of each global batch of
    ``batch_size * world_size``. Validation: one pass over the whole split, fixed crops, no flips."""
    # A generator of the loader's own: otherwise each new iterator draws its workers' base seed from torch's
    # global RNG, and a resumed run (which makes one more iterator) would drift from an uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=usable_workers(num_workers), pin_memory=pin_memory, generator=generator)
    if train:
        sampler = ResumableBatchSampler(len(dataset), batch_size, seed, start_batch, rank, world_size)
        return DataLoader(dataset, batch_sampler=sampler, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **common)


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the platform has one (taskset, a container or a
    batch scheduler can allow fewer than the machine has), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def usable_workers(requested: int) -> int:
    """``requested`` loader worker processes, at most one per available CPU: more would only take turns on the
    same cores (and torch's DataLoader warns about them). The trainer says when it lowers data.num_workers."""
    return min(requested, available_cpus())


# ---- helpers ----

def _open_image(path: str) -> Image.Image:
    """Decoded at once and the file closed, even when decoding fails: Pillow otherwise keeps it open until the
    image is collected (an "unclosed file" ResourceWarning, and one descriptor per bad file meanwhile)."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return image


def _identity(x):
    return x


def _readable(path: Path) -> bool:
    """The start-up check: is this a whole, decodable image?

    ``verify()`` reads a PNG to its end, checking every chunk's CRC, and a WebP's container sizes, so a cut or
    damaged file fails it cheaply (about 0.5 ms for a 768 px image); a full decode would cost 30 times that. For
    a JPEG it reads only the header, so a JPEG is also decoded, at 1/8 scale (``draft``): that still
    entropy-decodes every block, so truncated scan data fails, at about half a full decode's cost (1.5 ms at
    768 px, so 15 s for 10,000 photographs on one core). Any other format is decoded in full.
    """
    try:
        with open(path, "rb") as f:
            with Image.open(f) as image:
                image.verify()
                decode = image.format not in ("PNG", "WEBP")
            if decode:
                f.seek(0)
                with Image.open(f) as image:
                    image.draft(None, (1, 1))
                    image.load()
        return True
    except Exception:
        return False


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Can a TCP connection to the hub be opened? Answers in at most ``timeout`` seconds, where the datasets
    library, finding no network, retries for about half a minute before giving up."""
    if _env_offline():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct connection says nothing about a proxy: let the library try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _can_connect(endpoint.hostname, endpoint.port or 443, timeout)


@functools.cache
def _can_connect(host: str, port: int, timeout: float) -> bool:
    """Probed once per process: a dataset's training and validation splits are loaded one after the other."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Put the hub libraries in offline mode (cache only) for one call. They read HF_HUB_OFFLINE when first
    imported, so the module constants are switched too where they exist."""
    if not offline:
        yield
        return
    import importlib

    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    patched = []
    for module_name, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                              ("datasets.config", "HF_DATASETS_OFFLINE")):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
