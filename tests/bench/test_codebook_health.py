"""bench/codebook_health.py end to end on a tiny model: every variant kind trains, the CSVs hold every step's
figures, and the table and plot are drawn from them (the real runs are benchmarks, minutes each)."""

import csv
import math

import pytest
import yaml

from bench import codebook_health

TINY = {
    "data": {"source": "builtin", "image_size": 16, "crop_scale": 0.5, "samples_per_epoch": 32, "val_samples": 8},
    "model": {"hidden_channels": 8, "residual_layers": 1, "residual_hidden": 4, "embedding_dim": 8},
    "quantizer": {"num_codes": 32},
    "optim": {"warmup_steps": 2},
    "train": {"batch_size": 4, "max_steps": 100},
}


def test_variants_train_and_the_report_is_drawn_from_their_csvs(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "health"
    codebook_health.main(["--config", str(config), "--variants", "ours,plain,vqp-recommended", "--steps", "3",
                          "--num-workers", "0", "--out", str(out), "--log-every", "1"])
    for name in ("ours", "plain", "vqp-recommended"):
        with open(out / f"{name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["step"]) for r in rows] == [1, 2, 3]
        for key in ("perplexity", "window_perplexity", "usage", "dead_codes", "recon_loss", "z_spread"):
            assert all(math.isfinite(float(r[key])) for r in rows), (name, key)
        assert 1 <= float(rows[0]["perplexity"]) <= 32
        with open(out / f"{name}.val.csv") as f:
            val = next(csv.DictReader(f))
        assert float(val["val_psnr"]) > 0 and 1 <= float(val["val_perplexity"]) <= 32
    table = (out / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in ("ours", "plain", "vqp-recommended"))
    assert "ours reads less than vqp-recommended at " in table and " of 3 steps" in table
    assert (out / "codebook_health.png").stat().st_size > 10_000


def test_draw_seeds_repeat_a_variant_and_the_table_shows_their_mean(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "health"
    codebook_health.main(["--config", str(config), "--variants", "ours", "--steps", "2", "--num-workers", "0",
                          "--out", str(out), "--draw-seeds", "5,6"])
    first_steps = []
    for seed in (5, 6):
        with open(out / f"ours@{seed}.csv") as f:
            first_steps.append(float(next(csv.DictReader(f))["perplexity"]))
    assert first_steps[0] != first_steps[1]  # the draws differ (same model and data)
    mean_row = next(line for line in (out / "summary.md").read_text().splitlines()
                    if line.startswith("| ours (mean of 2) |"))
    assert mean_row.split("|")[2].strip() == f"{sum(first_steps) / 2:.0f}"


def test_draw_seeds_must_be_ints(tmp_path, capsys):
    with pytest.raises(SystemExit):
        codebook_health.main(["--draw-seeds", "1,x", "--out", str(tmp_path)])
    assert "--draw-seeds takes comma-separated ints" in capsys.readouterr().err


def test_an_unknown_variant_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        codebook_health.main(["--variants", "ours,nonsense", "--out", str(tmp_path)])
    assert "unknown variant(s) ['nonsense']" in capsys.readouterr().err


def _health_csv(folder, name, min_ppl, psnr, dead):
    steps = [{"step": 1, "perplexity": 5000.0, "dead_codes": 0.0}] + [
        {"step": s, "perplexity": min_ppl + s, "dead_codes": dead} for s in range(2, 13)]
    with open(folder / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "perplexity", "dead_codes"])
        writer.writeheader()
        writer.writerows(steps)
    (folder / f"{name}.val.csv").write_text(f"variant,val_psnr\n{name},{psnr}\n")


def test_the_ablation_table_marks_what_falls_outside_the_spread_of_the_draws(tmp_path):
    from bench.ablation import table  # noqa: PLC0415

    for seed, (ppl, psnr, dead) in zip((11, 12, 13), ((100, 20.0, 50), (120, 20.4, 60), (110, 20.2, 55))):
        _health_csv(tmp_path, f"ours@{seed}", ppl, psnr, dead)
    _health_csv(tmp_path, "ours-no-affine-reparam@11", 105, 20.3, 58)  # inside on all three
    _health_csv(tmp_path, "ours-no-kmeans-init@11", 40, 20.3, 90)  # lower perplexity, more dead codes
    (tmp_path / "ours-running@12.csv").write_text("step,perplexity,dead_codes\n1,1,1\n")  # unfinished: no .val.csv
    text = table(tmp_path)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "102-122 | 20.00-20.40 | 50-60" in lines["ours (spread of 3 draws)"]
    assert lines["ours-no-affine-reparam"].endswith("| none |")
    assert "42 - | 20.30 | 90 + | min ppl, dead |" in lines["ours-no-kmeans-init"]
    assert "ours-running" not in text
