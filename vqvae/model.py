"""The VQ-VAE: a convolutional encoder, the vector quantizer, and a mirrored decoder.

With the seed configuration a 3 x 128 x 128 image becomes a 32 x 32 grid of indices into 4096 codes of 256
dimensions (two stride-2 stages), and the decoder turns a code grid back into an image. The layout follows the
original VQ-VAE (van den Oord et al., 2017): strided 4x4 convolutions, a stack of ReLU residual blocks, and no
normalisation layers.

With `quantizer.num_quantizers` > 1 the quantizer is a `ResidualVectorQuantizer` and every code grid gains a
trailing layer axis. `VQVAE.save_pretrained(folder)` / `VQVAE.from_pretrained(folder or repo id)` write and read the
weights (model.safetensors) with the configuration beside them (config.json): see `vqvae.quantizer.hub`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from vqvae.config import Config, config_from_dict, quantizer_options
from vqvae.quantizer import QuantizerOutput, VectorQuantizer
from vqvae.quantizer.hub import HubMixin
from vqvae.quantizer.residual import ResidualQuantizerOutput, ResidualVectorQuantizer


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class ResidualStack(nn.Module):
    def __init__(self, channels: int, hidden: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(channels, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return torch.relu(x)


def stage_widths(hidden: int, num_downsamples: int) -> list[int]:
    """Channel widths after each stride-2 stage, doubling up to ``hidden``: [64, 128] for (128, 2)."""
    return [hidden // 2 ** (num_downsamples - 1 - i) for i in range(num_downsamples)]


class Encoder(nn.Module):
    def __init__(self, in_channels: int, hidden: int, num_downsamples: int, res_layers: int, res_hidden: int):
        super().__init__()
        layers, width = [], in_channels
        for i, out in enumerate(stage_widths(hidden, num_downsamples)):
            layers.append(nn.Conv2d(width, out, 4, stride=2, padding=1))
            if i < num_downsamples - 1:
                layers.append(nn.ReLU())
            width = out
        layers.append(nn.Conv2d(width, hidden, 3, padding=1))
        self.net = nn.Sequential(*layers, ResidualStack(hidden, res_hidden, res_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, dim: int, out_channels: int, hidden: int, num_downsamples: int, res_layers: int,
                 res_hidden: int):
        super().__init__()
        layers = [nn.Conv2d(dim, hidden, 3, padding=1), ResidualStack(hidden, res_hidden, res_layers)]
        widths = stage_widths(hidden, num_downsamples)[::-1][1:] + [out_channels]
        width = hidden
        for i, out in enumerate(widths):
            layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
            if i < num_downsamples - 1:
                layers.append(nn.ReLU())
            width = out
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VQVAE(nn.Module, HubMixin):
    def __init__(self, config: Config):
        super().__init__()
        self.config = cfg = config  # config.json of save_pretrained
        m = cfg.model
        self.encoder = Encoder(m.in_channels, m.hidden_channels, m.num_downsamples, m.residual_layers,
                               m.residual_hidden)
        self.pre_quant = nn.Conv2d(m.hidden_channels, m.embedding_dim, 1)
        self.quantizer = build_quantizer(cfg)
        self.decoder = Decoder(m.embedding_dim, m.in_channels, m.hidden_channels, m.num_downsamples,
                               m.residual_layers, m.residual_hidden)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput | ResidualQuantizerOutput]:
        """images (B, C, H, W) in [-1, 1] -> (reconstruction (B, C, H, W), the quantizer's outputs).

        In training mode this moves EMA codes (learned codes move with the optimizer); in eval mode it does not.
        """
        q = self.quantizer(self.pre_quant(self.encoder(images)))
        return self.decoder(q.quantized), q

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> code grid (B, H / 2**n, W / 2**n) int64, with a trailing layer axis
        (..., num_quantizers) for residual layers. Never moves the codebook."""
        was_training = self.quantizer.training
        self.quantizer.eval()
        try:
            return self.quantizer(self.pre_quant(self.encoder(images))).indices
        finally:
            self.quantizer.train(was_training)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """code grid (B, h, w) int64 -> images (B, C, h * 2**n, w * 2**n), roughly in [-1, 1]. With residual
        layers the grid is (B, h, w, l): the codes of the first l layers, any l up to num_quantizers."""
        z = self.quantizer.decode(codes).permute(0, 3, 1, 2)
        dtype = next(self.decoder.parameters()).dtype
        return self.decoder(z.to(dtype).contiguous())

    @classmethod
    def _constructor_arguments(cls, kwargs: dict, config_file: str) -> dict:
        # config.json holds the Config as plain JSON: back to the dataclass, validated, errors naming the file.
        if isinstance(kwargs.get("config"), dict):
            kwargs = {**kwargs, "config": config_from_dict(kwargs["config"], source=str(config_file))}
        return kwargs


def build_quantizer(cfg: Config) -> VectorQuantizer | ResidualVectorQuantizer:
    """One VectorQuantizer (num_quantizers = 1), or a stack of num_quantizers residual layers of it."""
    if cfg.quantizer.num_quantizers == 1:
        return VectorQuantizer(**quantizer_kwargs(cfg))
    stack = dataclasses.asdict(quantizer_options(cfg.quantizer)[1])
    return ResidualVectorQuantizer(**stack, **quantizer_kwargs(cfg))


def quantizer_kwargs(cfg: Config) -> dict:
    """VectorQuantizer's arguments in a VQ-VAE built from ``cfg``: the config's options, at the model's width."""
    options = quantizer_options(cfg.quantizer)[0]
    # The layout said, not guessed: a 16 x 16 grid of 16-d codes would be ambiguous.
    return {**options.as_dict(), "dim": cfg.model.embedding_dim, "layout": "channels_first"}


def build_model(cfg: Config) -> VQVAE:
    return VQVAE(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
