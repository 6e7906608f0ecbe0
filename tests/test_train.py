"""The trainer on the CPU with the built-in photographs: it learns, logs, checkpoints, resumes exactly, survives
a crash while saving, reports bad input clearly; and the encoder CLI writes code grids that decode."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import vqvae.checkpoint as checkpoint
import vqvae.train as train_module
from vqvae.config import Config, ConfigError, config_to_dict
from vqvae.encode import encode
from vqvae.resume import load_model
from vqvae.train import main, train

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def test_a_few_steps_learn_log_and_write_checkpoints_grids_and_an_offline_wandb_run(tmp_path, tiny_config, read_metrics):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, max_steps=40, eval_every=20, ckpt_every=10, keep_last=2)
    cfg.wandb.mode = "offline" if _has_wandb() else "disabled"
    summary = train(cfg)

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in ("recon_loss", "vq_loss", "perplexity", "window_perplexity", "usage", "window_usage", "dead_codes", "lr",
                "images_per_sec"):
        assert all(np.isfinite(r[f"train/{key}"]) for r in rows), key
    first = np.mean([r["train/recon_loss"] for r in rows[:5]])
    last = np.mean([r["train/recon_loss"] for r in rows[-10:]])
    assert last < 0.75 * first, (first, last)
    assert np.mean([r["train/perplexity"] for r in rows[-10:]]) > 8  # far from collapse onto a few codes
    evals = read_metrics(run_dir, "val/")
    assert [r["step"] for r in evals] == [20, 40]
    assert all(r["val/psnr"] > 0 and 0 < r["val/ssim"] <= 1 and r["val/perplexity"] >= 1 for r in evals)

    assert sorted(p.name for p in run_dir.glob("ckpt_*.pt")) == ["ckpt_0000030.pt", "ckpt_0000040.pt"]
    assert (run_dir / "best.pt").is_file()
    assert (run_dir / "recon_0000040.png").is_file()
    assert not list(run_dir.glob(".*.tmp"))
    ckpt = checkpoint.load_checkpoint(run_dir / "ckpt_0000040.pt")
    assert ckpt["step"] == 40 and ckpt["config"] == config_to_dict(cfg)
    assert {"model", "optimizer", "scheduler", "rng", "progress"} <= set(ckpt)
    assert bool(ckpt["model"]["quantizer.codebook.initialized"])
    if cfg.wandb.mode == "offline":
        assert list((run_dir / "wandb").glob("offline-run-*"))
    assert summary["last_recon_loss"] < summary["first_recon_loss"]


@pytest.mark.parametrize("grad_accum, learning", [(1, "ema"), (2, "ema"), (2, "simvq")])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, monkeypatch, grad_accum, learning, tiny_config, read_metrics):
    # an evaluation at the checkpoint, gradient accumulation, and a fast EMA decay (so dead codes are re-seeded
    # from torch's RNG within the run) all have to survive the interruption; learned codes (SimVQ's base and map,
    # and the optimizer's state of the map) too
    def config(run_dir):
        cfg = tiny_config(run_dir, max_steps=14, ckpt_every=7, eval_every=7, grad_accum=grad_accum)
        cfg.quantizer.decay, cfg.quantizer.learning = 0.7, learning
        return cfg

    train(config(tmp_path / "straight"))
    reference = read_metrics(tmp_path / "straight")

    real_step, calls = train_module.train_step, {"n": 0}

    def crash_in_step_ten(*args, **kwargs):  # two steps after the checkpoint at step 7
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt("simulated interruption")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", crash_in_step_ten)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "resumed"))
    monkeypatch.setattr(train_module, "train_step", real_step)
    summary = train(config(tmp_path / "resumed"))  # resume=auto picks up ckpt_0000007.pt
    assert summary["steps"] == 7

    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 15))  # steps 8 and 9 of the crashed run dropped
    assert any(r["train/dead_codes"] > 0 for r in reference), "the test should exercise dead-code restarts"
    for a, b in zip(reference, resumed):
        for key in ("train/recon_loss", "train/vq_loss", "train/perplexity", "train/window_perplexity",
                    "train/window_usage", "train/lr"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    final_a = checkpoint.load_checkpoint(tmp_path / "straight" / "ckpt_0000014.pt")["model"]
    final_b = checkpoint.load_checkpoint(tmp_path / "resumed" / "ckpt_0000014.pt")["model"]
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=0, atol=1e-6, msg=key)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = checkpoint.checkpoint_path(tmp_path, 5)
    checkpoint.save_checkpoint(path, {"step": 5, "weights": torch.arange(4.0)})

    def torn_save(state, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, {"step": 6, "weights": torch.zeros(4)})
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(checkpoint.checkpoint_path(tmp_path, 6), {"step": 6})
    monkeypatch.undo()

    survivor = checkpoint.load_checkpoint(path)
    assert survivor["step"] == 5 and torch.equal(survivor["weights"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000005.pt"]  # no torn or temporary files
    assert checkpoint.latest_checkpoint(tmp_path) == path


def test_a_run_removes_the_temporaries_of_killed_writers_but_not_of_live_ones(tmp_path, capsys, tiny_config):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # a writer killed mid-write: torch.save has written part of the file when the SIGKILL comes
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys, torch; import vqvae.checkpoint as c\n"
        "def torn(state, f): f.write(b'half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.torch.save = torn\n"
        f"c.save_checkpoint({str(run_dir / 'ckpt_0000005.pt')!r}, {{'step': 5}})\n")],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert killed.returncode == -signal.SIGKILL
    leaked = [p.name for p in run_dir.glob(".*.tmp")]
    assert len(leaked) == 1, leaked

    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid is no longer alive
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead_ckpt = f".ckpt_0000003.pt.{socket.gethostname()}.{finished.pid}.tmp"
        dead_best = f".best.pt.{socket.gethostname()}.{finished.pid}.tmp"
        live_other = f".ckpt_0000004.pt.{socket.gethostname()}.{live.pid}.tmp"  # e.g. another rank's process
        live_self = f".ckpt_0000006.pt.{socket.gethostname()}.{os.getpid()}.tmp"
        other_host = f".ckpt_0000007.pt.elsewhere.example.{finished.pid}.tmp"  # its pid means nothing here
        for name in (dead_ckpt, dead_best, live_other, live_self, other_host):
            (run_dir / name).write_bytes(b"partial")
        capsys.readouterr()
        train(tiny_config(run_dir, max_steps=2))
        out, err = capsys.readouterr()
        assert sorted(p.name for p in run_dir.glob(".*.tmp")) == sorted([live_other, live_self, other_host])
        assert "removed 3 temporary file(s)" in out and leaked[0] in out
        assert "kept 3 temporary file(s)" in err
    finally:
        live.kill()
        live.wait()


def test_each_evaluation_writes_the_codebook_usage_chart_to_the_run_folder(tmp_path, tiny_config):
    from PIL import Image

    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, max_steps=4, eval_every=2))  # wandb disabled: the files must not depend on it
    assert sorted(p.name for p in run_dir.glob("usage_*.png")) == ["usage_0000002.png", "usage_0000004.png"]
    with Image.open(run_dir / "usage_0000004.png") as chart:
        assert chart.format == "PNG" and chart.size == (800, 260)


def test_more_loader_workers_than_cpus_are_lowered_once_with_a_note(tmp_path, monkeypatch, capsys, tiny_config):
    import warnings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # this process may use 1 CPU
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    cfg = tiny_config(tmp_path / "run", max_steps=2, eval_every=2)
    cfg.data.num_workers = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    notes = [line for line in capsys.readouterr().out.splitlines() if "data.num_workers" in line]
    assert len(notes) == 1 and "4 lowered to 1" in notes[0], notes
    assert not [str(w.message) for w in caught if "worker" in str(w.message)]


@pytest.mark.parametrize("key, value, named", [
    ("num_codes", 32, r"quantizer\.codebook\.codes is \[64, 16\] in the file but \[32, 16\] in the model"),
    ("codebook_dim", 8, r"missing from the file: quantizer\.project_in\.weight"),
    ("affine_reparam", False, r"in the file but not in the model: quantizer\.codebook\.data_mean"),
])
def test_resume_refuses_a_different_model(tmp_path, key, value, named, tiny_config):
    """Compared by the tensors' names and shapes, so every setting that changes them is caught (codebook_dim was
    not, when the check listed config keys by hand)."""
    train(tiny_config(tmp_path / "run", max_steps=2))
    cfg = tiny_config(tmp_path / "run", max_steps=4)
    setattr(cfg.quantizer, key, value)
    with pytest.raises(ConfigError, match=r"cannot resume from .*ckpt_0000002\.pt: .*" + named):
        train(cfg)


def test_resume_may_switch_a_health_rule_that_keeps_no_state(tmp_path, tiny_config):
    train(tiny_config(tmp_path / "run", max_steps=2))
    cfg = tiny_config(tmp_path / "run", max_steps=3)
    cfg.quantizer.ema_warmup, cfg.quantizer.restart_draws = False, "error"
    assert train(cfg)["final_step"] == 3


def test_an_unreadable_newest_checkpoint_is_skipped_with_a_word(tmp_path, capsys, tiny_config):
    """A new user's case: 5 kB of garbage named as the newest checkpoint. The run resumes from the newest one
    that reads, naming the file it skipped; with none readable, one line names the files and what to do."""
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, max_steps=2, ckpt_every=1, keep_last=5))
    (run_dir / "ckpt_0000100.pt").write_bytes(os.urandom(5000))
    capsys.readouterr()
    summary = train(tiny_config(run_dir, max_steps=3, ckpt_every=1, keep_last=5))
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "ckpt_0000100.pt" in captured.err
    assert "resuming from" in captured.out and "ckpt_0000002.pt" in captured.out
    assert summary["steps"] == 1 and summary["final_step"] == 3
    for path in run_dir.glob("ckpt_*.pt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(_write_config(tmp_path, tiny_config(run_dir, max_steps=5))), "--resume"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no readable checkpoint in") and "ckpt_0000100.pt" in err and "--resume PATH" in err


def _write_config(tmp_path: Path, cfg: Config) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def test_a_finished_run_does_nothing_and_never_refuses_to_overwrite(tmp_path, capsys, tiny_config):
    train(tiny_config(tmp_path / "run", max_steps=2))
    summary = train(tiny_config(tmp_path / "run", max_steps=2))
    assert summary["steps"] == 0 and "nothing to do" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tiny_config(tmp_path / "run", max_steps=2, resume="never"))
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(tiny_config(tmp_path / "empty", max_steps=2, resume="latest"))


def test_rerunning_a_run_keeps_adding_to_its_one_wandb_run(tmp_path, tiny_config):
    if not _has_wandb():
        pytest.skip("wandb is not installed (it is optional)")
    run_dir = tmp_path / "run"

    def rerun(max_steps: int) -> tuple[dict, list[str]]:
        cfg = tiny_config(run_dir, max_steps=max_steps)
        cfg.wandb.mode = "offline"
        summary = train(cfg)
        return summary, sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))

    _, folders = rerun(2)
    run_id = checkpoint.load_checkpoint(run_dir / "ckpt_0000002.pt")["progress"]["wandb_id"]
    assert run_id and folders == [folders[0]] and folders[0].endswith(f"-{run_id}")
    summary, again = rerun(2)  # finished: nothing to train, so nothing for W&B either
    assert summary["steps"] == 0 and again == folders
    summary, continued = rerun(4)  # a resumed run: a second folder of the same run, which wandb sync joins up
    # wandb names a folder by the second it starts and adds "-1" when two runs start in the same second
    same_run = re.compile(rf".*-{re.escape(run_id)}(-\d+)?$")
    assert summary["steps"] == 2 and len(continued) == 2 and all(same_run.match(f) for f in continued)
    assert checkpoint.load_checkpoint(run_dir / "ckpt_0000004.pt")["progress"]["wandb_id"] == run_id


def test_command_line_errors_name_the_key_and_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 5\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.max_step'" in err and "bad.yaml" in err


def test_naruto_config_fails_fast_without_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIG_DIR / "vqvae_naruto.yaml"), f"--data.cache_dir={tmp_path / 'cache'}",
              f"--train.out_dir={tmp_path / 'run'}", "--wandb.mode=disabled"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lambdalabs/naruto-blip-captions" in err and "no cached copy" in err
    assert "--data.source=folder" in err
    assert not (tmp_path / "run").exists()


def test_training_reads_a_hub_dataset_and_validates_on_its_own_split(hub_dataset, tmp_path, monkeypatch, tiny_config, read_metrics):
    """The seed configuration's kind of source, end to end and offline: a dataset in a hub repository's layout."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, max_steps=4, eval_every=4, batch_size=2)
    cfg.data.source, cfg.data.name, cfg.data.image_key = "hf", str(hub_dataset(column="img")), "img"
    cfg.data.val_split, cfg.data.cache_dir = "validation", str(tmp_path / "cache")
    cfg.data.samples_per_epoch = cfg.data.val_samples = 0  # one crop per image of each split
    summary = train(cfg)
    assert summary["steps"] == 4
    val = read_metrics(run_dir, "val/")
    assert len(val) == 1 and math.isfinite(val[0]["val/psnr"])


def test_encode_writes_code_grids_that_decode_to_the_reconstructions(tmp_path, capsys, tiny_config):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, max_steps=6))
    capsys.readouterr()
    meta = encode(run_dir / "ckpt_0000006.pt", tmp_path / "codes", split="all", batch_size=16, num_recon=4,
                  device="cpu")
    out = capsys.readouterr().out  # the built-in split: many crops of a few photographs, and it says so
    said = r"^train: 64 crops of \d+ image\(s\) -> .*^val: 8 crops of \d+ image\(s\) -> "
    assert re.search(said, out, re.M | re.S), out
    assert meta["grid"] == [8, 8] and meta["splits"]["val"]["count"] == 8
    codes = np.load(tmp_path / "codes" / "codes_val.npy")
    assert codes.shape == (8, 8, 8) and codes.dtype == np.uint16 and codes.max() < 64
    assert np.load(tmp_path / "codes" / "codes_train.npy").shape == (64, 8, 8)
    assert len(list((tmp_path / "codes" / "recon_val").glob("*.png"))) == 4
    assert json.loads((tmp_path / "codes" / "meta.json").read_text())["step"] == 6

    model, cfg, _ = load_model(run_dir / "ckpt_0000006.pt")
    from vqvae.data import make_datasets
    images = torch.stack([make_datasets(cfg.data, cfg.train.seed, augment=False)[1][i] for i in range(8)])
    grid = torch.from_numpy(codes.astype(np.int64))
    assert torch.equal(model.encode(images), grid)
    with torch.no_grad():
        recon, _ = model(images)
    torch.testing.assert_close(model.decode(grid), recon)


def test_a_collapse_is_announced_once_and_so_is_the_recovery():
    watch = train_module.CollapseWatch()
    values = {"perplexity": 300.0, "window_perplexity": 900.0, "dead_codes": 0.0}
    lines = [watch.check(step, {**values, "perplexity": ppl}) for step, ppl in enumerate([300, 49, 12, 30, 51, 400], 1)]
    assert lines[0] is None and lines[2] is None and lines[3] is None and lines[5] is None
    assert lines[1].startswith("warning: step 2: training perplexity 49.0 < 50") and "collapsing" in lines[1]
    assert "back above 50" in lines[4]


def _has_wandb() -> bool:
    try:
        import wandb  # noqa: F401
        return True
    except ImportError:
        return False


def test_a_dead_threshold_above_a_codes_fair_share_is_warned_about():
    """The seed's threshold (4 rows a step, a quarter of 65,536 rows / 4,096 codes) with 65,536 codes at 16 images:
    the fair share is 0.25 rows a step, so nearly every code would be re-seeded every step."""
    root = Path(__file__).resolve().parents[1]
    from vqvae.config import load_config  # noqa: PLC0415

    seed = load_config(root / "config" / "vqvae_naruto.yaml")
    assert train_module.dead_code_warning(seed, images_per_step=64) is None
    large = load_config(root / "config" / "vqvae_naruto.yaml", ["quantizer.num_codes=65536"])
    warning = train_module.dead_code_warning(large, images_per_step=16)
    assert warning is not None and "dead_code_threshold=4" in warning and "0.25" in warning, warning
    assert "0.0625" in warning  # the suggested quarter of the fair share
    fixed = load_config(root / "config" / "vqvae_naruto.yaml",
                        ["quantizer.num_codes=65536", "quantizer.dead_code_threshold=0.0625"])
    assert train_module.dead_code_warning(fixed, images_per_step=16) is None
