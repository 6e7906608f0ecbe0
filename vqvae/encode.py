"""Turn a dataset into code grids with a trained VQ-VAE, for a downstream prior model, and write reconstructions.

    python -m vqvae.encode --checkpoint runs/quickstart/best.pt --out runs/quickstart/codes
    python -m vqvae.encode --checkpoint runs/naruto/best.pt --out codes/naruto --split all --data.num_workers=8
    python -m vqvae.encode --checkpoint runs/quickstart/pretrained --out runs/quickstart/codes   # save_pretrained's
    python -m vqvae.encode --checkpoint someone/vqvae-quickstart --out codes/hub                  # a Hub repo id

``--checkpoint`` takes a checkpoint file written by the trainer, a folder written by ``save_pretrained`` (or
``python -m vqvae.export``), or the id of such a folder on the Hugging Face Hub. Writes into ``--out``:
    codes_<split>.npy   (N, h, w) code indices (uint16 when the codebook has at most 65536 codes, else int32);
                        (N, h, w, L) with L residual layers (quantizer.num_quantizers): layer l's codes at [..., l]
    meta.json           where the codes came from: checkpoint, step, codebook size, grid shape, data, counts (with
                        residual layers: the codes used per layer, and the reconstructions' PSNR from the first
                        1, 2, ..., L layers)
    recon_<split>/      the first ``--num-recon`` images and their reconstructions *from the codes alone*, side
                        by side (original | reconstruction), as PNG files, and a grid of them

The images are deterministic views of the checkpoint's data config (fixed crops, no flips; for the built-in
photographs, data.samples_per_epoch / data.val_samples crops); any data key can be overridden, e.g.
``--data.source=folder --data.path=my_images``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae.checkpoint import CheckpointError
from vqvae.cli import autocast_context, parse_overrides, pick_device
from vqvae.config import ConfigError, apply_overrides, config_to_dict, validate
from vqvae.data import DataError, make_datasets, make_loader, to_uint8
from vqvae.images import reconstruction_grid
from vqvae.model import VQVAE
from vqvae.quality import psnr
from vqvae.quantizer.hub import PretrainedError
from vqvae.resume import load_model


def encode_split(model, dataset, cfg, device, batch_size: int, num_recon: int):
    """(codes (N, h, w) int64 on the CPU, the first num_recon originals, their reconstructions from codes)."""
    loader = make_loader(dataset, batch_size, cfg.data.num_workers, train=False)
    codes, originals, recons = [], [], []
    kept = 0
    for images in loader:
        images = images.to(device)
        with autocast_context(cfg, device):
            grid = model.encode(images)
            if kept < num_recon:
                take = min(num_recon - kept, images.shape[0])
                recons.append(model.decode(grid[:take]).float().cpu())
                originals.append(images[:take].cpu())
                kept += take
        codes.append(grid.cpu())
    empty = torch.empty(0)
    return (torch.cat(codes), torch.cat(originals) if originals else empty, torch.cat(recons) if recons else empty)


def psnr_db(recons: torch.Tensor, originals: torch.Tensor) -> float:
    """Mean PSNR of images in [-1, 1], on [0, 1] pixels (`vqvae.quantizer.metrics.psnr`)."""
    return float(psnr(recons, originals).mean())


@torch.no_grad()
def psnr_by_layers(model, codes: torch.Tensor, originals: torch.Tensor, device) -> list[float]:
    """Residual layers: the PSNR of the images decoded from the codes of the first 1, 2, ..., L layers."""
    grids = codes[:len(originals)].to(device)
    return [psnr_db(model.decode(grids[..., :layers]).float().cpu(), originals)
            for layers in range(1, codes.shape[-1] + 1)]


def write_outputs(out_dir: Path, split: str, codes: torch.Tensor, originals, recons, num_codes: int) -> dict:
    dtype = np.uint16 if num_codes <= 2 ** 16 else np.int32
    np.save(out_dir / f"codes_{split}.npy", codes.numpy().astype(dtype))
    recon_dir = out_dir / f"recon_{split}"
    recon_dir.mkdir(exist_ok=True)
    if len(originals):
        for i, (a, b) in enumerate(zip(to_uint8(originals), to_uint8(recons))):
            Image.fromarray(np.concatenate([a, b], axis=1)).save(recon_dir / f"{i:05d}.png")
        reconstruction_grid(originals[:16], recons[:16]).save(out_dir / f"recon_{split}.png")
        psnr = psnr_db(recons, originals)
    else:
        psnr = float("nan")
    return {"count": len(codes), "file": f"codes_{split}.npy", "dtype": np.dtype(dtype).name,
            "recon_psnr_db": psnr, "codes_used": codes_used(codes, codes.ndim == 4)}


def codes_used(codes: torch.Tensor, layered: bool) -> int | list[int]:
    """Distinct codes in the grids; with residual layers, per layer."""
    if not layered:
        return int(torch.unique(codes).numel())
    return [int(torch.unique(codes[..., layer]).numel()) for layer in range(codes.shape[-1])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vqvae.encode", description=__doc__.split("\n\n")[0],
                                     epilog="Data keys of the checkpoint's config can be overridden as "
                                            "--data.key=value or --set data.key=value.")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint written by vqvae.train (e.g. best.pt), a folder written by save_pretrained "
                             "(or vqvae.export), or the Hub repo id of one")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", choices=("train", "val", "all"), default="val")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-recon", type=int, default=16, help="reconstructions to write per split")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args, rest = parser.parse_known_args(argv)
    overrides = list(args.set) + parse_overrides(parser, rest)
    try:
        encode(Path(args.checkpoint), Path(args.out), args.split, args.batch_size, args.num_recon, args.device,
               overrides)
    except (ConfigError, DataError, CheckpointError, PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def load_tokenizer(source: str | Path, device, overrides: list[str] = ()):
    """(model in eval mode, its config, the training step or None) from a checkpoint file, a pretrained folder or
    a Hub repo id. Overrides of a pretrained model's config may change its data and train keys, not its shapes."""
    if Path(source).is_file() or Path(source).suffix == ".pt":  # (a missing .pt file: "checkpoint not found")
        model, cfg, ckpt = load_model(source, device, overrides)
        return model, cfg, ckpt["step"]
    model = VQVAE.from_pretrained(str(source), map_location=str(device))
    cfg = copy.deepcopy(model.config)
    apply_overrides(cfg, list(overrides))
    validate(cfg, source=f"{source} (with command-line overrides)")
    for section in ("model", "quantizer"):
        if config_to_dict(cfg)[section] != config_to_dict(model.config)[section]:
            raise ConfigError(f"{section}.* cannot be overridden for the pretrained model {source}: its weights "
                              f"were trained with the {section} section of its config.json")
    return model, cfg, None


def encode(checkpoint: Path, out_dir: Path, split: str = "val", batch_size: int = 64, num_recon: int = 16,
           device: str = "auto", overrides: list[str] = ()) -> dict:
    device = pick_device(device)
    model, cfg, step = load_tokenizer(checkpoint, device, overrides)
    datasets = dict(zip(("train", "val"), make_datasets(cfg.data, cfg.train.seed, augment=False)))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(checkpoint), "step": step, "num_codes": cfg.quantizer.num_codes,
            "num_quantizers": cfg.quantizer.num_quantizers,
            "grid": [cfg.data.image_size // 2 ** cfg.model.num_downsamples] * 2, "image_size": cfg.data.image_size,
            "data": {"source": cfg.data.source, "name": cfg.data.name, "path": cfg.data.path}, "splits": {}}
    for name in (("train", "val") if split == "all" else (split,)):
        codes, originals, recons = encode_split(model, datasets[name], cfg, device, batch_size, num_recon)
        meta["splits"][name] = write_outputs(out_dir, name, codes, originals, recons, cfg.quantizer.num_codes)
        s = meta["splits"][name]
        if cfg.quantizer.num_quantizers > 1 and len(originals):
            s["recon_psnr_db_by_layers"] = psnr_by_layers(model, codes, originals, device)
        print(f"{name}: {s['count']} crops of {len(datasets[name].source)} image(s) -> {out_dir / s['file']} "
              f"{tuple(codes.shape)} {s['dtype']}; "
              f"{s['codes_used']} distinct codes; reconstructions from codes {s['recon_psnr_db']:.2f} dB PSNR "
              f"-> {out_dir / f'recon_{name}'}")
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


if __name__ == "__main__":
    main()
