"""Scoring a model on the validation split: the same figures whichever quantizer it has."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqvae.cli import autocast_context
from vqvae.config import Config
from vqvae.metrics import layer_code_counts, perplexity, psnr
from vqvae.model import VQVAE


def recon_loss_fn(kind: str):
    return F.mse_loss if kind == "mse" else F.l1_loss


@torch.no_grad()
def evaluate(model: VQVAE, loader, cfg: Config, device: torch.device, max_batches: int = 0) -> tuple[dict, tuple]:
    """Reconstruction loss, PSNR, VQ loss, perplexity and usage over the validation split (or its first
    ``max_batches`` batches). Also returns the first batch and its reconstruction, for the grid."""
    model.eval()
    loss_fn = recon_loss_fn(cfg.train.recon_loss)
    counts = torch.zeros(cfg.quantizer.num_quantizers, cfg.quantizer.num_codes, device=device)  # per layer
    recon_sum = vq_sum = psnr_sum = torch.zeros((), device=device)
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
        psnr_sum = psnr_sum + psnr(recon, images).sum()
        # -1 marks a non-finite vector: it counts for no code
        counts += layer_code_counts(q.as_layers().indices, cfg.quantizer.num_codes)
        n += b
        if sample is None:
            sample = (images[:8].cpu(), recon[:8].cpu())
    model.train()
    # over the whole split's codes at once, not an average of per-batch figures
    # (residual layers: each layer's, and their means)
    layer_perplexity = perplexity(counts)
    metrics = {"recon_loss": recon_sum / n, "vq_loss": vq_sum / n, "psnr": psnr_sum / n,
               "perplexity": layer_perplexity.mean(), "usage": (counts > 0).float().mean()}
    if len(counts) > 1:
        metrics.update({f"layer{i + 1}/perplexity": value for i, value in enumerate(layer_perplexity)})
    return {k: float(v) for k, v in metrics.items()}, sample
