"""Judging tokenizers (vqvae/quality.py, vqvae/evaluate.py): each figure against an independent computation, the
"unavailable" path of the network metrics, and two checkpoints compared end to end, with LPIPS and rFID computed on
stand-in weight files (random weights in the published files' layouts; tests/test_lpips.py and tests/test_fid.py
hold the two networks to their reference implementations)."""

import json
import math
import sys

import pytest
import torch

from vqvae.checkpoint import save_checkpoint
from vqvae.config import ConfigError, config_to_dict, validate
from vqvae.evaluate import main as evaluate_main
from vqvae.model import build_model
from vqvae.quality import QualityMeter, ssim


def _images(n=4, size=32):
    return torch.rand(n, 3, size, size) * 2 - 1


def test_psnr_is_the_mean_over_images_of_each_images_psnr_on_unit_pixels():
    originals = torch.zeros(2, 3, 16, 16)
    recons = torch.stack([torch.full((3, 16, 16), 0.2), torch.full((3, 16, 16), -0.02)])  # [0,1] errors 0.1, 0.01
    meter = QualityMeter()
    meter.update(originals, recons)
    figures = meter.compute()
    assert figures["psnr"] == pytest.approx((20.0 + 40.0) / 2, abs=1e-4)
    assert figures["mse"] == pytest.approx((0.04 + 0.0004) / 2, rel=1e-5)
    assert figures["images"] == 2


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise():
    images = _images(3, 48)
    smooth = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)  # structure for SSIM to see
    assert torch.allclose(ssim(smooth, smooth), torch.ones(3), atol=1e-6)
    scores = [ssim((smooth + sigma * torch.randn_like(smooth)).clamp(-1, 1), smooth).mean().item()
              for sigma in (0.05, 0.1, 0.2, 0.4)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] < 1.0
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(_images(1, 8), _images(1, 8))


def test_a_meter_without_pytorch_msssim_fails_when_made_naming_the_package(monkeypatch):
    # The trainer makes its meter before the first step: a missing dependency stops it there, not at the first
    # evaluation (found on the GPU machine, whose image lacks pytorch-msssim, 1000 steps into a run).
    monkeypatch.setitem(sys.modules, "pytorch_msssim", None)
    with pytest.raises(ModuleNotFoundError, match="pip install pytorch-msssim"):
        QualityMeter()


def test_a_network_metric_without_weights_is_unavailable_naming_the_file_and_the_rest_still_run(tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    missing = tmp_path / "nowhere" / "vgg.pth"
    meter = QualityMeter(["lpips", "rfid"], weights={"lpips": str(missing)})
    assert not meter.networks
    meter.update(_images(), _images())
    figures = meter.compute()
    assert figures["lpips"].startswith("unavailable: no weights file at") and str(missing) in figures["lpips"]
    assert "weights-inception-2015-12-05-6726825d.pth" in figures["rfid"]  # torch hub's cache, where it looked
    assert isinstance(figures["psnr"], float) and isinstance(figures["ssim"], float)
    with pytest.raises(ValueError, match="unknown metric"):
        QualityMeter(["fid"])


def test_eval_metrics_and_image_size_are_checked_by_name(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path)
    cfg.train.eval_metrics = "lpips,fid"
    with pytest.raises(ConfigError, match="train.eval_metrics: unknown metric"):
        validate(cfg, "test")
    cfg = tiny_config(tmp_path)
    cfg.data.image_size, cfg.model.num_downsamples = 8, 1
    with pytest.raises(ConfigError, match=r"data.image_size \(8\) is too small"):
        validate(cfg, "test")


def _checkpoint(tiny_config, path, layers):
    cfg = tiny_config(path.parent / "run")
    cfg.quantizer.num_quantizers = layers
    model = build_model(cfg).train()
    for _ in range(3):
        model(_images(4))
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(cfg), "step": 3})
    return path


def test_two_checkpoints_side_by_side(tmp_path, capsys, tiny_config, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: LPIPS and rFID unavailable
    a, b = _checkpoint(tiny_config, tmp_path / "a.pt", 1), _checkpoint(tiny_config, tmp_path / "b.pt", 2)
    out = tmp_path / "eval"
    evaluate_main(["--checkpoint", str(a), str(b), "--out", str(out), "--batch-size", "3", "--worst", "4"])
    results = json.loads((out / "metrics.json").read_text())
    assert [r["checkpoint"] for r in results] == [str(a), str(b)]
    positions = (32 // 4) ** 2  # the tiny model's 8 x 8 grid
    for r, layers in zip(results, (1, 2)):
        assert r["images"] == 8 and r["split"] == "val" and r["step"] == 3
        assert r["bits_per_image"] == pytest.approx(math.log2(64) * positions * layers)
        assert 0 < r["entropy_bits_per_image"] <= r["bits_per_image"]
        assert 0 < r["usage"] <= 1 and r["perplexity"] >= 1 and 0 < r["ssim"] <= 1
        assert r["lpips"].startswith("unavailable") and r["rfid"].startswith("unavailable")
        assert r["worst_by"] == "mse"
    assert "layer2/perplexity" in results[1] and "layer2/perplexity" not in results[0]
    table = (out / "table.md").read_text()
    assert f"1: `{a}`" in table and f"2: `{b}`" in table and "| LPIPS (VGG) | unavailable | unavailable |" in table
    assert f"LPIPS (VGG): unavailable: no weights file at {tmp_path / 'torch' / 'hub' / 'checkpoints'}" in table
    assert "vgg16-397923af.pth" in table and "weights-inception-2015-12-05-6726825d.pth" in table  # what it looked for
    for n in (1, 2):
        assert (out / f"worst_{n}.png").stat().st_size > 0 and (out / f"usage_{n}.png").stat().st_size > 0


def test_the_worst_images_are_those_with_the_largest_error(tmp_path):
    from vqvae.evaluate import WorstImages  # noqa: PLC0415

    tracker = WorstImages(2, "mse")
    for scores in (torch.tensor([0.1, 0.5, 0.2]), torch.tensor([0.4, 0.05])):
        images = scores[:, None, None, None].expand(-1, 3, 4, 4)  # each image carries its own score
        tracker(images, images, {"mse": scores})
    assert tracker.scores.tolist() == pytest.approx([0.5, 0.4])
    assert tracker.originals[:, 0, 0, 0].tolist() == pytest.approx([0.5, 0.4])


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "missing/best.pt"], "checkpoint not found: missing/best.pt"),
    (["--checkpoint", "{folder}"], "{folder}"),
    (["--checkpoint", "{ckpt}", "--data.image_size=2"], "data.image_size (2) is too small"),
])
def test_bad_input_is_named(tmp_path, capsys, args, message, tiny_config):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    ckpt = _checkpoint(tiny_config, tmp_path / "a.pt", 1)
    args = [a.format(folder=folder, ckpt=ckpt) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(args + ["--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    assert message.format(folder=folder) in capsys.readouterr().err


def test_the_trainer_reports_ssim_and_says_once_why_lpips_is_missing(tmp_path, capsys, tiny_config, read_metrics):
    from vqvae.train import train  # noqa: PLC0415

    cfg = tiny_config(tmp_path / "run", max_steps=2, eval_every=2, eval_metrics="lpips",
                      lpips_weights=str(tmp_path / "vgg16.pth"))
    train(cfg)
    out = capsys.readouterr().out
    assert out.count(f"train.eval_metrics: lpips unavailable: no weights file at {tmp_path / 'vgg16.pth'}") == 1
    (row,) = read_metrics(tmp_path / "run", "val/")
    assert 0 < row["val/ssim"] <= 1 and "val/lpips" not in row


def _put_in_hub_cache(weights: dict, torch_home):
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for path in weights.values():
        (checkpoints / path.name).symlink_to(path)


def test_with_the_weights_where_torch_hub_keeps_them_every_column_holds_a_number(tmp_path, tiny_config, monkeypatch,
                                                                                  stand_in_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _put_in_hub_cache(stand_in_weights, tmp_path / "torch")
    a, b = _checkpoint(tiny_config, tmp_path / "a.pt", 1), _checkpoint(tiny_config, tmp_path / "b.pt", 2)
    results = evaluate_main_results(tmp_path, a, b)
    for r in results:
        for key in ("psnr", "ssim", "lpips", "rfid", "usage", "perplexity", "bits_per_image"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
        assert r["lpips"] > 0 and r["rfid"] > 0 and r["worst_by"] == "lpips"
        assert r["rfid_note"] == "over 8 images at 32 x 32: not comparable with published rFID (papers report rFID " \
                                 "over ImageNet's 50,000 validation images at 256 x 256), only with runs on this split"
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "unavailable" not in table and "1: over 8 images at 32 x 32: not comparable" in table


def evaluate_main_results(tmp_path, *checkpoints):
    evaluate_main(["--checkpoint", *map(str, checkpoints), "--out", str(tmp_path / "eval"), "--batch-size", "3"])
    return json.loads((tmp_path / "eval" / "metrics.json").read_text())


def test_a_weights_file_that_is_not_the_networks_stops_the_evaluation_naming_it(tmp_path, capsys, tiny_config):
    wrong = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, wrong)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", str(_checkpoint(tiny_config, tmp_path / "a.pt", 1)), "--out",
                       str(tmp_path / "eval"), "--inception-weights", str(wrong)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {wrong}: missing key(s) Conv2d_1a_3x3.bn.bias" in err and "Conv2d_1a_3x3.conv.weight" in err


def test_without_the_lpips_heads_lpips_is_unavailable_saying_where_they_come_from(monkeypatch, stand_in_weights):
    monkeypatch.setattr("vqvae.quality.heads_file", lambda: None)
    meter = QualityMeter(["lpips"], weights={"lpips": str(stand_in_weights["lpips"])})
    assert meter.unavailable["lpips"] == ("unavailable: no LPIPS heads file (vgg.pth): it ships with torchmetrics, "
                                          "pip install -e '.[eval]'")


def test_rfid_reads_pixels_rounded_not_truncated(stand_in_weights, monkeypatch):
    seen = []
    meter = QualityMeter(["rfid"], weights={"rfid": str(stand_in_weights["rfid"])})
    monkeypatch.setattr(meter.networks["rfid"], "update", lambda a, b: seen.extend([a, b]))
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    images = levels.float() / 127.5 - 1  # as vqvae.data.to_tensor makes them
    meter.update(images, images)
    assert all(torch.equal(pixels, levels) for pixels in seen)  # every one of the 256 levels comes back


def test_rfid_over_a_single_image_is_unavailable_saying_why(stand_in_weights):
    meter = QualityMeter(["rfid"], weights={"rfid": str(stand_in_weights["rfid"])})
    meter.update(_images(1), _images(1))
    figures = meter.compute()
    assert figures["rfid"] == "unavailable: a covariance needs at least 2 images, got 1"
    assert isinstance(figures["psnr"], float)


def test_the_trainer_reports_lpips_and_rfid_with_their_weights(tmp_path, tiny_config, read_metrics, stand_in_weights):
    from vqvae.train import train  # noqa: PLC0415

    cfg = tiny_config(tmp_path / "run", max_steps=2, eval_every=2, eval_metrics="lpips,rfid",
                      lpips_weights=str(stand_in_weights["lpips"]), inception_weights=str(stand_in_weights["rfid"]))
    train(cfg)
    (row,) = read_metrics(tmp_path / "run", "val/")
    assert row["val/lpips"] > 0 and row["val/rfid"] > 0


def test_the_eval_extra_imports_torchmetrics_without_torchvision():
    import importlib.util  # noqa: PLC0415

    import torchmetrics  # noqa: F401, PLC0415

    assert importlib.util.find_spec("torchvision") is None  # the extra must not pull it (its wheels need CUDA)
