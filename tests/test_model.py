"""The VQ-VAE's shapes, gradients, and the encode / decode round trip of code grids."""

from pathlib import Path

import pytest
import torch

from vqvae.config import Config, load_config
from vqvae.model import build_model, stage_widths

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def model_config(num_downsamples: int = 2) -> Config:
    cfg = Config()
    cfg.data.image_size = 32
    cfg.model.hidden_channels, cfg.model.num_downsamples = 16, num_downsamples
    cfg.model.residual_layers, cfg.model.residual_hidden, cfg.model.embedding_dim = 1, 8, 16
    cfg.quantizer.num_codes = 64
    return cfg


def trained_codebook(model, images):
    """One training-mode forward, so the quantizer seeds its codebook from the batch."""
    model.train()
    model(images)
    return model.eval()


def test_seed_config_gives_a_32_by_32_grid_of_4096_codes():
    cfg = load_config(CONFIG_DIR / "vqvae_naruto.yaml")
    model = build_model(cfg)
    images = torch.rand(1, 3, 128, 128) * 2 - 1
    trained_codebook(model, images)
    codes = model.encode(images)
    assert codes.shape == (1, 32, 32) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 4096
    assert model.decode(codes).shape == (1, 3, 128, 128)


@pytest.mark.parametrize("num_downsamples, grid", [(1, 16), (2, 8), (3, 4)])
def test_forward_shapes(num_downsamples, grid):
    model = build_model(model_config(num_downsamples)).train()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    recon, q = model(images)
    assert recon.shape == images.shape
    assert q.quantized.shape == (3, 16, grid, grid) and q.indices.shape == (3, grid, grid)
    assert q.loss.dim() == 0 and q.perplexity.dim() == 0 and q.usage.dim() == 0


def test_stage_widths_double_up_to_the_hidden_width():
    assert stage_widths(128, 2) == [64, 128]
    assert stage_widths(64, 3) == [16, 32, 64]


def test_gradients_reach_the_encoder_through_the_quantizer():
    model = build_model(model_config()).train()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, q = model(images)
    ((recon - images).square().mean() + q.loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder.net[0].weight.grad.abs().sum() > 0


def test_encode_then_decode_codes_matches_the_forward_pass():
    model = build_model(model_config())
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    trained_codebook(model, images)
    with torch.no_grad():
        recon, q = model(images)
    codes = model.encode(images)
    assert torch.equal(codes, q.indices)
    torch.testing.assert_close(model.decode(codes), recon)


def test_code_vectors_quantize_back_to_their_own_codes():
    model = build_model(model_config())
    trained_codebook(model, torch.rand(8, 3, 32, 32) * 2 - 1)
    codes = torch.randint(0, 64, (2, 8, 8))
    vectors = model.quantizer.decode(codes).permute(0, 3, 1, 2)
    with torch.no_grad():
        again = model.quantizer(vectors).indices
    # two codes may coincide only if the batch the codebook was seeded from repeated a vector
    same = model.quantizer.codebook.codes[again] == model.quantizer.codebook.codes[codes]
    assert same.all()


def test_encode_never_moves_the_codebook_even_in_training_mode():
    model = build_model(model_config())
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    trained_codebook(model, images).train()
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    model.encode(images)
    assert model.quantizer.training
    for k, v in model.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k
