"""LPIPS with the VGG16 trunk (Zhang et al. 2018, v0.1), the perceptual distance taming-transformers, LlamaGen and
SimVQ report, in plain PyTorch (no torchvision, whose PyPI wheels do not load with a CPU build of torch).

    lpips = load_lpips(weights_path("lpips"), heads_file())      # both files read strictly
    distance = lpips(recons, originals)                            # [B], images in [-1, 1]

The distance: both images through LPIPS's input scaling and VGG16's convolutions up to relu5_3; at five ReLUs
(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) each position's feature vector is scaled to unit length, the squared
difference of the two images' vectors is weighted per channel by a learned head (a 1 x 1 convolution to one
channel) and averaged over positions; the five averages are summed.

Two files, as the reference code reads them:
- the trunk: torchvision's ImageNet VGG16, `vgg16-397923af.pth` (keys `features.{0,2,5,...,28}.{weight,bias}`; its
  classifier is not used), from torch hub's cache or a path given;
- the heads: LPIPS v0.1's `vgg.pth` (keys `lin{0..4}.model.1.weight`, shape (1, C, 1, 1); BSD-2-licensed), which
  the `lpips` and `torchmetrics` wheels both ship, byte-identical. It is read from whichever is installed (the
  `eval` extra installs torchmetrics), located through the package metadata so that neither is imported.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vqvae.weights import check_keys, load_strictly, read_state

# torchvision's vgg16().features up to relu5_3: a number is a 3 x 3 convolution (padding 1) and its ReLU, "M" a
# 2 x 2 max pool; the module indices, and so the weight file's keys, follow this order.
VGG16_TRUNK = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # the module indices of relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS v0.1's input scaling: images in [-1, 1] shifted and scaled towards ImageNet's statistics
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
HEADS_FILE = "vgg.pth"
HEADS_IN_PACKAGES = (  # (distribution, the heads file inside it)
    ("torchmetrics", "torchmetrics/functional/image/lpips_models/vgg.pth"),
    ("lpips", "lpips/weights/v0.1/vgg.pth"),
)


def vgg16_trunk() -> nn.Sequential:
    layers, channels = [], 3
    for spec in VGG16_TRUNK:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, spec, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = spec
    return nn.Sequential(*layers)


def unit_length(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each position's channel vector divided by its length (LPIPS adds eps to the length, not inside the root)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = vgg16_trunk()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        for i, channels in enumerate(TAP_CHANNELS):
            self.register_buffer(f"head{i}", torch.zeros(1, channels, 1, 1))
        self.requires_grad_(False)

    def tapped(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, taps = (images - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(unit_length(x))
        return taps

    def forward(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """The distance of each image to its counterpart, [B]; images (B, 3, H, W) in [-1, 1]."""
        if images.shape != others.shape or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"LPIPS compares two batches of RGB images (B, 3, H, W) of one shape, got "
                             f"{tuple(images.shape)} and {tuple(others.shape)}")
        distance = 0
        for i, (a, b) in enumerate(zip(self.tapped(images), self.tapped(others))):
            distance = distance + F.conv2d((a - b) ** 2, getattr(self, f"head{i}")).mean(dim=(2, 3))
        return distance.reshape(-1)


def heads_file() -> Path | None:
    """LPIPS's VGG heads as an installed package ships them, or None."""
    for distribution, inside in HEADS_IN_PACKAGES:
        try:
            path = Path(metadata.distribution(distribution).locate_file(inside))
        except metadata.PackageNotFoundError:
            continue
        if path.is_file():
            return path
    return None


def load_heads(lpips: LPIPS, path) -> None:
    state = read_state(path)
    names = {f"lin{i}.model.1.weight": f"head{i}" for i in range(len(TAP_CHANNELS))}
    check_keys(state, {name: getattr(lpips, ours).shape for name, ours in names.items()}, path)
    for name, ours in names.items():
        getattr(lpips, ours).copy_(state[name])


def load_lpips(trunk_path, heads_path) -> LPIPS:
    """LPIPS-VGG with the trunk's and the heads' files (keys and shapes checked; `vqvae.weights`)."""
    lpips = LPIPS()
    load_strictly(lpips.features, trunk_path, unused_prefixes=("classifier.",), prefix="features.")
    load_heads(lpips, heads_path)
    return lpips.eval()
