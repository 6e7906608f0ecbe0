"""Where a run stands and how it is picked up again: the training state in a checkpoint, the checkpoint to resume
from, whether it fits the configured model, and a trained model loaded for use.

A run folder whose newest checkpoint cannot be read (a disk filled up, a copy cut short) resumes from the newest
one that can, and says which file it skipped and why.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vqvae.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
)
from vqvae.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    validate,
)
from vqvae.model import VQVAE, build_model
from vqvae.quantizer.hub import state_mismatches
from vqvae.quantizer.metrics import CodeUsage


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint besides the model, optimizer and scheduler."""

    step: int = 0
    batches_drawn: int = 0  # micro-batches taken from the loader: where a resumed loader starts
    best_val: float = math.inf
    wandb_id: str | None = None
    world_size: int = 1  # processes of the run that wrote the checkpoint: batches_drawn counts its global batches


def save_state(path: Path, model, optimizer, scheduler, cfg: Config, progress: Progress, usage: CodeUsage,
               rng_ranks: list[dict] | None = None) -> None:
    """``model`` is the bare VQVAE, never its DDP wrapper, so the keys carry no ``module.`` prefix."""
    extra = {} if rng_ranks is None else {"rng_ranks": rng_ranks}  # every rank's RNG states, under torchrun
    save_checkpoint(path, {
        "model": model.state_dict(),  # includes the quantizer's codebook and EMA buffers
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": dataclasses.asdict(progress),
        "step": progress.step,
        "code_window_counts": usage.counts.cpu(),
        "config": config_to_dict(cfg),
        "rng": rng_state(),
        **extra,
    })


def restore_state(ckpt: dict, model, optimizer, scheduler, usage: CodeUsage) -> Progress:
    """Everything but the RNG states, which the caller sets last."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    progress = Progress(**ckpt["progress"])
    usage.step = progress.step
    if ckpt["code_window_counts"].shape == usage.counts.shape:
        usage.counts.copy_(ckpt["code_window_counts"])  # else (another train.usage_window): start empty
    return progress


def find_resume_checkpoint(cfg: Config, run_dir: Path, device, say=print) -> tuple[Path | None, dict | None]:
    """The checkpoint that `train.resume` names, loaded: (path, checkpoint), or (None, None) for a fresh run.

    "auto" and "latest" take the newest readable checkpoint in the run folder, skipping (and naming) unreadable
    ones; an explicit path must be readable."""
    mode = cfg.train.resume
    found = [path for _, path in list_checkpoints(run_dir)]
    if mode == "never":
        if found:
            raise ConfigError(f"train.resume is 'never' but {run_dir} already holds checkpoints; choose another "
                              f"train.out_dir, delete them, or resume")
        return None, None
    if mode not in ("auto", "latest"):
        path = Path(mode)
        if not path.is_file():
            raise ConfigError(f"train.resume: checkpoint not found: {path}")
        return path, load_checkpoint(path, map_location=device)
    if not found:
        if mode == "latest":
            raise ConfigError(f"--resume: no checkpoint (ckpt_*.pt) in {run_dir}")
        return None, None
    skipped = []
    for path in reversed(found):
        try:
            ckpt = load_checkpoint(path, map_location=device)
        except CheckpointError as error:
            say(f"warning: skipping {path}: {error}", file=sys.stderr)
            skipped.append(path)
            continue
        if skipped:
            say(f"resuming from {path}, the newest readable checkpoint")
        return path, ckpt
    raise CheckpointError(f"no readable checkpoint in {run_dir} (tried {', '.join(p.name for p in skipped)}): move "
                          f"them away to start afresh, or resume from a good copy with --resume PATH")


def check_resumable(ckpt: dict, model: torch.nn.Module, path: Path) -> None:
    """The checkpoint's tensors must fit the configured model (names and shapes: a health rule with state of its
    own, switched on or off, changes them); anything else may change on resuming (max_steps, the learning rate, the
    EMA decay...), though then the run no longer repeats an uninterrupted one."""
    def shapes(state: dict) -> dict:
        return {k: tuple(v.shape) for k, v in state.items()}

    problems = state_mismatches(shapes(model.state_dict()), shapes(ckpt["model"]), strict=True)
    if problems:
        raise ConfigError(f"cannot resume from {path}: its model differs from the one the config builds "
                          f"(a model.* or quantizer.* setting changed?): " + "; ".join(problems))


def load_model(path: str | Path, device: str | torch.device = "cpu",
               overrides: list[str] = ()) -> tuple[VQVAE, Config, dict]:
    """A trained model (in eval mode) and its config from a checkpoint, for encoding and tests."""
    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = config_from_dict(ckpt["config"], source=f"checkpoint {path}")
    apply_overrides(cfg, list(overrides))
    validate(cfg, source=f"checkpoint {path} (with command-line overrides)")
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt


def clean_run_dir(run_dir: Path) -> None:
    """Remove the temporary files of checkpoint writes cut short by a SIGKILL, and say what was kept."""
    removed, kept = remove_stale_temporaries(run_dir)
    if removed:
        print(f"removed {len(removed)} temporary file(s) of interrupted checkpoint writes in {run_dir}: "
              + ", ".join(p.name for p in removed))
    if kept:
        print(f"note: kept {len(kept)} temporary file(s) in {run_dir} whose writer may be alive (its process, "
              f"or one on another host): " + ", ".join(p.name for p in kept), file=sys.stderr)
