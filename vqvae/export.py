"""Turn a training checkpoint into a pretrained folder, the form in which tokenizers are shared on the Hub.

    python -m vqvae.export --checkpoint runs/quickstart/best.pt --out runs/quickstart/pretrained

writes into ``--out`` (by `VQVAE.save_pretrained`): ``model.safetensors`` (the weights, with the quantizer's
codebook and EMA state), ``config.json`` (the checkpoint's configuration) and ``README.md`` (a model card). Load it
with ``VQVAE.from_pretrained("runs/quickstart/pretrained")``, encode with it
(``python -m vqvae.encode --checkpoint runs/quickstart/pretrained ...``), or upload it with
``hf upload <repo_id> runs/quickstart/pretrained`` or ``model.push_to_hub("<repo_id>")``.
The optimizer, scheduler and RNG states of the checkpoint are left behind: they matter only for resuming training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vqvae.checkpoint import CheckpointError
from vqvae.config import ConfigError
from vqvae.resume import load_model


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's model as a pretrained folder; returns the folder."""
    model, _, ckpt = load_model(checkpoint, "cpu")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    print(f"{checkpoint} (step {ckpt['step']}) -> {out_dir}: "
          + ", ".join(sorted(p.name for p in out_dir.iterdir())))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vqvae.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by vqvae.train (e.g. best.pt)")
    parser.add_argument("--out", required=True, help="the pretrained folder to write")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
