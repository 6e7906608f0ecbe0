"""Data-parallel training: two processes under torchrun on the CPU (gloo, rendezvous on 127.0.0.1) train, only
rank 0 writes, the checkpoint loads, and a resumed run repeats an uninterrupted one exactly. Plus the pieces that
need no processes: the sampler's shares of a global batch, an evaluation that makes no collective call, and a failed
run that frees its model before the process group goes."""

import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml

import vqvae.quantizer.sync as sync_module
import vqvae.train as train_module
from vqvae.checkpoint import load_checkpoint
from vqvae.config import Config, config_from_dict
from vqvae.data import DataError, ResumableBatchSampler, make_datasets, make_loader
from vqvae.distributed import Processes
from vqvae.model import build_model
from vqvae.quality import evaluate
from vqvae.resume import load_model

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2

TINY = {
    "data": {"source": "builtin", "image_size": 32, "crop_scale": 0.3, "samples_per_epoch": 64, "val_samples": 8,
             "num_workers": 0},
    "model": {"hidden_channels": 16, "residual_layers": 1, "residual_hidden": 8, "embedding_dim": 16},
    # a fast decay: codes die and are re-seeded (from each rank's own RNG) within the run
    "quantizer": {"num_codes": 64, "decay": 0.7},
    # min_lr = lr: after the warm-up the schedule no longer depends on max_steps, so a run stopped at step 6 and
    # resumed to step 12 can be compared with one that went to step 12 straight away
    "optim": {"lr": 3.0e-3, "min_lr": 3.0e-3, "warmup_steps": 2},
    "train": {"batch_size": 8, "eval_every": 6, "ckpt_every": 6, "keep_last": 2, "device": "cpu"},
    "wandb": {"mode": "disabled"},
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: Path, run_dir: Path, max_steps: int) -> str:
    """Train with two processes; returns what they printed (stdout and stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "vqvae.train", "--config", str(config),
           f"--train.out_dir={run_dir}", f"--train.max_steps={max_steps}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def test_two_processes_train_write_once_and_resume_exactly(tmp_path, read_metrics):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    output = torchrun(config, straight, max_steps=12)
    # rank 0 alone prints: the config, the set-up lines and the summary appear once
    assert output.count("data:\n  source: builtin") == 1
    assert output.count("distributed: 2 processes (gloo)") == 1
    assert output.count("global batch = 8 x 2 processes x 1 grad_accum = 16 images per step") == 1
    assert output.count("done: 12 steps to step 12") == 1

    # rank 0 alone writes: one metrics line per step, one checkpoint per save, no stray temporary files
    rows = read_metrics(straight)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["step"] for r in read_metrics(straight, "val/")] == [6, 12]
    losses = [r["train/recon_loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert any(r["train/dead_codes"] > 0 for r in rows), "the test should exercise dead-code re-seeding"
    assert sorted(p.name for p in straight.iterdir()) == [
        "best.pt", "ckpt_0000006.pt", "ckpt_0000012.pt", "metrics.jsonl", "recon_0000006.png", "recon_0000012.png",
        "usage_0000006.png", "usage_0000012.png"]

    # the checkpoint holds the bare model (no DDP "module." prefix) and every rank's RNG states
    ckpt = load_checkpoint(straight / "ckpt_0000012.pt")
    assert not any(key.startswith("module.") for key in ckpt["model"])
    assert bool(ckpt["model"]["quantizer.codebook.initialized"]) and ckpt["progress"]["world_size"] == WORLD
    assert len(ckpt["rng_ranks"]) == WORLD
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"]), \
        "the ranks should draw different re-seed candidates"
    model, cfg, _ = load_model(straight / "ckpt_0000012.pt")
    images = torch.stack([make_datasets(cfg.data, cfg.train.seed)[1][i] for i in range(4)])
    codes = model.encode(images)
    assert codes.shape == (4, 8, 8) and 0 <= int(codes.min()) and int(codes.max()) < 64
    assert torch.isfinite(model.decode(codes)).all()

    # stopped at step 6 and resumed to 12: every rank loads the checkpoint, its sampler position and its own RNG
    # stream, so the run repeats the straight one, dead-code re-seeds included
    torchrun(config, resumed, max_steps=6)
    output = torchrun(config, resumed, max_steps=12)
    assert output.count(f"resumed from {resumed / 'ckpt_0000006.pt'} at step 6") == 1
    assert output.count("done: 6 steps to step 12") == 1
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == list(range(1, 13))
    for a, b in zip(rows, again):
        for key in ("train/recon_loss", "train/vq_loss", "train/perplexity", "train/window_usage",
                    "train/dead_codes", "train/lr"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    final = load_checkpoint(resumed / "ckpt_0000012.pt")["model"]
    for key, value in ckpt["model"].items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)


def test_sampler_ranks_split_each_global_batch_and_resume_together():
    world, batch = 3, 2
    single = iter(ResumableBatchSampler(20, batch * world, seed=7))  # 3 global batches an epoch
    shares = [iter(ResumableBatchSampler(20, batch, seed=7, rank=r, world_size=world)) for r in range(world)]
    steps = [[next(s) for s in shares] for _ in range(5)]  # into the second epoch
    for step in steps:
        assert sum(step, []) == next(single)  # the ranks' shares, side by side, are the one-process batch
    later = [iter(ResumableBatchSampler(20, batch, seed=7, start_batch=4, rank=r, world_size=world))
             for r in range(world)]
    assert [next(s) for s in later] == steps[4]
    with pytest.raises(DataError, match=r"fewer than one batch of 8 x 3 processes"):
        ResumableBatchSampler(20, 8, seed=0, rank=0, world_size=3)


def test_loader_takes_the_ranks_share():
    cfg = Config().data
    cfg.image_size, cfg.samples_per_epoch, cfg.val_samples, cfg.num_workers = 16, 12, 4, 0
    train_set, _ = make_datasets(cfg, seed=0)
    whole = next(iter(make_loader(train_set, 4, 0, seed=0)))
    halves = [next(iter(make_loader(train_set, 2, 0, seed=0, rank=r, world_size=2))) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_evaluation_makes_no_collective_call(monkeypatch):
    """Rank 0 evaluates alone while the other ranks wait: in eval mode the quantizer must neither all-reduce
    its statistics nor broadcast an initialisation, or rank 0 would wait for ranks that never come."""
    cfg = Config()
    cfg.data.image_size, cfg.data.val_samples, cfg.data.num_workers = 16, 4, 0
    cfg.model.hidden_channels, cfg.model.residual_layers, cfg.model.residual_hidden = 8, 1, 4
    cfg.model.embedding_dim, cfg.quantizer.num_codes = 4, 16
    model = build_model(cfg)
    model(torch.randn(2, 3, 16, 16))  # one training forward initialises the codebook, as training would
    _, val_set = make_datasets(cfg.data, seed=0)

    def no_collectives(*args, **kwargs):
        raise AssertionError("a collective call during evaluation")

    monkeypatch.setattr(sync_module, "world_size", lambda: WORLD)  # as if torch.distributed were running
    monkeypatch.setattr(sync_module.dist, "get_rank", lambda *args, **kwargs: 0)
    monkeypatch.setattr(sync_module.dist, "all_reduce", no_collectives)
    monkeypatch.setattr(sync_module.dist, "broadcast", no_collectives)
    metrics, _ = evaluate(model, make_loader(val_set, 2, 0, train=False), cfg, torch.device("cpu"))
    assert metrics["psnr"] > 0 and model.training
    with pytest.raises(AssertionError, match="collective"):  # the patch bites: a training forward does call them
        model(torch.randn(2, 3, 16, 16))


def test_a_failed_run_frees_its_model_before_destroying_the_group(monkeypatch):
    """When training raises, the traceback would keep fit's frame, and the DDP wrapper in it, alive while the
    process group is destroyed (a rank can then hang on its way out): train clears those frames first."""
    class Wrapper:  # stands in for DistributedDataParallel: what must be gone when the group is destroyed
        pass

    alive_at_stop = []

    def failing_fit(cfg, device, procs):
        model = Wrapper()
        failing_fit.ref = weakref.ref(model)
        raise FloatingPointError("non-finite loss at step 3")

    monkeypatch.setattr(train_module, "start_processes",
                        lambda device: (Processes(rank=0, world_size=2, owns_group=True), device))
    monkeypatch.setattr(train_module, "fit", failing_fit)
    monkeypatch.setattr(train_module, "stop_processes",
                        lambda procs: alive_at_stop.append(failing_fit.ref() is not None))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        train_module.train(config_from_dict(TINY, "TINY"))
    assert alive_at_stop == [False]
