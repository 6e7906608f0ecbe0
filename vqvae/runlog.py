"""The run's log: the progress bar's line, metrics.jsonl in the run folder, Weights & Biases (imported lazily, off
when `wandb.mode` is "disabled" or the package is absent), the collapse warning and the closing summary.

Rank 0 alone logs under torchrun: the other ranks have no metrics file and no W&B run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from vqvae.config import Config, config_to_dict

COLLAPSE_PERPLEXITY = 50.0  # the seed's line: below it the codebook has collapsed


def start_wandb(cfg: Config, run_dir: Path, run_id: str | None):
    if cfg.wandb.mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: logging to metrics.jsonl only (pip install wandb, or set "
              "wandb.mode=disabled to silence this)", file=sys.stderr)
        return None
    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity or None,
                      name=cfg.wandb.name or run_dir.name, dir=str(run_dir), mode=cfg.wandb.mode,
                      config=config_to_dict(cfg), id=run_id, resume="allow" if run_id else None,
                      settings=wandb.Settings(console="off", silent=True))


def open_metrics(run_dir: Path, step: int):
    """metrics.jsonl for appending, first dropping any lines past ``step``: those of steps a crashed run took
    after its last checkpoint, which the resumed run is about to take again."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _logged_step(line) <= step]
        if len(kept) != len(lines):
            path.write_text("".join(kept))
    return open(path, "a")


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a crash: drop it


def log(metrics_file, run, step: int, values: dict, images: dict | None = None) -> None:
    """Rank 0 only: the other ranks have no metrics file and no W&B run."""
    metrics_file.write(json.dumps({"step": step, **values}) + "\n")
    metrics_file.flush()
    if run is not None:
        payload = dict(values)
        if images:
            import wandb
            payload.update({k: wandb.Image(v) for k, v in images.items()})
        run.log(payload, step=step)


def postfix(values: dict) -> str:
    return (f"recon {values['recon_loss']:.4f} vq {values['vq_loss']:.4f} ppl {values['perplexity']:.0f} "
            f"(window {values['window_perplexity']:.0f}) used {values['window_usage']:.0%} "
            f"dead {values['dead_codes']:.0f} lr {values['lr']:.1e} {values['images_per_sec']:.0f} img/s")


class CollapseWatch:
    """A warning line when the training perplexity falls under ``threshold`` (the seed's collapse line), and a
    line when it recovers: once per crossing, not every step."""

    def __init__(self, threshold: float = COLLAPSE_PERPLEXITY):
        self.threshold, self.collapsed = threshold, False

    def check(self, step: int, values: dict) -> str | None:
        ppl = values["perplexity"]
        if ppl < self.threshold and not self.collapsed:
            self.collapsed = True
            return (f"warning: step {step}: training perplexity {ppl:.1f} < {self.threshold:g}: the codebook is "
                    f"collapsing onto a few codes ({values['dead_codes']:.0f} dead, window perplexity "
                    f"{values['window_perplexity']:.0f}); see docs/codebook-health.md")
        if ppl >= self.threshold and self.collapsed:
            self.collapsed = False
            return f"step {step}: training perplexity back above {self.threshold:g} ({ppl:.1f})"
        return None


def print_summary(s: dict) -> None:
    if not s["steps"]:
        print(f"nothing to do: the run in {s['run_dir']} is already at step {s['final_step']} "
              f"(raise train.max_steps to continue it, or choose another train.out_dir)")
        return
    print(f"done: {s['steps']} steps to step {s['final_step']} in {s['seconds']:.0f} s; train recon loss "
          f"{s['first_recon_loss']:.4f} -> {s['last_recon_loss']:.4f} (mean of the last 20 steps)")
    if s["val"]:
        v = s["val"]
        print(f"validation: recon {v['recon_loss']:.4f}  psnr {v['psnr']:.2f} dB  perplexity {v['perplexity']:.1f}  "
              f"usage {v['usage']:.0%}")
    print("wrote: " + ", ".join(s["files"][-4:]) + (f", W&B run under {s['wandb_dir']}" if s["wandb_dir"] else ""))
    if s["wandb_dir"] and s["wandb_mode"] == "offline":
        print(f"upload the offline W&B run with: wandb sync {s['wandb_dir']}/offline-run-*")
