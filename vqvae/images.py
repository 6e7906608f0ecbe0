"""Pictures the trainer writes: originals next to reconstructions, and the codebook's usage.

Drawn with Pillow alone, so they need neither matplotlib nor torchvision.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from vqvae.data import to_uint8


def reconstruction_grid(originals: torch.Tensor, recons: torch.Tensor, pairs_per_row: int = 4,
                        pad: int = 2) -> Image.Image:
    """(B, 3, H, W) pairs in [-1, 1] -> one image: each original with its reconstruction on its right."""
    a, b = to_uint8(originals), to_uint8(recons)
    n, h, w, _ = a.shape
    rows = math.ceil(n / pairs_per_row)
    cols = min(n, pairs_per_row) * 2
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, pairs_per_row)
        y = pad + r * (h + pad)
        for k, tile in enumerate((a[i], b[i])):
            x = pad + (2 * c + k) * (w + pad)
            canvas[y:y + h, x:x + w] = tile
    return Image.fromarray(canvas)


def usage_histogram(counts: torch.Tensor, threshold: float, width: int = 800, height: int = 260) -> Image.Image:
    """Codes sorted by EMA count, as bars on a log scale, with the dead-code threshold as a red line."""
    values = np.sort(counts.detach().float().cpu().numpy())[::-1]
    k = len(values)
    floor = 1e-3
    logs = np.log10(np.maximum(values, floor))
    top = max(logs.max(), math.log10(max(threshold, floor)) + 1, 0.0)
    bottom = math.log10(floor)
    margin_top, margin_bottom = 24, 6
    plot_h = height - margin_top - margin_bottom

    def y_of(log_value: float) -> int:
        return margin_top + int(round((top - log_value) / (top - bottom) * plot_h))

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for x in range(width):
        # each pixel column shows the largest count among the codes it covers
        lo, hi = x * k // width, max((x + 1) * k // width, x * k // width + 1)
        if lo >= k:
            break
        draw.line([(x, y_of(logs[lo:hi].max())), (x, height - margin_bottom)], fill=(70, 110, 180))
    if threshold > 0:
        y = y_of(math.log10(threshold))
        draw.line([(0, y), (width, y)], fill=(220, 40, 40))
    used = int((values >= max(threshold, 1e-12)).sum()) if threshold > 0 else int((values > 0).sum())
    draw.text((6, 5), f"{k} codes by EMA count (log10, {bottom:.0f}..{top:.1f});  "
                      f"above threshold {threshold:g}: {used}/{k}", fill="black")
    return image
