"""Judge tokenizers as the field does, side by side: PSNR, SSIM, LPIPS, rFID and codebook use over a whole split.

    python -m vqvae.evaluate --checkpoint runs/quickstart/best.pt runs/quickstart_rvq/best.pt --out runs/eval
    python -m vqvae.evaluate --checkpoint runs/a/best.pt someone/vqvae-b --out runs/eval --split train
    python -m vqvae.evaluate --checkpoint runs/a/best.pt --out runs/eval --inception-weights ~/w/inception.pth

Each ``--checkpoint`` is a checkpoint file written by the trainer, a folder written by ``save_pretrained`` (or
``python -m vqvae.export``), or the Hub id of such a folder, as ``vqvae.encode`` takes them; its data is the one its
config names (deterministic views: fixed crops, no flips), and ``--data.key=value`` overrides it for every model.
The figures (vqvae/quality.py says how each is computed; vqvae/lpips.py and vqvae/fid.py hold the two networks):
    psnr, ssim, lpips, rfid    reconstruction quality; LPIPS and rFID need pretrained weights (--lpips-weights,
                               --inception-weights, or torch hub's cache): "unavailable: <the file it looked for>"
                               where they are absent; rFID is comparable with published figures only over >= 2,048
                               images at the paper's resolution (the table says so below it)
    usage, perplexity          of the codes over the whole split (per layer for residual models)
    bits_per_image             log2 K x positions x layers: the codes as stored
    entropy_bits_per_image     the codes' empirical entropy x positions, summed over layers
Writes into ``--out``: metrics.json (every figure of every checkpoint), table.md (one column per checkpoint),
worst_<n>.png (each checkpoint's worst reconstructions, by LPIPS where it ran, else by MSE: original | reconstruction)
and usage_<n>.png (its codes sorted by use over the split, log scale), n = the checkpoint's place on the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vqvae.checkpoint import CheckpointError
from vqvae.cli import parse_overrides, pick_device
from vqvae.config import ConfigError
from vqvae.data import DataError, make_datasets, make_loader
from vqvae.encode import load_tokenizer
from vqvae.images import reconstruction_grid, usage_histogram
from vqvae.quality import NETWORK_METRICS, QualityMeter, score
from vqvae.quantizer.hub import PretrainedError
from vqvae.weights import WeightsError

ROWS = [  # (figure, label, format) of the table, in its order
    ("images", "images", "{:.0f}"), ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
    ("lpips", "LPIPS (VGG)", "{:.4f}"), ("rfid", "rFID", "{:.2f}"), ("usage", "codes used", "{:.1%}"),
    ("perplexity", "perplexity", "{:.1f}"), ("bits_per_image", "bits per image", "{:.0f}"),
    ("entropy_bits_per_image", "entropy bits per image", "{:.0f}"), ("recon_loss", "reconstruction loss", "{:.5f}"),
]


class WorstImages:
    """The `count` images of a split with the highest score (LPIPS, else MSE), with their reconstructions."""

    def __init__(self, count: int, key: str):
        self.count, self.key = count, key
        self.scores = torch.empty(0)
        self.originals = self.recons = None

    def __call__(self, images, recons, per_image):
        scores = torch.cat([self.scores, per_image[self.key]])
        originals = images.cpu() if self.originals is None else torch.cat([self.originals, images.cpu()])
        recons = recons.cpu() if self.recons is None else torch.cat([self.recons, recons.cpu()])
        keep = scores.topk(min(self.count, len(scores))).indices
        self.scores, self.originals, self.recons = scores[keep], originals[keep], recons[keep]


def evaluate_checkpoint(source: str, meter: QualityMeter, split: str, batch_size: int, device,
                        overrides: list[str], worst: int):
    """(figures, worst images, per-code counts [layers, K]) of one tokenizer over its split."""
    model, cfg, step = load_tokenizer(source, device, overrides)
    train_set, val_set = make_datasets(cfg.data, cfg.train.seed, augment=False)
    dataset = val_set if split == "val" else train_set
    loader = make_loader(dataset, batch_size, cfg.data.num_workers, train=False)
    tracker = WorstImages(worst, "lpips" if "lpips" in meter.networks else "mse")
    with tqdm(total=len(dataset), desc=Path(source).name if Path(source).exists() else source, unit="img",
              leave=False) as bar:
        scores = score(model, loader, cfg, device, meter, on_batch=tracker, progress=bar)
    figures = {"checkpoint": str(source), "step": step, "split": split, "num_codes": cfg.quantizer.num_codes,
               "num_quantizers": cfg.quantizer.num_quantizers, "worst_by": tracker.key, **scores.figures}
    return figures, tracker, scores.counts


def markdown_table(results: list[dict]) -> str:
    """One column per checkpoint; a figure that could not be computed reads "unavailable", with why below."""
    layers = max(r["num_quantizers"] for r in results)
    rows = ROWS + [(f"layer{i}/{k}", f"layer {i} {label}", fmt) for i in range(1, layers + 1) if layers > 1
                   for k, label, fmt in (("usage", "codes used", "{:.1%}"), ("perplexity", "perplexity", "{:.1f}"))]
    lines = ["| | " + " | ".join(f"{i + 1}: `{r['checkpoint']}`" for i, r in enumerate(results)) + " |",
             "| --- |" + " ---: |" * len(results)]
    notes = {}
    for key, label, fmt in rows:
        cells = []
        for r in results:
            value = r.get(key)
            if isinstance(value, str):
                notes[f"{label}: {value}"] = None
                value = "unavailable"
            cells.append("-" if value is None else value if isinstance(value, str) else fmt.format(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes.update({f"{i + 1}: {r['rfid_note']}": None for i, r in enumerate(results) if "rfid_note" in r})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def evaluate(checkpoints: list[str], out_dir: Path, split: str = "val", batch_size: int = 32, device: str = "auto",
             overrides: list[str] = (), lpips_weights=None, inception_weights=None, worst: int = 8) -> list[dict]:
    device = pick_device(device)
    for source in checkpoints:  # every name checked before any is scored
        if source.endswith(".pt") and not Path(source).is_file():
            raise CheckpointError(f"checkpoint not found: {source}")
    meter = QualityMeter(NETWORK_METRICS, device, {"lpips": lpips_weights, "rfid": inception_weights})
    for metric, why in meter.unavailable.items():
        print(f"{metric}: {why}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for n, source in enumerate(checkpoints, start=1):
        figures, tracker, counts = evaluate_checkpoint(source, meter, split, batch_size, device, list(overrides),
                                                       worst)
        reconstruction_grid(tracker.originals, tracker.recons).save(out_dir / f"worst_{n}.png")
        usage_histogram(counts.flatten(), 0.0).save(out_dir / f"usage_{n}.png")
        results.append(figures)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "table.md").write_text(markdown_table(results))
    print(markdown_table(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vqvae.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog="Data keys of each checkpoint's config can be overridden as "
                                            "--data.key=value or --set data.key=value.")
    parser.add_argument("--checkpoint", required=True, nargs="+",
                        help="checkpoints written by vqvae.train, folders written by save_pretrained (or "
                             "vqvae.export), or Hub repo ids of such folders")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--lpips-weights", default=None, help="torchvision's VGG16 weights (vgg16-397923af.pth)")
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity's FID Inception weights (weights-inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--worst", type=int, default=8, help="worst reconstructions shown per checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args, rest = parser.parse_known_args(argv)
    overrides = list(args.set) + parse_overrides(parser, rest)
    try:
        evaluate(args.checkpoint, Path(args.out), args.split, args.batch_size, args.device, overrides,
                 args.lpips_weights, args.inception_weights, args.worst)
    except (ConfigError, DataError, CheckpointError, PretrainedError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
