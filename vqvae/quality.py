"""How good a tokenizer is, as the field reports it: PSNR, SSIM, LPIPS and rFID of its reconstructions, and the
codebook's use, over a whole split (`score`; the trainer's `evaluate`, and the command `python -m vqvae.evaluate`).

    meter = QualityMeter(["lpips", "rfid"], device, weights={"rfid": "/path/to/inception.pth"})
    for images in loader:
        recons = ...
        meter.update(images, recons)
    figures = meter.compute()     # {"psnr": ..., "ssim": ..., "lpips": ... or "unavailable: ...", ...}

Images are (B, 3, H, W) in [-1, 1], as the data pipeline gives them.
  psnr   each image's PSNR on [0, 1] pixels, averaged over images (`psnr`);
  ssim   each image's SSIM on [0, 1] pixels (pytorch-msssim: 11-pixel Gaussian window, sigma 1.5, K = 0.01, 0.03,
         as in Wang et al. 2004), averaged over images;
  lpips  LPIPS v0.1 with the VGG16 trunk (`vqvae.lpips`), as taming-transformers, LlamaGen and SimVQ report it, on
         the float images, averaged over images;
  rfid   FID between the originals and the reconstructions with the FID Inception's 2048 pool features
         (`vqvae.fid`), on uint8 pixels rounded from the images (`vqvae.data.to_pixels`). Below 2,048 images the
         covariance is rank-deficient and the figure cannot be compared with published ones: `compute` says so next
         to it (as it is not comparable at another resolution than a paper's).
LPIPS and rFID need pretrained networks: their files are read where torch hub caches them (`torch.hub.get_dir()`
/ checkpoints) or from a path given, and LPIPS's heads from the installed torchmetrics (the `eval` extra); nothing is
downloaded here. Where a file is missing the figure is the string "unavailable: <the file it looked for>", never a
number, and the others still run; a file that is there but not the network's is an error naming the file and key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vqvae.cli import autocast_context
from vqvae.config import Config
from vqvae.data import to_pixels
from vqvae.fid import FEATURES as FID_FEATURES
from vqvae.fid import FrechetMeter, load_inception
from vqvae.lpips import HEADS_FILE, heads_file, load_lpips
from vqvae.model import VQVAE
from vqvae.quantizer.metrics import layer_code_counts, perplexity

NETWORK_METRICS = ("lpips", "rfid")
# The files torchvision and torch-fidelity load (through torch hub's cache) when asked for pretrained weights.
WEIGHT_FILES = {
    "lpips": "vgg16-397923af.pth",  # torchvision's VGG16 (IMAGENET1K_V1)
    "rfid": "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity's port of the TF FID Inception
}


def psnr(recons: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """Each image's PSNR in dB, [B], for images in [-1, 1] measured on [0, 1] pixels (so the squared error shrinks
    by 4); the reconstructions are clamped to the image range first."""
    mse01 = ((recons.clamp(-1, 1) - originals) ** 2).mean(dim=tuple(range(1, originals.ndim))) / 4
    return -10 * torch.log10(mse01.clamp_min(1e-10))


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
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels (its window), "
                         f"got {tuple(originals.shape[-2:])}")
    to01 = lambda t: (t.float().clamp(-1, 1) + 1) / 2  # noqa: E731
    return ms_ssim(to01(recons), to01(originals), data_range=1.0, size_average=False)


def weights_path(metric: str, given: str | os.PathLike | None = None) -> Path:
    """Where `metric`'s pretrained weights are read: the path given, else torch hub's cache."""
    if given:
        return Path(given)
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHT_FILES[metric]


def _load(metric: str, given, device):
    """(the network, None) or (None, why it is unavailable); a file that is there but wrong raises `WeightsError`."""
    path = weights_path(metric, given)
    if not path.is_file():
        how = "give its path" if given is None else "check the path given"
        return None, (f"unavailable: no weights file at {path} (nothing is downloaded here: put the file there, "
                      f"or {how})")
    if metric == "rfid":
        return FrechetMeter(load_inception(path)).to(device), None
    heads = heads_file()
    if heads is None:
        return None, (f"unavailable: no LPIPS heads file ({HEADS_FILE}): it ships with torchmetrics, "
                      f"pip install -e '.[eval]'")
    return load_lpips(path, heads).to(device), None


PUBLISHED_RFID = "papers report rFID over ImageNet's 50,000 validation images at 256 x 256"


def rfid_note(images: int, resolution: tuple[int, int]) -> str:
    """What an rFID figure can be compared with: the same split at the same resolution, and published figures only
    from >= 2,048 images (below, the covariance of 2,048 features is rank-deficient) at the paper's resolution."""
    where = f"over {images} images at {resolution[0]} x {resolution[1]}"
    if images < FID_FEATURES or tuple(resolution) != (256, 256):
        return f"{where}: not comparable with published rFID ({PUBLISHED_RFID}), only with runs on this split"
    return f"{where}: comparable with published rFID at this resolution if the split is theirs ({PUBLISHED_RFID})"


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
        self.images, self.resolution = 0, None
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
            self.networks["rfid"].update(to_pixels(originals), to_pixels(recons))
        for key, values in per_image.items():
            self.sums[key] += float(values.sum())
        self.images += originals.shape[0]
        self.resolution = tuple(originals.shape[-2:])
        return {k: v.detach().cpu() for k, v in per_image.items()}

    def compute(self) -> dict:
        figures = {k: v / max(self.images, 1) for k, v in self.sums.items()}
        if "rfid" in self.networks and self.images < 2:
            figures["rfid"] = f"unavailable: a covariance needs at least 2 images, got {self.images}"
        elif "rfid" in self.networks:
            figures["rfid"] = float(self.networks["rfid"].compute())
            figures["rfid_note"] = rfid_note(self.images, self.resolution)
        figures.update(self.unavailable)
        figures["images"] = self.images
        return figures


# -- scoring a split ---------------------------------------------------------------------------------------------

def recon_loss_fn(kind: str):
    return F.mse_loss if kind == "mse" else F.l1_loss


def eval_metrics(cfg: Config) -> list[str]:
    """The network metrics (LPIPS, rFID) that `train.eval_metrics` asks for."""
    return [m.strip() for m in cfg.train.eval_metrics.split(",") if m.strip()]


def quality_meter(cfg: Config, device, metrics=None) -> QualityMeter:
    weights = {"lpips": cfg.train.lpips_weights or None, "rfid": cfg.train.inception_weights or None}
    return QualityMeter(eval_metrics(cfg) if metrics is None else metrics, device, weights)


@dataclass
class Scores:
    figures: dict  # name -> float, or "unavailable: ..." for a network metric that could not run
    counts: torch.Tensor  # [layers, K]: how often each layer chose each code over the split
    sample: tuple | None = None  # the first batch's first 8 images and their reconstructions (CPU)


@torch.no_grad()
def score(model: VQVAE, loader, cfg: Config, device: torch.device, meter: QualityMeter, max_batches: int = 0,
          on_batch=None, progress=None) -> Scores:
    """Reconstruction loss, VQ loss, the meter's figures (PSNR, SSIM and what it holds), perplexity and usage over
    the split (or its first ``max_batches`` batches), per layer for residual models. ``on_batch(images, recons,
    per_image)`` sees every batch; ``progress`` (a tqdm bar) is advanced by the images of each."""
    model.eval()
    meter.reset()
    loss_fn = recon_loss_fn(cfg.train.recon_loss)
    counts = torch.zeros(cfg.quantizer.num_quantizers, cfg.quantizer.num_codes, device=device)  # per layer
    recon_sum = vq_sum = torch.zeros((), device=device)
    n, sample = 0, None
    for i, images in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        images = images.to(device, non_blocking=True)
        with autocast_context(cfg, device):
            recon, q = model(images)
        recon = recon.float()
        b = images.shape[0]
        recon_sum = recon_sum + loss_fn(recon, images) * b
        vq_sum = vq_sum + q.loss.float() * b
        per_image = meter.update(images, recon)
        # -1 marks a non-finite vector: it counts for no code
        counts += layer_code_counts(q.as_layers().indices, cfg.quantizer.num_codes)
        n += b
        if sample is None:
            sample = (images[:8].cpu(), recon[:8].cpu())
        if on_batch is not None:
            on_batch(images, recon, per_image)
        if progress is not None:
            progress.update(b)
    model.train()
    if n == 0:
        raise ValueError("the split holds no images to score")
    # over the whole split's codes at once, not an average of per-batch figures
    # (residual layers: each layer's, and their means)
    layer_perplexity = perplexity(counts)
    figures = {"recon_loss": float(recon_sum / n), "vq_loss": float(vq_sum / n), **meter.compute(),
               "perplexity": float(layer_perplexity.mean()), "usage": float((counts > 0).float().mean())}
    if len(counts) > 1:
        figures.update({f"layer{i + 1}/perplexity": float(v) for i, v in enumerate(layer_perplexity)})
        figures.update({f"layer{i + 1}/usage": float(v) for i, v in enumerate((counts > 0).float().mean(dim=1))})
    figures.update(bits_per_image(counts, grid_positions(cfg)))
    return Scores(figures, counts.cpu(), sample)


def grid_positions(cfg: Config) -> int:
    return (cfg.data.image_size // 2 ** cfg.model.num_downsamples) ** 2


def bits_per_image(counts: torch.Tensor, positions: int) -> dict:
    """The codes' size per image: log2 K x positions x layers as stored, and the codes' empirical entropy (of each
    layer's distribution over the split) x positions, summed over layers: what an ideal entropy coder would need."""
    layers, num_codes = counts.shape
    probs = counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)
    entropy = -(probs * torch.log2(probs.clamp(min=1e-30))).sum(dim=1)  # bits per position, per layer
    return {"bits_per_image": math.log2(num_codes) * positions * layers,
            "entropy_bits_per_image": float(entropy.sum()) * positions}


def evaluate(model: VQVAE, loader, cfg: Config, device: torch.device, max_batches: int = 0,
             meter: QualityMeter | None = None) -> tuple[dict, tuple]:
    """The trainer's evaluation: the numeric figures of `score` (a network metric that cannot run is left out;
    `quality_meter(cfg).unavailable` says why) and the first batch with its reconstruction, for the grid."""
    scores = score(model, loader, cfg, device, meter or quality_meter(cfg, device), max_batches)
    return {k: v for k, v in scores.figures.items() if isinstance(v, (int, float))}, scores.sample
