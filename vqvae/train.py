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
import gc
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vqvae.checkpoint import (
    BEST_NAME,
    CheckpointError,
    checkpoint_path,
    prune_checkpoints,
)
from vqvae.cli import autocast_context, parse_overrides, pick_device
from vqvae.config import Config, ConfigError, config_to_yaml, load_config
from vqvae.data import (
    DataError,
    available_cpus,
    make_datasets,
    make_loader,
    usable_workers,
)
from vqvae.distributed import (
    Processes,
    barrier,
    gather_rng_states,
    main_process_first,
    mean_over_ranks,
    restore_rng,
    start_processes,
    stop_processes,
    wrap_model,
)
from vqvae.images import reconstruction_grid, usage_histogram
from vqvae.model import VQVAE, build_model, count_parameters
from vqvae.quality import QualityMeter, evaluate, quality_meter, recon_loss_fn
from vqvae.quantizer.metrics import CodeUsage
from vqvae.resume import (
    Progress,
    check_resumable,
    clean_run_dir,
    find_resume_checkpoint,
    restore_state,
    save_state,
)
from vqvae.runlog import (
    CollapseWatch,
    log,
    open_metrics,
    postfix,
    print_summary,
    start_wandb,
)

# ---- setup ----

def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # decay the conv weights only, as usual: biases gain nothing from it, and learned codes (a codebook, SimVQ's
    # map) would be pulled towards the origin, away from their rows. EMA codes are buffers: no optimizer's.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [p for n, p in named if p.dim() >= 2 and not _is_codebook_parameter(n)]
    groups = [{"params": decayed, "weight_decay": cfg.optim.weight_decay},
              {"params": [p for n, p in named if not any(p is d for d in decayed)], "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=fused)


def _is_codebook_parameter(name: str) -> bool:
    return ".codebook." in f".{name}"


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


# ---- one step ----

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
    layers = 0.0  # each layer's vq loss and perplexity [2, L] (a single quantizer is one layer)
    with net.quantizer.accumulate() if accum > 1 else contextlib.nullcontext() as ema_step:
        for i in range(accum):
            images = next(batches).to(device, non_blocking=True)
            with model.no_sync() if ddp and i < accum - 1 else contextlib.nullcontext():
                with autocast_context(cfg, device):
                    recon, q = model(images)
                recon_loss = loss_fn(recon.float(), images)
                ((recon_loss + q.loss.float()) / accum).backward()
            q = q.as_layers()
            totals += torch.stack([recon_loss.detach(), q.loss.detach().float(), q.perplexity.float().mean(),
                                   q.usage.float().mean()]) / accum
            layers = layers + torch.stack([q.losses.detach().float(), q.perplexity.float()]) / accum
            usage.update(usage_codes(q.indices, cfg.quantizer.num_codes))
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
    dead = q.dead_codes if accum == 1 else ema_step.dead_codes.reshape(-1)
    return {"recon_loss": totals[0], "vq_loss": totals[1], "perplexity": totals[2], "usage": totals[3],
            "window_perplexity": usage.perplexity(), "window_usage": usage.fraction(),
            "dead_codes": dead_code_total(dead, cfg), "grad_norm": grad_norm, **layer_metrics(layers, dead)}


def layer_metrics(layers: torch.Tensor, dead: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each residual layer's figures, `layer<l>/...` from 1 (none for a single layer): vq loss and perplexity
    (stacked [2, L], means over the micro-batches) and dead codes."""
    if layers.shape[1] == 1:
        return {}
    metrics = {}
    for i in range(layers.shape[1]):
        metrics.update({f"layer{i + 1}/vq_loss": layers[0, i], f"layer{i + 1}/perplexity": layers[1, i],
                        f"layer{i + 1}/dead_codes": dead[i]})
    return metrics


def dead_code_total(dead: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Dead codes over all the codebooks, from each layer's count [L]: layers sharing one codebook each report
    that codebook's, so it is counted once."""
    return dead[0] if cfg.quantizer.shared_codebook else dead.sum()


def dead_code_warning(cfg: Config, images_per_step: int) -> str | None:
    """A warning when quantizer.dead_code_threshold is at or above a code's fair share of a step's rows (rows / K):
    the EMA counts average that share, so most codes would be re-seeded at every step (a large codebook at a
    small batch: 65,536 codes at 16 images of 32 x 32 have a fair share of 0.25)."""
    q = cfg.quantizer
    if q.dead_code_threshold <= 0:
        return None
    side = cfg.data.image_size // 2 ** cfg.model.num_downsamples
    rows = images_per_step * side * side * (q.num_quantizers if q.shared_codebook else 1)
    fair = rows / q.num_codes
    if q.dead_code_threshold < fair:
        return None
    return (f"warning: quantizer.dead_code_threshold={q.dead_code_threshold:g} is not under a code's fair share of "
            f"a step's rows ({rows} rows / {q.num_codes} codes = {fair:.4g}): most codes will be re-seeded at "
            f"every step; a quarter of the fair share ({fair / 4:.4g}) is what the shipped configs use")


def counted_codes(cfg: Config) -> int:
    """Bins of the usage window: residual layers' codes count apart (layer l's code k is bin l * K + k), so the
    window's usage is the fraction of all the layers' codes in use."""
    return cfg.quantizer.num_codes * cfg.quantizer.num_quantizers


def usage_codes(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """The usage window's bins (see counted_codes) of a batch's codes (..., layers); -1 (no code) stays -1."""
    offsets = torch.arange(indices.shape[-1], device=indices.device) * num_codes
    return torch.where(indices >= 0, indices + offsets, -1)


def evaluate_and_log(model, val_loader, meter, cfg: Config, device, run_dir: Path, step: int, metrics_file, run,
                     bar) -> tuple[dict, Path]:
    """Score the validation split, write the reconstruction grid and the codebook-usage chart, log all three."""
    metrics, sample = evaluate(model, val_loader, cfg, device, cfg.train.eval_batches, meter)
    grid = reconstruction_grid(*sample)
    grid_path = run_dir / f"recon_{step:07d}.png"
    grid.save(grid_path)
    activity = torch.cat([codebook.activity() for codebook in model.quantizer.codebooks()])  # what deadness reads
    hist = usage_histogram(activity, cfg.quantizer.dead_code_threshold)
    hist.save(run_dir / f"usage_{step:07d}.png")  # in the run folder too: W&B may be off or never synced
    log(metrics_file, run, step, {f"val/{k}": v for k, v in metrics.items()},
        images={"val/reconstructions": grid, "val/codebook_usage": hist})
    extra = "".join(f"  {k} {metrics[k]:.4f}" for k in ("lpips", "rfid") if k in metrics)
    bar.write(f"step {step}: val recon {metrics['recon_loss']:.4f}  psnr {metrics['psnr']:.2f} dB  "
              f"ssim {metrics['ssim']:.4f}{extra}  perplexity {metrics['perplexity']:.1f}  "
              f"usage {metrics['usage']:.0%}  -> {grid_path}")
    return metrics, grid_path


# ---- the run ----

def train(cfg: Config) -> dict:
    """Train per ``cfg``; returns a summary (first and last losses, final evaluation, files written).

    Under torchrun every process calls this; the process group is created here and destroyed on the way out,
    after an error too.
    """
    procs, device = start_processes(pick_device(cfg.train.device))
    try:
        return fit(cfg, device, procs)
    except BaseException as error:
        if procs.owns_group:
            # The traceback holds fit's frame, and through it the DDP wrapper: its reducer must be gone before the
            # group is destroyed, or a rank can hang on its way out (seen with gloo). The message and stack stay.
            while error is not None:
                traceback.clear_frames(error.__traceback__)
                error = error.__cause__ or error.__context__
            gc.collect()
        raise
    finally:
        stop_processes(procs)


@dataclass
class Run:
    """What a training run works with, as `fit` sets it up."""

    model: VQVAE  # the bare model: evaluation and checkpoints use it
    parallel_model: torch.nn.Module  # what train_step runs: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    usage: CodeUsage
    progress: Progress
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None  # rank 0 alone evaluates
    meter: QualityMeter | None


def fit(cfg: Config, device: torch.device, procs: Processes) -> dict:
    """The run, top to bottom: resume or start, set up, train step by step, evaluate and save on schedule."""
    say = print if procs.main else _quiet  # rank 0 speaks for every process
    run_dir = Path(cfg.train.out_dir)
    # every rank finds the same checkpoint: nothing is writing yet
    resume_from, ckpt = find_resume_checkpoint(cfg, run_dir, device, say)
    say(config_to_yaml(cfg), end="")
    train_set, val_set = load_data(cfg, procs, run_dir)
    run = set_up(cfg, device, procs, ckpt, resume_from, train_set, val_set, say)
    # A finished run has nothing to log: starting W&B would only add an empty offline folder. Otherwise the
    # checkpoint's wandb_id resumes the same W&B run (a new offline folder with the same id, which wandb sync
    # uploads into that run after the first).
    has_work = run.progress.step < cfg.train.max_steps
    wandb_run = start_wandb(cfg, run_dir, run.progress.wandb_id) if procs.main and has_work else None
    run.progress.wandb_id = wandb_run.id if wandb_run is not None else run.progress.wandb_id
    if ckpt is not None:
        restore_rng(ckpt, procs, cfg.train.seed)  # last, after everything above that may draw random numbers
        del ckpt
    elif procs.distributed:
        # from here on each rank draws its own dead-code re-seed candidates (the quantizer sums them over ranks)
        torch.manual_seed(cfg.train.seed + procs.rank)
    summary = train_steps(run, cfg, device, procs, run_dir, wandb_run)
    if procs.main:
        print_summary(summary)
    return summary


def load_data(cfg: Config, procs: Processes, run_dir: Path):
    """The training and validation sets (first: a missing dataset should fail fast), and the run folder."""
    with main_process_first(procs):
        train_set, val_set = make_datasets(cfg.data, cfg.train.seed)
    if procs.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_run_dir(run_dir)  # rank 0 alone writes checkpoints, so it alone clears what a killed writer left
    return train_set, val_set


def set_up(cfg: Config, device: torch.device, procs: Processes, ckpt: dict | None, resume_from: Path | None,
           train_set, val_set, say) -> Run:
    """The model, optimizer, scheduler and usage window (from the checkpoint when resuming), the loaders and the
    quality meter, each announced."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    usage = CodeUsage(counted_codes(cfg), cfg.train.usage_window, device)
    progress = Progress(world_size=procs.world_size)
    if ckpt is not None:
        progress = resume(ckpt, resume_from, model, optimizer, scheduler, usage, procs, say)

    pin = device.type == "cuda"
    if usable_workers(cfg.data.num_workers) < cfg.data.num_workers:  # make_loader lowers it
        say(f"data.num_workers: {cfg.data.num_workers} lowered to {available_cpus()}, the CPUs this process may use")
    loader = make_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, seed=cfg.train.seed,
                         start_batch=progress.batches_drawn, pin_memory=pin, rank=procs.rank,
                         world_size=procs.world_size)
    val_loader = (make_loader(val_set, cfg.train.batch_size, cfg.data.num_workers, train=False, pin_memory=pin)
                  if procs.main else None)  # only rank 0 evaluates
    meter = quality_meter(cfg, device) if procs.main else None
    for metric, why in (meter.unavailable.items() if meter else ()):
        say(f"train.eval_metrics: {metric} {why}")
    say(f"device {device}; model {count_parameters(model) / 1e6:.2f}M parameters; data {train_set.source.name}: "
        f"{len(train_set.source)} training / {len(val_set.source)} validation images, "
        f"{len(train_set)} / {len(val_set)} samples per epoch; run folder {Path(cfg.train.out_dir)}")
    announce_batch(cfg, procs, say)
    if cfg.train.compile:
        # the convolutions are what compiling speeds up; the quantizer's kernels are Triton already, and its
        # first-batch initialisation and accumulate() switch on host-side state, so it stays eager
        model.encoder.compile()
        model.decoder.compile()
    parallel_model = wrap_model(model, device, procs)
    return Run(model, parallel_model, optimizer, scheduler, usage, progress, loader, val_loader, meter)


def resume(ckpt: dict, path: Path, model, optimizer, scheduler, usage: CodeUsage, procs: Processes, say) -> Progress:
    """The training state of the checkpoint, after checking that it fits the configured model."""
    check_resumable(ckpt, model, path)
    progress = restore_state(ckpt, model, optimizer, scheduler, usage)
    say(f"resumed from {path} at step {progress.step}")
    if progress.world_size != procs.world_size:
        say(f"note: the checkpoint was written by {progress.world_size} process(es), this run has "
            f"{procs.world_size}; train.batch_size is per process, so the global batch and the data order "
            f"from here on differ from the original run's")
        progress.world_size = procs.world_size
    return progress


def images_per_step(cfg: Config, procs: Processes) -> int:
    return cfg.train.batch_size * procs.world_size * cfg.train.grad_accum


def announce_batch(cfg: Config, procs: Processes, say) -> None:
    """The global batch, and a dead-code threshold that the batch makes too high."""
    if warning := dead_code_warning(cfg, images_per_step(cfg, procs)):
        say(warning)
    if procs.distributed:
        say(f"distributed: {procs.world_size} processes ({dist.get_backend()}); train.batch_size is per process: "
            f"global batch = {cfg.train.batch_size} x {procs.world_size} processes x {cfg.train.grad_accum} "
            f"grad_accum = {images_per_step(cfg, procs)} images per step; rank 0 logs, evaluates and writes "
            f"checkpoints")


def train_steps(run: Run, cfg: Config, device: torch.device, procs: Processes, run_dir: Path, wandb_run) -> dict:
    """Train from the run's step to train.max_steps; returns the summary."""
    progress = run.progress
    metrics_file = open_metrics(run_dir, progress.step) if procs.main else None
    batches = iter(run.loader)
    start_step, first, recent, last_eval, written = progress.step, None, [], {}, []
    collapse = CollapseWatch()
    bar = tqdm(total=cfg.train.max_steps, initial=progress.step, dynamic_ncols=True, mininterval=0.5, desc="train",
               disable=not procs.main)
    t_start = t_last = time.perf_counter()
    try:
        while progress.step < cfg.train.max_steps:
            lr = run.scheduler.get_last_lr()[0]
            out = train_step(run.parallel_model, batches, run.optimizer, run.scheduler, cfg, device, run.usage)
            progress.step += 1
            progress.batches_drawn += cfg.train.grad_accum
            run.usage.advance()
            step = progress.step
            # the mean over ranks, so that every rank sees the same numbers (and stops together on a NaN)
            stacked = mean_over_ranks(torch.stack([v.float() for v in out.values()]), procs)
            values = dict(zip(out, stacked.tolist()))  # one sync a step
            now = time.perf_counter()
            values.update(lr=lr, images_per_sec=images_per_step(cfg, procs) / (now - t_last))
            t_last = now
            check_finite(values, step, run_dir)
            first = first or values
            recent = (recent + [values["recon_loss"]])[-20:]
            if procs.main:
                log(metrics_file, wandb_run, step, {f"train/{k}": v for k, v in values.items()})
                if (line := collapse.check(step, values)) is not None:
                    bar.write(line)
            bar.update(1)
            bar.set_postfix_str(postfix(values))
            evaluated = evaluate_and_save(run, cfg, device, procs, run_dir, step, metrics_file, wandb_run, bar,
                                          written)
            last_eval = evaluated if evaluated is not None else last_eval
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if wandb_run is not None:
            wandb_run.finish()

    return {"steps": progress.step - start_step, "final_step": progress.step,
            "seconds": time.perf_counter() - t_start,
            "first_recon_loss": first["recon_loss"] if first else None,
            "last_recon_loss": sum(recent) / len(recent) if recent else None,
            "val": last_eval, "run_dir": str(run_dir), "files": [str(p) for p in written if p.exists()],
            "wandb_dir": str(run_dir / "wandb") if wandb_run is not None else None, "wandb_mode": cfg.wandb.mode}


def check_finite(values: dict, step: int, run_dir: Path) -> None:
    if not (math.isfinite(values["recon_loss"]) and math.isfinite(values["vq_loss"])):
        raise FloatingPointError(f"non-finite loss at step {step} (recon {values['recon_loss']}, vq "
                                 f"{values['vq_loss']}); the checkpoints in {run_dir} are intact. "
                                 f"Try a lower optim.lr or optim.grad_clip")


def evaluate_and_save(run: Run, cfg: Config, device, procs: Processes, run_dir: Path, step: int, metrics_file,
                      wandb_run, bar, written: list) -> dict | None:
    """At train.eval_every and train.ckpt_every (and the last step): rank 0 evaluates (keeping the best) and
    writes the checkpoint; every rank waits for it. Returns the evaluation's figures, if one ran."""
    evaluate_now = step % cfg.train.eval_every == 0 or step == cfg.train.max_steps
    save_now = step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps
    if not (evaluate_now or save_now):
        return None
    figures = None
    rng_ranks = gather_rng_states(procs)  # a collective: every rank takes part
    if procs.main:
        state = (run.model, run.optimizer, run.scheduler, cfg, run.progress, run.usage, rng_ranks)
        if evaluate_now:
            # the bare model in eval mode: the quantizer neither learns nor all-reduces, so rank 0 makes no
            # collective call while the others wait
            figures, grid_path = evaluate_and_log(run.model, run.val_loader, run.meter, cfg, device, run_dir, step,
                                                  metrics_file, wandb_run, bar)
            written.append(grid_path)
            if figures["recon_loss"] < run.progress.best_val:
                run.progress.best_val = figures["recon_loss"]
                save_state(run_dir / BEST_NAME, *state)
        if save_now:
            path = checkpoint_path(run_dir, step)
            save_state(path, *state)
            prune_checkpoints(run_dir, cfg.train.keep_last)
            written.append(path)
    # The others wait for rank 0 here. Without the barrier they would wait inside the next step's all-reduce
    # instead (no deadlock, since evaluation makes no collective call, but a wait hidden in a training step); and
    # after the last step, no process returns before the run's files are complete. Either way an evaluation must
    # finish within the process group's timeout (torch's default: 10 min on NCCL, 30 on gloo):
    # train.eval_batches bounds it.
    barrier(procs)
    return figures


def _quiet(*args, **kwargs) -> None:
    pass


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
