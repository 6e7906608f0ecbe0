"""Train the VQ-VAE.

    python -m vqvae.train --config config/vqvae_quickstart.yaml
    python -m vqvae.train --config config/vqvae_naruto.yaml --train.max_steps=50000 --set wandb.mode=online
    python -m vqvae.train --config config/vqvae_naruto.yaml --resume            # continue the run in train.out_dir
    python -m vqvae.train --config config/vqvae_naruto.yaml --resume runs/naruto/ckpt_0004000.pt
    torchrun --nproc_per_node=4 -m vqvae.train --config config/vqvae_naruto.yaml   # data-parallel, 4 processes

Every step logs the reconstruction loss, the VQ (commitment) loss, perplexity, codebook usage, the learning
rate and images per second to a progress bar, to ``metrics.jsonl`` in the run folder and to Weights & Biases
(offline by default). Every ``train.eval_every`` steps the validation split is scored and a grid of originals
next to their reconstructions is written; every ``train.ckpt_every`` steps a checkpoint is written.

A run folder that already holds checkpoints is resumed from the newest (``train.resume=auto``). A resumed run
gives the same losses as an uninterrupted one: the checkpoint holds the RNG states, and the batches depend only
on (seed, epoch, position), so the loader restarts at the next unseen batch.

Under torchrun (RANK and WORLD_SIZE set) every process runs this trainer: DistributedDataParallel all-reduces
the gradients, each rank takes its own share of every global batch (``train.batch_size`` is per rank), and the
quantizer all-reduces its codebook statistics itself, so every rank keeps the same codebook. Rank 0 alone
prints, logs, evaluates and writes grids and checkpoints; a resumed run loads the same checkpoint on every rank.
Without those variables nothing of this runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vqvae.checkpoint import (BEST_NAME, CheckpointError, checkpoint_path, latest_checkpoint, list_checkpoints,
                              load_checkpoint, prune_checkpoints, remove_stale_temporaries, rng_state,
                              save_checkpoint)
from vqvae.config import (Config, ConfigError, apply_overrides, config_from_dict, config_to_dict, config_to_yaml,
                          load_config, validate)
from vqvae.data import DataError, available_cpus, make_datasets, make_loader, usable_workers
from vqvae.distributed import (Processes, barrier, gather_rng_states, main_process_first, mean_over_ranks, restore_rng,
                               start_processes, stop_processes, wrap_model)
from vqvae.images import reconstruction_grid, usage_histogram
from vqvae.model import VQVAE, build_model, count_parameters
from vqvae.quantizer import perplexity
from vqvae.residual import ResidualQuantizerOutput, ResidualVectorQuantizerEMA, layer_code_counts


COLLAPSE_PERPLEXITY = 50.0  # the seed's line: below it the codebook has collapsed

# ---- setup ----

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


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # decay the conv weights only, as usual: biases gain nothing from it. The codebook is a buffer (EMA), so
    # the optimizer never touches it.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=fused)


class WarmupCosine:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to min_lr / lr at max_steps.

    A class rather than a lambda so that LambdaLR's state_dict records its numbers.
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float):
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    factor = WarmupCosine(cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr / cfg.optim.lr
                          if cfg.optim.lr > 0 else 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resume_path(cfg: Config, run_dir: Path) -> Path | None:
    mode = cfg.train.resume
    if mode == "never":
        if list_checkpoints(run_dir):
            raise ConfigError(f"train.resume is 'never' but {run_dir} already holds checkpoints; choose another "
                              f"train.out_dir, delete them, or resume")
        return None
    if mode in ("auto", "latest"):
        path = latest_checkpoint(run_dir)
        if path is None and mode == "latest":
            raise ConfigError(f"--resume: no checkpoint (ckpt_*.pt) in {run_dir}")
        return path
    path = Path(mode)
    if not path.is_file():
        raise ConfigError(f"train.resume: checkpoint not found: {path}")
    return path


def check_resumable(saved: dict, cfg: Config, path: Path) -> None:
    """The model's shapes must match the checkpoint's; anything else may change on resuming (max_steps, the
    learning rate, the EMA decay...), though then the run no longer repeats an uninterrupted one."""
    ours, theirs = config_to_dict(cfg), config_to_dict(config_from_dict(saved, source=f"checkpoint {path}",
                                                                        check=False))
    keys = [("model", key) for key in ours["model"]] + [("quantizer", "num_codes")]
    keys += [("quantizer", "num_quantizers"), ("quantizer", "shared_codebook")]
    for section, key in keys:
        if ours[section][key] != theirs[section][key]:
            raise ConfigError(f"cannot resume from {path}: {section}.{key} is {ours[section][key]!r} in the config "
                              f"but {theirs[section][key]!r} in the checkpoint")


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


# ---- one step, evaluation ----

def recon_loss_fn(kind: str):
    return F.mse_loss if kind == "mse" else F.l1_loss


def train_step(model: VQVAE, batches, optimizer, scheduler, cfg: Config, device: torch.device,
               usage: CodeUsage) -> dict[str, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches.

    The quantizer's EMA sees each micro-batch once: with accumulation, inside ``quantizer.accumulate()``, which
    sums the micro-batches' statistics and moves the codebook once at the end, as for one large batch (so every
    micro-batch is quantized against the same codebook, and ``quantizer.decay`` keeps its per-step meaning).

    With ``model`` wrapped in DistributedDataParallel, the micro-batches before the last run under ``no_sync()``
    (their gradients only add up locally), so the gradients are all-reduced once per step.
    """
    ddp = isinstance(model, DistributedDataParallel)
    net = model.module if ddp else model
    model.train()
    loss_fn = recon_loss_fn(cfg.train.recon_loss)
    accum = cfg.train.grad_accum
    totals = torch.zeros(4, device=device)  # recon, vq, perplexity, batch usage (means over residual layers)
    layers = None  # residual layers: each one's vq loss and perplexity
    with net.quantizer.accumulate() if accum > 1 else contextlib.nullcontext() as ema_step:
        for i in range(accum):
            images = next(batches).to(device, non_blocking=True)
            with model.no_sync() if ddp and i < accum - 1 else contextlib.nullcontext():
                with autocast_context(cfg, device):
                    recon, q = model(images)
                recon_loss = loss_fn(recon.float(), images)
                ((recon_loss + q.loss.float()) / accum).backward()
            totals += torch.stack([recon_loss.detach(), q.loss.detach().float(), q.perplexity.float().mean(),
                                   q.usage.float().mean()]) / accum
            if isinstance(q, ResidualQuantizerOutput):
                figures = torch.stack([q.losses.detach().float(), q.perplexity.float()]) / accum
                layers = figures if layers is None else layers + figures
            usage.update(usage_codes(q.indices, cfg))
    if ddp:
        # every rank's codes count, so the window figures (and the copy in checkpoints) are the global ones
        dist.all_reduce(usage.counts[usage.step % usage.window])
    if cfg.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    else:
        grad_norm = torch.zeros((), device=device)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    dead = q.dead_codes if accum == 1 else ema_step.dead_codes
    return {"recon_loss": totals[0], "vq_loss": totals[1], "perplexity": totals[2], "usage": totals[3],
            "window_perplexity": usage.perplexity(), "window_usage": usage.fraction(),
            "dead_codes": dead_code_total(dead, cfg), "grad_norm": grad_norm, **layer_metrics(layers, dead)}


# ---- residual layers in the metrics ----

def layer_metrics(layers: torch.Tensor | None, dead: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each residual layer's figures, `layer<l>/...` from 1 (none for a single quantizer): vq loss and perplexity
    (stacked [2, L], means over the micro-batches) and dead codes."""
    if layers is None:
        return {}
    metrics = {}
    for i in range(layers.shape[1]):
        metrics.update({f"layer{i + 1}/vq_loss": layers[0, i], f"layer{i + 1}/perplexity": layers[1, i],
                        f"layer{i + 1}/dead_codes": dead[i]})
    return metrics


def dead_code_total(dead: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Dead codes over all the codebooks. Residual layers report theirs per layer; layers sharing one codebook
    each report that codebook's, so it is counted once."""
    if dead.ndim == 0:
        return dead
    return dead[0] if cfg.quantizer.shared_codebook else dead.sum()


def counted_codes(cfg: Config) -> int:
    """Bins of the usage window: residual layers' codes count apart (layer l's code k is bin l * K + k), so the
    window's usage is the fraction of all the layers' codes in use."""
    return cfg.quantizer.num_codes * cfg.quantizer.num_quantizers


def usage_codes(indices: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The usage window's bins of a batch's codes (see counted_codes); -1 (no code) stays -1."""
    if cfg.quantizer.num_quantizers == 1:
        return indices
    offsets = torch.arange(indices.shape[-1], device=indices.device) * cfg.quantizer.num_codes
    return torch.where(indices >= 0, indices + offsets, -1)


def ema_counts(quantizer) -> torch.Tensor:
    """Every code's recent EMA count (what the dead threshold is read against), for the usage chart: residual
    layers' codebooks one after another."""
    if isinstance(quantizer, ResidualVectorQuantizerEMA):
        return torch.cat([layer.recent_count for layer in quantizer.layers])
    return quantizer.recent_count


class CodeUsage:
    """How often each code was chosen in each of the last ``window`` steps (a ring of per-step counts on the
    device), for the windowed figures: the perplexity and the fraction of codes used over the window.

    The batch perplexity of one step can hide a slow collapse (or exaggerate one bad batch); the windowed one, over
    ``window`` x batch vectors, is the codebook's usage as a downstream model will see it.
    """

    def __init__(self, num_codes: int, window: int, device: torch.device):
        self.num_codes, self.window, self.step = num_codes, window, 0
        self.counts = torch.zeros(window, num_codes, dtype=torch.int64, device=device)

    def update(self, indices: torch.Tensor) -> None:
        """Add a micro-batch's codes to the current step (-1, a non-finite vector, counts for no code)."""
        flat = indices.reshape(-1)
        bins = torch.where(flat >= 0, flat, self.num_codes)  # an extra, dropped bin: no host sync to filter
        step_counts = torch.zeros(self.num_codes + 1, dtype=torch.int64, device=flat.device)
        step_counts.index_add_(0, bins, torch.ones_like(bins))
        self.counts[self.step % self.window] += step_counts[:self.num_codes]

    def advance(self) -> None:
        self.step += 1
        self.counts[self.step % self.window].zero_()

    def totals(self) -> torch.Tensor:
        return self.counts.sum(dim=0)

    def fraction(self) -> torch.Tensor:
        return (self.totals() > 0).float().mean()

    def perplexity(self) -> torch.Tensor:
        return perplexity(self.totals().float())


@torch.no_grad()
def evaluate(model: VQVAE, loader, cfg: Config, device: torch.device, max_batches: int = 0) -> tuple[dict, tuple]:
    """Reconstruction loss, PSNR, VQ loss, perplexity and usage over the validation split (or its first
    ``max_batches`` batches). Also returns the first batch and its reconstruction, for the grid."""
    model.eval()
    loss_fn = recon_loss_fn(cfg.train.recon_loss)
    counts = torch.zeros(cfg.quantizer.num_quantizers, cfg.quantizer.num_codes, device=device)  # per layer
    recon_sum = vq_sum = psnr_sum = torch.zeros((), device=device)
    n, sample = 0, None
    for i, images in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        images = images.to(device, non_blocking=True)
        with autocast_context(cfg, device):
            recon, q = model(images)
        recon = recon.float()
        b = images.shape[0]
        recon_sum = recon_sum + loss_fn(recon, images) * b
        vq_sum = vq_sum + q.loss.float() * b
        # PSNR on [0, 1] pixels: the images span [-1, 1], so the squared error shrinks by 4
        mse01 = ((recon.clamp(-1, 1) - images) ** 2).mean(dim=(1, 2, 3)) / 4
        psnr_sum = psnr_sum + (-10 * torch.log10(mse01.clamp_min(1e-10))).sum()
        # -1 marks a non-finite vector: it counts for no code
        layer_axis = q.indices if isinstance(q, ResidualQuantizerOutput) else q.indices[..., None]
        counts += layer_code_counts(layer_axis, cfg.quantizer.num_codes)
        n += b
        if sample is None:
            sample = (images[:8].cpu(), recon[:8].cpu())
    model.train()
    # over the whole split's codes at once, not an average of per-batch figures
    # (residual layers: each layer's, and their means)
    layer_perplexity = torch.stack([perplexity(layer_counts) for layer_counts in counts])
    metrics = {"recon_loss": recon_sum / n, "vq_loss": vq_sum / n, "psnr": psnr_sum / n,
               "perplexity": layer_perplexity.mean(), "usage": (counts > 0).float().mean()}
    if len(counts) > 1:
        metrics.update({f"layer{i + 1}/perplexity": value for i, value in enumerate(layer_perplexity)})
    return {k: float(v) for k, v in metrics.items()}, sample


# ---- checkpoints ----

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
    if ckpt.get("code_window_counts") is not None and ckpt["code_window_counts"].shape == usage.counts.shape:
        usage.counts.copy_(ckpt["code_window_counts"])  # else (an older checkpoint, another window): start empty
    return progress


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


# ---- logging ----

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


def evaluate_and_log(model, val_loader, cfg: Config, device, run_dir: Path, step: int, metrics_file, run,
                     bar) -> tuple[dict, Path]:
    """Score the validation split, write the reconstruction grid and the codebook-usage chart, log all three."""
    metrics, sample = evaluate(model, val_loader, cfg, device, cfg.train.eval_batches)
    grid = reconstruction_grid(*sample)
    grid_path = run_dir / f"recon_{step:07d}.png"
    grid.save(grid_path)
    hist = usage_histogram(ema_counts(model.quantizer), cfg.quantizer.dead_code_threshold)
    hist.save(run_dir / f"usage_{step:07d}.png")  # in the run folder too: W&B may be off or never synced
    log(metrics_file, run, step, {f"val/{k}": v for k, v in metrics.items()},
        images={"val/reconstructions": grid, "val/codebook_usage": hist})
    bar.write(f"step {step}: val recon {metrics['recon_loss']:.4f}  psnr {metrics['psnr']:.2f} dB  "
              f"perplexity {metrics['perplexity']:.1f}  usage {metrics['usage']:.0%}  -> {grid_path}")
    return metrics, grid_path


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
                    f"{values['window_perplexity']:.0f}); see the README on reading the codebook's health")
        if ppl >= self.threshold and self.collapsed:
            self.collapsed = False
            return f"step {step}: training perplexity back above {self.threshold:g} ({ppl:.1f})"
        return None


# ---- the run ----

def train(cfg: Config) -> dict:
    """Train per ``cfg``; returns a summary (first and last losses, final evaluation, files written).

    Under torchrun every process calls this; the process group is created here and destroyed on the way out,
    after an error too.
    """
    procs, device = start_processes(pick_device(cfg.train.device))
    try:
        return fit(cfg, device, procs)
    finally:
        stop_processes(procs)


def fit(cfg: Config, device: torch.device, procs: Processes) -> dict:
    say = print if procs.main else _quiet  # rank 0 speaks for every process
    run_dir = Path(cfg.train.out_dir)
    resume_from = resume_path(cfg, run_dir)  # every rank finds the same checkpoint: nothing is writing yet
    say(config_to_yaml(cfg), end="")
    with main_process_first(procs):
        train_set, val_set = make_datasets(cfg.data, cfg.train.seed)  # first: a missing dataset should fail fast
    if procs.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_run_dir(run_dir)  # rank 0 alone writes checkpoints, so it alone clears what a killed writer left

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    usage = CodeUsage(counted_codes(cfg), cfg.train.usage_window, device)
    progress, ckpt = Progress(world_size=procs.world_size), None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, map_location=device)
        check_resumable(ckpt["config"], cfg, resume_from)
        progress = restore_state(ckpt, model, optimizer, scheduler, usage)
        say(f"resumed from {resume_from} at step {progress.step}")
        if progress.world_size != procs.world_size:
            say(f"note: the checkpoint was written by {progress.world_size} process(es), this run has "
                f"{procs.world_size}; train.batch_size is per process, so the global batch and the data order "
                f"from here on differ from the original run's")
            progress.world_size = procs.world_size

    pin = device.type == "cuda"
    if usable_workers(cfg.data.num_workers) < cfg.data.num_workers:  # make_loader lowers it
        say(f"data.num_workers: {cfg.data.num_workers} lowered to {available_cpus()}, the CPUs this process may use")
    loader = make_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, seed=cfg.train.seed,
                         start_batch=progress.batches_drawn, pin_memory=pin, rank=procs.rank,
                         world_size=procs.world_size)
    val_loader = (make_loader(val_set, cfg.train.batch_size, cfg.data.num_workers, train=False, pin_memory=pin)
                  if procs.main else None)  # only rank 0 evaluates
    say(f"device {device}; model {count_parameters(model) / 1e6:.2f}M parameters; data {train_set.source.name}: "
        f"{len(train_set.source)} training / {len(val_set.source)} validation images, "
        f"{len(train_set)} / {len(val_set)} samples per epoch; run folder {run_dir}")
    images_per_step = cfg.train.batch_size * procs.world_size * cfg.train.grad_accum
    if procs.distributed:
        say(f"distributed: {procs.world_size} processes ({dist.get_backend()}); train.batch_size is per process: "
            f"global batch = {cfg.train.batch_size} x {procs.world_size} processes x {cfg.train.grad_accum} "
            f"grad_accum = {images_per_step} images per step; rank 0 logs, evaluates and writes checkpoints")
    if cfg.train.compile:
        # the convolutions are what compiling speeds up; the quantizer's kernels are Triton already, and its
        # first-batch initialisation and accumulate() switch on host-side state, so it stays eager
        model.encoder.compile()
        model.decoder.compile()
    parallel_model = wrap_model(model, device, procs)  # what train_step runs; evaluation and saving use model
    # A finished run has nothing to log: starting W&B would only add an empty offline folder. Otherwise the
    # checkpoint's wandb_id resumes the same W&B run (a new offline folder with the same id, which wandb sync
    # uploads into that run after the first).
    has_work = progress.step < cfg.train.max_steps
    run = start_wandb(cfg, run_dir, progress.wandb_id) if procs.main and has_work else None
    progress.wandb_id = run.id if run is not None else progress.wandb_id
    if ckpt is not None:
        restore_rng(ckpt, procs, cfg.train.seed)  # last, after everything above that may draw random numbers
        del ckpt
    elif procs.distributed:
        # from here on each rank draws its own dead-code re-seed candidates (the quantizer sums them over ranks)
        torch.manual_seed(cfg.train.seed + procs.rank)

    metrics_file = open_metrics(run_dir, progress.step) if procs.main else None
    batches = iter(loader)
    start_step, first, recent, last_eval, written = progress.step, None, [], {}, []
    collapse = CollapseWatch()
    bar = tqdm(total=cfg.train.max_steps, initial=progress.step, dynamic_ncols=True, mininterval=0.5, desc="train",
               disable=not procs.main)
    t_start = t_last = time.perf_counter()
    try:
        while progress.step < cfg.train.max_steps:
            lr = scheduler.get_last_lr()[0]
            out = train_step(parallel_model, batches, optimizer, scheduler, cfg, device, usage)
            progress.step += 1
            progress.batches_drawn += cfg.train.grad_accum
            usage.advance()
            step = progress.step
            # the mean over ranks, so that every rank sees the same numbers (and stops together on a NaN)
            stacked = mean_over_ranks(torch.stack([v.float() for v in out.values()]), procs)
            values = dict(zip(out, stacked.tolist()))  # one sync a step
            now = time.perf_counter()
            values.update(lr=lr, images_per_sec=images_per_step / (now - t_last))
            t_last = now
            if not (math.isfinite(values["recon_loss"]) and math.isfinite(values["vq_loss"])):
                raise FloatingPointError(f"non-finite loss at step {step} (recon {values['recon_loss']}, vq "
                                         f"{values['vq_loss']}); the checkpoints in {run_dir} are intact. "
                                         f"Try a lower optim.lr or optim.grad_clip")
            first = first or values
            recent = (recent + [values["recon_loss"]])[-20:]
            if procs.main:
                log(metrics_file, run, step, {f"train/{k}": v for k, v in values.items()})
                if (line := collapse.check(step, values)) is not None:
                    bar.write(line)
            bar.update(1)
            bar.set_postfix_str(postfix(values))

            evaluate_now = step % cfg.train.eval_every == 0 or step == cfg.train.max_steps
            save_now = step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps
            if not (evaluate_now or save_now):
                continue
            rng_ranks = gather_rng_states(procs)  # a collective: every rank takes part
            if procs.main:
                if evaluate_now:
                    # the bare model in eval mode: the quantizer neither learns nor all-reduces, so rank 0
                    # makes no collective call while the others wait
                    last_eval, grid_path = evaluate_and_log(model, val_loader, cfg, device, run_dir, step,
                                                            metrics_file, run, bar)
                    written.append(grid_path)
                    if last_eval["recon_loss"] < progress.best_val:
                        progress.best_val = last_eval["recon_loss"]
                        save_state(run_dir / BEST_NAME, model, optimizer, scheduler, cfg, progress, usage,
                                   rng_ranks)
                if save_now:
                    path = checkpoint_path(run_dir, step)
                    save_state(path, model, optimizer, scheduler, cfg, progress, usage, rng_ranks)
                    prune_checkpoints(run_dir, cfg.train.keep_last)
                    written.append(path)
            # The others wait for rank 0 here. Without the barrier they would wait inside the next step's
            # all-reduce instead (no deadlock, since evaluation makes no collective call, but a wait hidden in a
            # training step); and after the last step, no process returns before the run's files are complete.
            # Either way an evaluation must finish within the process group's timeout (torch's default: 10 min
            # on NCCL, 30 on gloo): train.eval_batches bounds it.
            barrier(procs)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if run is not None:
            run.finish()

    summary = {"steps": progress.step - start_step, "final_step": progress.step,
               "seconds": time.perf_counter() - t_start,
               "first_recon_loss": first["recon_loss"] if first else None,
               "last_recon_loss": sum(recent) / len(recent) if recent else None,
               "val": last_eval, "run_dir": str(run_dir), "files": [str(p) for p in written if p.exists()],
               "wandb_dir": str(run_dir / "wandb") if run is not None else None, "wandb_mode": cfg.wandb.mode}
    if procs.main:
        print_summary(summary)
    return summary


def clean_run_dir(run_dir: Path) -> None:
    """Remove the temporary files of checkpoint writes cut short by a SIGKILL, and say what was kept."""
    removed, kept = remove_stale_temporaries(run_dir)
    if removed:
        print(f"removed {len(removed)} temporary file(s) of interrupted checkpoint writes in {run_dir}: "
              + ", ".join(p.name for p in removed))
    if kept:
        print(f"note: kept {len(kept)} temporary file(s) in {run_dir} whose writer may be alive (its process, "
              f"or one on another host): " + ", ".join(p.name for p in kept), file=sys.stderr)


def _quiet(*args, **kwargs) -> None:
    pass


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


# ---- command line ----

def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m vqvae.train", description="Train the VQ-VAE.",
        epilog="Any config key can be set as --section.key=value (e.g. --train.max_steps=50) or with "
               "--set section.key=value.")
    parser.add_argument("--config", required=True, help="YAML config file (see config/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="resume from CHECKPOINT, or without a path from the newest one in train.out_dir")
    args, rest = parser.parse_known_args(argv)
    overrides = list(args.set) + parse_overrides(parser, rest)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    return args, overrides


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


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        # mistakes in the input get one clear line, not a traceback (one per process under torchrun, named)
        where = f"rank {os.environ.get('RANK', '?')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error: {where}{e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
