"""How good a tokenizer's reconstructions are, as the field reports it: PSNR, SSIM, LPIPS and rFID over a split.

    meter = QualityMeter(["lpips", "rfid"], device, weights={"rfid": "/path/to/inception.pth"})
    for images in loader:
        recons = ...
        meter.update(images, recons)
    figures = meter.compute()     # {"psnr": ..., "ssim": ..., "lpips": ... or "unavailable: ...", ...}

Images are (B, 3, H, W) in [-1, 1], as the data pipeline gives them.
  psnr   each image's PSNR on [0, 1] pixels, averaged over images (`vqvae.metrics.psnr`, as the trainer has always
         reported it, so recorded figures stay comparable);
  ssim   each image's SSIM on [0, 1] pixels (pytorch-msssim: 11-pixel Gaussian window, sigma 1.5, K = 0.01, 0.03,
         as in Wang et al. 2004), averaged over images;
  lpips  LPIPS with the VGG network (torchmetrics' port of Zhang et al.'s weights, as taming-transformers and
         LlamaGen report it), averaged over images;
  rfid   FID between the originals and the reconstructions with torch-fidelity's Inception (as torchmetrics uses
         it), 2048 features. Below 2,048 images the covariance is rank-deficient and the figure cannot be compared
         with published ones: `compute` says so next to it.
LPIPS and rFID need pretrained networks. They are read where their libraries cache them (torch hub's
`checkpoints/` folder: `torch.hub.get_dir()`) or from a path given; nothing is downloaded here. Where the weights or
the libraries are missing the figure is the string "unavailable: <why>", never a number, and the others still run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from vqvae.metrics import psnr

NETWORK_METRICS = ("lpips", "rfid")
# The files their libraries load (through torch.hub's cache) when asked for pretrained weights.
WEIGHT_FILES = {
    "lpips": "vgg16-397923af.pth",  # torchvision's VGG16 (IMAGENET1K_V1); the LPIPS heads ship with torchmetrics
    "rfid": "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity's port of the TF FID Inception
}
FID_FEATURES = 2048


def require_ssim() -> None:
    """Fail when the meter is made (before training starts), not at the first evaluation a thousand steps in."""
    try:
        import pytorch_msssim  # noqa: F401, PLC0415
    except ImportError as error:
        raise ModuleNotFoundError("SSIM, which every evaluation reports, needs pytorch-msssim, a dependency of this "
                                  "project: pip install pytorch-msssim (or pip install -e .)") from error


def ssim(recons: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """Each image's SSIM, [B], on [0, 1] pixels (reconstructions clamped to the image range first)."""
    from pytorch_msssim import ssim as ms_ssim  # noqa: PLC0415

    side = min(originals.shape[-2:])
    if side < 11:
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels (its window), got {tuple(originals.shape[-2:])}")
    to01 = lambda t: (t.float().clamp(-1, 1) + 1) / 2  # noqa: E731
    return ms_ssim(to01(recons), to01(originals), data_range=1.0, size_average=False)


def weights_path(metric: str, given: str | os.PathLike | None = None) -> Path:
    """Where `metric`'s pretrained weights are read: the path given, else its library's cache."""
    if given:
        return Path(given)
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHT_FILES[metric]


@contextlib.contextmanager
def _hub_cache_holding(name: str, path: Path):
    """torch.hub's cache pointed, for the block, at a folder where `name` is `path`: libraries that only load
    weights through the cache then read the file given."""
    if path == Path(torch.hub.get_dir()) / "checkpoints" / name:
        yield
        return
    saved = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "checkpoints").mkdir()
        (Path(folder) / "checkpoints" / name).symlink_to(path.resolve())
        torch.hub.set_dir(folder)
        try:
            yield
        finally:
            torch.hub.set_dir(saved)


def _lpips_network(path: Path, device):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity  # noqa: PLC0415

    with _hub_cache_holding(WEIGHT_FILES["lpips"], path):
        metric = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False)
    return metric.net.to(device).eval()  # the network itself: one distance per image pair


def _fid_metric(path: Path, device):
    from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: PLC0415

    return FrechetInceptionDistance(feature=FID_FEATURES, normalize=True,
                                    feature_extractor_weights_path=str(path)).to(device)


def _load(metric: str, given, device):
    """(the network, None) or (None, why it is unavailable)."""
    path = weights_path(metric, given)
    if not path.is_file():
        how = "give its path" if given is None else "check the path given"
        return None, (f"unavailable: no weights file at {path} (nothing is downloaded here: put the file there, "
                      f"or {how})")
    try:
        return (_lpips_network if metric == "lpips" else _fid_metric)(path, device), None
    except ImportError as e:
        return None, f"unavailable: {e} (pip install -e '.[eval]')"
    except Exception as e:  # a file that is not the network's weights
        return None, f"unavailable: could not load {path}: {type(e).__name__}: {e}"


class QualityMeter:
    """Sums of the per-image figures over a split (and rFID's feature statistics), then their means."""

    def __init__(self, metrics=(), device="cpu", weights: dict | None = None):
        unknown = set(metrics) - set(NETWORK_METRICS)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {NETWORK_METRICS}")
        require_ssim()
        weights = weights or {}
        self.networks, self.unavailable = {}, {}
        for metric in metrics:
            network, why = _load(metric, weights.get(metric), device)
            if network is None:
                self.unavailable[metric] = why
            else:
                self.networks[metric] = network
        self.reset()

    def reset(self) -> None:
        self.sums = {"psnr": 0.0, "ssim": 0.0, "mse": 0.0, **{m: 0.0 for m in self.networks if m != "rfid"}}
        self.images = 0
        if "rfid" in self.networks:
            self.networks["rfid"].reset()

    @torch.no_grad()
    def update(self, originals: torch.Tensor, recons: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add a batch; returns its per-image figures ([B] each, on the CPU): mse, psnr, ssim and lpips."""
        recons = recons.float().clamp(-1, 1)
        originals = originals.float()
        per_image = {"mse": ((recons - originals) ** 2).flatten(1).mean(dim=1), "psnr": psnr(recons, originals),
                     "ssim": ssim(recons, originals)}
        if "lpips" in self.networks:
            per_image["lpips"] = self.networks["lpips"](recons, originals).reshape(-1)
        if "rfid" in self.networks:
            fid = self.networks["rfid"]
            fid.update((originals + 1) / 2, real=True)
            fid.update((recons + 1) / 2, real=False)
        for key, values in per_image.items():
            self.sums[key] += float(values.sum())
        self.images += originals.shape[0]
        return {k: v.detach().cpu() for k, v in per_image.items()}

    def compute(self) -> dict:
        figures = {k: v / max(self.images, 1) for k, v in self.sums.items()}
        if "rfid" in self.networks:
            figures["rfid"] = float(self.networks["rfid"].compute())
            if self.images < FID_FEATURES:
                figures["rfid_note"] = (f"over {self.images} images, fewer than Inception's {FID_FEATURES} features: "
                                        f"not comparable with published rFID")
        figures.update(self.unavailable)
        figures["images"] = self.images
        return figures
