"""rFID as tokenizer papers report it, in plain PyTorch: the FID Inception (TensorFlow's 2015-12-05 graph, which
Heusel et al.'s TTUR code, torch-fidelity and torchmetrics use) with TensorFlow 1's bilinear resize to 299 x 299,
and the Frechet distance of the two sets' Gaussians in float64.

    inception = load_inception(weights_path("rfid"))     # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    meter = FrechetMeter(inception)
    meter.update(originals_uint8, recons_uint8)           # (B, 3, H, W) uint8, any size
    meter.compute()                                       # the distance of the two sets' 2048-d pool features

The weight file keeps torchvision's Inception3 key names, and the network below keeps them too, so the file loads
strictly. Where this graph differs from torchvision's Inception3 (it is what makes FID comparable across papers):
inputs are uint8 pixels resized as TensorFlow 1's `resize_bilinear` does (no half-pixel offset, no antialiasing)
and mapped by (x - 128) / 128; batch norm uses eps 1e-3; the average pools inside the blocks ignore the padding;
the last block pools by max, not average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqvae.weights import load_strictly

INPUT_SIZE = 299
FEATURES = 2048


def resize_like_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float (B, C, H, W) to size x size as TensorFlow 1's `resize_bilinear` with
    align_corners=False: output pixel i samples input coordinate i * (in / out), clamped at the last pixel (PyTorch's
    bilinear samples (i + 0.5) * (in / out) - 0.5, and antialiases when shrinking)."""

    def taps(length: int):
        source = torch.arange(size, dtype=images.dtype, device=images.device) * (length / size)
        low = source.long()
        return low, (low + 1).clamp(max=length - 1), source - low

    rows_low, rows_high, row_frac = taps(images.shape[-2])
    cols_low, cols_high, col_frac = taps(images.shape[-1])
    top, bottom = images[..., rows_low, :], images[..., rows_high, :]
    top = top[..., cols_low] + (top[..., cols_high] - top[..., cols_low]) * col_frac
    bottom = bottom[..., cols_low] + (bottom[..., cols_high] - bottom[..., cols_low]) * col_frac
    return top + (bottom - top) * row_frac[:, None]


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


POOLS = {
    "avg": lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False),  # TF ignores the padding
    "max": lambda x: F.max_pool2d(x, 3, stride=1, padding=1),
    "max/2": lambda x: F.max_pool2d(x, 3, stride=2),
}


class Mixed(nn.Module):
    """An Inception block: branches side by side on the input, their outputs concatenated on channels.

    A branch is a list of steps: a pool name (`POOLS`), a convolution `(name, out channels, kernel, stride,
    padding)` fed by the previous step, or a list of convolutions that all take the previous step's output and whose
    outputs are concatenated (the last blocks' 1x3 / 3x1 pairs). Convolutions are registered under their names,
    which are the weight file's."""

    def __init__(self, cin: int, branches: list[list]):
        super().__init__()
        self.branches = branches
        for branch in branches:
            channels = cin
            for step in branch:
                if isinstance(step, str):
                    continue
                fork = step if isinstance(step, list) else [step]
                for name, cout, kernel, *placement in fork:
                    self.add_module(name, BasicConv2d(channels, cout, kernel, *placement))
                channels = sum(cout for _, cout, *_ in fork)

    def run(self, branch: list, x: torch.Tensor) -> torch.Tensor:
        for step in branch:
            if isinstance(step, str):
                x = POOLS[step](x)
            elif isinstance(step, list):
                x = torch.cat([getattr(self, name)(x) for name, *_ in step], dim=1)
            else:
                x = getattr(self, step[0])(x)
        return x

    def forward(self, x):
        return torch.cat([self.run(branch, x) for branch in self.branches], dim=1)


def block_a(cin, pool_features):
    return Mixed(cin, [
        [("branch1x1", 64, 1)],
        [("branch5x5_1", 48, 1), ("branch5x5_2", 64, 5, 1, 2)],
        [("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 1, 1)],
        ["avg", ("branch_pool", pool_features, 1)],
    ])


def block_b(cin):
    return Mixed(cin, [
        [("branch3x3", 384, 3, 2)],
        [("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 2)],
        ["max/2"],
    ])


def block_c(cin, c7):
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return Mixed(cin, [
        [("branch1x1", 192, 1)],
        [("branch7x7_1", c7, 1), ("branch7x7_2", c7, *row), ("branch7x7_3", 192, *col)],
        [("branch7x7dbl_1", c7, 1), ("branch7x7dbl_2", c7, *col), ("branch7x7dbl_3", c7, *row),
         ("branch7x7dbl_4", c7, *col), ("branch7x7dbl_5", 192, *row)],
        ["avg", ("branch_pool", 192, 1)],
    ])


def block_d(cin):
    return Mixed(cin, [
        [("branch3x3_1", 192, 1), ("branch3x3_2", 320, 3, 2)],
        [("branch7x7x3_1", 192, 1), ("branch7x7x3_2", 192, (1, 7), 1, (0, 3)),
         ("branch7x7x3_3", 192, (7, 1), 1, (3, 0)), ("branch7x7x3_4", 192, 3, 2)],
        ["max/2"],
    ])


def block_e(cin, pool):
    def pair(name):
        return [(f"{name}a", 384, (1, 3), 1, (0, 1)), (f"{name}b", 384, (3, 1), 1, (1, 0))]

    return Mixed(cin, [
        [("branch1x1", 320, 1)],
        [("branch3x3_1", 384, 1), pair("branch3x3_2")],
        [("branch3x3dbl_1", 448, 1), ("branch3x3dbl_2", 384, 3, 1, 1), pair("branch3x3dbl_3")],
        [pool, ("branch_pool", 192, 1)],
    ])


class FIDInception(nn.Module):
    """uint8 images (B, 3, H, W) -> their 2048-d pool features, float32."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = block_a(192, 32), block_a(256, 64), block_a(288, 64)
        self.Mixed_6a = block_b(288)
        self.Mixed_6b, self.Mixed_6c = block_c(768, 128), block_c(768, 160)
        self.Mixed_6d, self.Mixed_6e = block_c(768, 160), block_c(768, 192)
        self.Mixed_7a = block_d(768)
        self.Mixed_7b, self.Mixed_7c = block_e(1280, "avg"), block_e(2048, "max")
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the FID Inception takes uint8 RGB images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)} (round, do not truncate: `vqvae.quality.to_pixels`)")
        x = (resize_like_tf1(images.float(), INPUT_SIZE) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def load_inception(path) -> FIDInception:
    """The FID Inception with the file's weights (its 1008-way classifier `fc` is not used for FID)."""
    inception = FIDInception()
    load_strictly(inception, path, unused_prefixes=("fc.",))
    return inception.eval()


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """|m1 - m2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) in float64. tr((C1 C2)^(1/2)) is taken as the sum of the square
    roots of the eigenvalues of C1^(1/2) C2 C1^(1/2), a symmetric matrix with the eigenvalues of C1 C2: two
    symmetric eigen-decompositions, stable where C1 or C2 is singular (fewer images than features), where a general
    matrix square root returns complex noise."""
    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    values, vectors = torch.linalg.eigh(cov1)
    root1 = (vectors * _roots(values)) @ vectors.T
    middle = root1 @ cov2 @ root1
    trace_root = _roots(torch.linalg.eigvalsh((middle + middle.T) / 2)).sum()
    return float((mean1 - mean2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_root)


def _roots(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Square roots of a PSD matrix's eigenvalues, those within rounding of zero (|v| <= n eps max v) taken as zero:
    the root would turn their rounding noise (~1e-16) into errors of ~1e-8 each."""
    noise = eigenvalues.abs().max() * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > noise, eigenvalues, torch.zeros_like(eigenvalues)).sqrt()


class FeatureMoments:
    """Running float64 sums of a set's features and of their outer products: its mean and covariance."""

    def __init__(self, dim: int):
        self.count, self.sum, self.outer = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim,
                                                                                                  dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        features = features.detach().double().cpu()
        self.count += len(features)
        self.sum += features.sum(dim=0)
        self.outer += features.T @ features

    def mean_cov(self):
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.count}")
        mean = self.sum / self.count
        return mean, (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)


class FrechetMeter:
    """rFID over a split: the originals' and the reconstructions' features, their Frechet distance."""

    def __init__(self, inception: FIDInception):
        self.inception = inception
        self.reset()

    def reset(self) -> None:
        self.real, self.fake = FeatureMoments(FEATURES), FeatureMoments(FEATURES)

    @torch.no_grad()
    def update(self, originals: torch.Tensor, recons: torch.Tensor) -> None:
        self.real.add(self.inception(originals))
        self.fake.add(self.inception(recons))

    def compute(self) -> float:
        return frechet_distance(*self.real.mean_cov(), *self.fake.mean_cov())

    def to(self, device):
        self.inception.to(device)
        return self
