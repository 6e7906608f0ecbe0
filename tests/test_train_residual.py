"""A VQ-VAE with residual quantizer layers (quantizer.num_quantizers): it trains on the built-in photographs and
logs every layer, its codes decode better with every layer added, the encoder writes the layer axis, and one layer
is a single quantizer."""

import json

import numpy as np
import pytest
import torch

from vqvae.config import Config, ConfigError, validate
from vqvae.data import make_datasets
from vqvae.encode import encode
from vqvae.model import build_model
from vqvae.quantizer import VectorQuantizer
from vqvae.quantizer.residual import ResidualVectorQuantizer
from vqvae.resume import load_model
from vqvae.train import train

LAYERS, STEPS = 4, 100


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_config):
    """100 steps of a VQ-VAE with 4 residual layers of 16 codes on the built-in photographs. (Fewer steps leave a
    decoder too crude to show what the finer layers add: at 40 steps its images hardly depend on them.)"""
    run_dir = tmp_path_factory.mktemp("residual") / "run"
    cfg = tiny_config(run_dir, max_steps=STEPS, eval_every=STEPS // 2, ckpt_every=STEPS)
    cfg.quantizer.num_quantizers, cfg.quantizer.num_codes = LAYERS, 16
    summary = train(cfg)
    return run_dir, cfg, summary


def test_a_residual_vq_vae_trains_and_logs_every_layer(trained_run, read_metrics):
    run_dir, _, summary = trained_run
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = np.mean([r["train/recon_loss"] for r in rows[:5]])
    last = np.mean([r["train/recon_loss"] for r in rows[-10:]])
    assert last < 0.75 * first, (first, last)
    for layer in range(1, LAYERS + 1):
        for key in ("perplexity", "vq_loss", "dead_codes"):
            assert all(np.isfinite(r[f"train/layer{layer}/{key}"]) for r in rows), (layer, key)
        assert np.mean([r[f"train/layer{layer}/perplexity"] for r in rows[-10:]]) > 4, layer
    assert f"train/layer{LAYERS + 1}/perplexity" not in rows[0]
    headline = [np.mean([r[f"train/layer{i}/perplexity"] for i in range(1, LAYERS + 1)]) for r in rows]
    np.testing.assert_allclose([r["train/perplexity"] for r in rows], headline, rtol=1e-5)
    evals = read_metrics(run_dir, "val/")
    assert [r["step"] for r in evals] == [STEPS // 2, STEPS]
    assert all(r[f"val/layer{i}/perplexity"] >= 1 for r in evals for i in range(1, LAYERS + 1))
    assert summary["last_recon_loss"] < summary["first_recon_loss"]


def test_images_decoded_from_codes_improve_with_every_layer_added(trained_run):
    run_dir, _, _ = trained_run
    model, cfg, _ = load_model(run_dir / f"ckpt_{STEPS:07d}.pt")
    train_set, _ = make_datasets(cfg.data, cfg.train.seed, augment=False)  # fixed crops, no flips
    images = torch.stack([train_set[i] for i in range(48)])
    codes = model.encode(images)
    assert codes.shape == (48, 8, 8, LAYERS)
    latents = model.pre_quant(model.encoder(images)).detach()
    latent_errors, image_errors = [], []
    for layers in range(1, LAYERS + 1):
        vectors = model.quantizer.decode(codes[..., :layers]).permute(0, 3, 1, 2)
        latent_errors.append(float((vectors - latents).square().mean()))
        image_errors.append(float((model.decode(codes[..., :layers]) - images).square().mean()))
    assert all(b < a for a, b in zip(latent_errors, latent_errors[1:])), latent_errors
    assert all(b < a for a, b in zip(image_errors, image_errors[1:])), image_errors
    assert image_errors[-1] < 0.99 * image_errors[0], image_errors
    recon, _ = model(images)
    torch.testing.assert_close(model.decode(codes), recon)


def test_the_encoder_writes_the_layer_axis(trained_run, tmp_path):
    run_dir, _, _ = trained_run
    meta = encode(run_dir / f"ckpt_{STEPS:07d}.pt", tmp_path / "codes", split="val", batch_size=5, num_recon=6)
    codes = np.load(tmp_path / "codes" / "codes_val.npy")
    assert codes.shape == (8, 8, 8, LAYERS) and codes.dtype == np.uint16
    split = meta["splits"]["val"]
    assert meta["num_quantizers"] == LAYERS and len(split["codes_used"]) == LAYERS
    by_layers = split["recon_psnr_db_by_layers"]
    assert len(by_layers) == LAYERS and by_layers[-1] > by_layers[0], by_layers
    assert abs(by_layers[-1] - split["recon_psnr_db"]) < 1e-3
    assert json.loads((tmp_path / "codes" / "meta.json").read_text())["num_quantizers"] == LAYERS


def test_shared_codebook_layer_dropout_and_accumulation_train(tmp_path, tiny_config, read_metrics):
    cfg = tiny_config(tmp_path / "run", max_steps=4, grad_accum=2)
    cfg.quantizer.num_quantizers, cfg.quantizer.shared_codebook, cfg.quantizer.layer_dropout = 3, True, True
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 4 and all(np.isfinite(r["train/recon_loss"]) for r in rows)
    # one codebook: every layer reports its dead codes, and the total counts them once
    assert all(r["train/dead_codes"] == r["train/layer1/dead_codes"] == r["train/layer3/dead_codes"] for r in rows)
    model, _, _ = load_model(tmp_path / "run" / "ckpt_0000004.pt")
    assert len(model.quantizer.layers) == 1 and int(model.quantizer.dropout_draws) == 8


def test_one_layer_is_a_single_quantizer_and_more_are_a_residual_stack():
    cfg = Config()
    cfg.model.embedding_dim, cfg.quantizer.num_codes = 16, 64
    model = build_model(cfg)
    assert type(model.quantizer) is VectorQuantizer
    assert {k for k in model.state_dict() if k.startswith("quantizer.")} == {f"quantizer.codebook.{name}" for name in (
        "codes", "cluster_size", "embed_sum", "recent_count", "initialized", "ema_steps", "data_mean", "data_sq_mean")}
    cfg.quantizer.num_quantizers = 3
    residual = build_model(cfg).quantizer
    assert isinstance(residual, ResidualVectorQuantizer) and len(residual.layers) == 3
    assert residual.layout == "channels_first"
    assert residual.layer(2).options.commitment_weight == cfg.quantizer.commitment_weight


@pytest.mark.parametrize("key", ["shared_codebook", "layer_dropout"])
def test_residual_options_need_residual_layers(key):
    cfg = Config()
    setattr(cfg.quantizer, key, True)
    with pytest.raises(ConfigError, match=f"quantizer.{key} needs residual layers"):
        validate(cfg, "test")
