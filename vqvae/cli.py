"""What the command-line tools share: the device, autocast, and `--section.key=value` overrides."""

from __future__ import annotations

import argparse
import contextlib

import torch

from vqvae.config import Config, ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available (use train.device=cpu or auto)")
    return torch.device(name)


def autocast_context(cfg: Config, device: torch.device):
    """bf16 autocast for the convolutions on CUDA; the quantizer keeps its codebook maths in fp32 itself."""
    if device.type == "cuda" and cfg.train.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parse_overrides(parser: argparse.ArgumentParser, tokens: list[str]) -> list[str]:
    """``--section.key=value`` or ``--section.key value`` tokens -> ``section.key=value`` strings."""
    overrides, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or "." not in token.split("=")[0]:
            parser.error(f"unrecognized argument: {token}")
        if "=" in token:
            overrides.append(token[2:])
        elif i + 1 < len(tokens):
            overrides.append(f"{token[2:]}={tokens[i + 1]}")
            i += 1
        else:
            parser.error(f"{token} needs a value")
        i += 1
    return overrides
