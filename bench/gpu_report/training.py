"""The training stage: `python -m vqvae.train` on the seed configuration in bf16, for about two minutes, measured.

The trainer runs as `python -m vqvae.train` runs it (`runpy`, with the same arguments), but in this process, so
that two global module hooks it knows nothing of can time its quantizer (`QuantizerProbe`: the forward pass, which
holds the search, the EMA update and the restarts; its backward is the straight-through identity) and stop it when
the stage's time is nearly up. The rest comes from the run's metrics.jsonl (images per second and perplexity at
every step) and from the CUDA allocator (peak memory).

The run is the seed configuration as `config/vqvae_naruto.yaml` has it (64 images of 128 px: 65536 rows of 256
features a step, 4096 codes, bf16 autocast with the quantizer in fp32) on the built-in photographs, with W&B off
(wandb is never imported) and no evaluation or checkpoint inside the measured window.
"""

import contextlib
import json
import runpy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_report import record
from bench.gpu_report.stages import Context

BATCH, SMOKE_BATCH = 64, 4
TRAIN_ARGS = ("--config", "config/vqvae_naruto.yaml", "--data.source=builtin", "--train.bf16=true",
              "--wandb.mode=disabled", "--train.resume=never",
              # the stage stops the run long before max_steps, so no evaluation or checkpoint falls in its window
              "--train.max_steps=1000000", "--train.eval_every=1000000", "--train.ckpt_every=1000000")
# --smoke: a model and batch small enough that a CPU runs several steps a second
SMOKE_ARGS = ("--data.image_size=32", "--data.num_workers=0", "--data.samples_per_epoch=64", "--data.val_samples=4",
              "--model.hidden_channels=16", "--model.residual_hidden=8", "--model.embedding_dim=16",
              "--quantizer.num_codes=64", "--quantizer.kmeans_init_iters=1")
SUMMARY_MARGIN_S = 15.0  # training stops this long before the stage's limit, to read and write its figures
SMOKE_TRAIN_S = 5.0  # --smoke trains this long after its first step: the same way out as on the GPU, in seconds
WARMUP_STEPS = 10  # left out of the medians: the first batch's codebook initialisation, autotuning, allocation


class TimeUp(Exception):
    """Raised into the trainer, at the start of a quantizer call, when the stage has trained long enough."""


class QuantizerProbe:
    """Times every training-mode call of the model's quantizer, and stops the run at a deadline.

    Global forward hooks (the trainer is not changed): the pre-hook of a quantizer's call marks its start on the
    device's stream and the hook its end (CUDA events: no host synchronisation inside a step; on the CPU, wall-clock
    time). A residual stack's layers, quantizers themselves, are inside the stack's call, which counts once. The
    pre-hook of the first call at or after `deadline` (time.monotonic()), or `train_s` after the first call, raises
    TimeUp, which unwinds the trainer as any exception would: its progress bar and metrics file are closed on the
    way out.
    """

    def __init__(self, quantizer_types: tuple, deadline: float, train_s: float = float("inf")):
        self.types, self.deadline, self.train_s = quantizer_types, deadline, train_s
        self.marks: list[tuple] = []  # (start, end) of each call
        self.first_call: float | None = None  # time.monotonic() at the first call
        self._depth, self._start = 0, None

    def _is_quantizer_training(self, module) -> bool:
        return isinstance(module, self.types) and module.training

    def _pre(self, module, args):
        if not self._is_quantizer_training(module):
            return
        if self._depth == 0:
            now = time.monotonic()
            if self.first_call is None:
                self.first_call = now
            elif now >= min(self.deadline, self.first_call + self.train_s):
                raise TimeUp
            self._start = self._mark()
        self._depth += 1

    def _post(self, module, args, output):
        if not self._is_quantizer_training(module):
            return
        self._depth -= 1
        if self._depth == 0:
            self.marks.append((self._start, self._mark()))

    @staticmethod
    def _mark():
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def call_seconds(self) -> list[float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1e3 for start, end in self.marks]
        return [end - start for start, end in self.marks]

    @contextlib.contextmanager
    def installed(self):
        hooks = (torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
                 torch.nn.modules.module.register_module_forward_hook(self._post))
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()


def train_and_measure(ctx: Context) -> None:
    """Train until the stage's clock says stop, then record the figures (those of the steps done so far, should the
    trainer fail)."""
    from vqvae.quantizer import VectorQuantizer  # noqa: PLC0415
    from vqvae.quantizer.residual import ResidualVectorQuantizer  # noqa: PLC0415

    batch = SMOKE_BATCH if ctx.smoke else BATCH
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_report_train_"))
    argv = [*TRAIN_ARGS, *(SMOKE_ARGS if ctx.smoke else ()), f"--train.batch_size={batch}",
            f"--train.out_dir={run_dir}"]
    record.update(ctx.out, "training", command="python -m vqvae.train " + " ".join(argv), batch=batch)
    probe = QuantizerProbe((VectorQuantizer, ResidualVectorQuantizer), ctx.deadline - SUMMARY_MARGIN_S,
                           train_s=SMOKE_TRAIN_S if ctx.smoke else float("inf"))
    stopped = "the trainer failed (training.log)"
    try:
        with probe.installed():
            run_trainer(argv)
        stopped = "the run reached train.max_steps"
    except TimeUp:
        stopped = "stopped by the stage's clock"
    finally:
        trained_s = time.monotonic() - probe.first_call if probe.first_call is not None else 0.0
        record.update(ctx.out, "training", **run_figures(run_dir / "metrics.jsonl", probe.call_seconds(), batch),
                      stopped=stopped, trained_s=trained_s, wandb_imported="wandb" in sys.modules,
                      peak_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
        shutil.rmtree(run_dir, ignore_errors=True)


def run_trainer(argv: list[str]) -> None:
    """`python -m vqvae.train ARGV`, in this process."""
    saved = sys.argv
    sys.argv = ["vqvae.train", *argv]
    try:
        runpy.run_module("vqvae.train", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if done.code not in (None, 0):
            raise
    finally:
        sys.argv = saved


def run_figures(metrics_path: Path, quantizer_s: list[float], batch: int) -> dict:
    """Medians over the steps after the warm-up, and perplexity and images per second at every step."""
    rows = []
    if metrics_path.exists():
        rows = [row for row in map(json.loads, metrics_path.read_text().splitlines()) if "train/perplexity" in row]
    per_step = {"step": [row["step"] for row in rows],
                "perplexity": [row["train/perplexity"] for row in rows],
                "images_per_s": [row.get("train/images_per_sec") for row in rows]}
    warmup = min(WARMUP_STEPS, len(rows) // 2)
    steady_rates = [rate for rate in per_step["images_per_s"][warmup:] if rate]
    steady_quantizer = quantizer_s[warmup:len(rows)]
    figures = {"steps": len(rows), "warmup_steps": warmup, "per_step": per_step, "quantizer_calls": len(quantizer_s)}
    if steady_rates:
        figures["images_per_s"] = statistics.median(steady_rates)
        figures["step_s"] = batch / figures["images_per_s"]
    if steady_quantizer:
        figures["quantizer_s"] = statistics.median(steady_quantizer)
    if "step_s" in figures and "quantizer_s" in figures:
        figures["quantizer_share"] = figures["quantizer_s"] / figures["step_s"]
    return figures
