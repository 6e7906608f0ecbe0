"""Scoring a model on a split: the same figures whichever quantizer it has, for the trainer and `vqvae.evaluate`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqvae.cli import autocast_context
from vqvae.config import Config
from vqvae.metrics import layer_code_counts, perplexity
from vqvae.model import VQVAE
from vqvae.quality import QualityMeter


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
