"""save_pretrained / from_pretrained of the quantizers on their own (vqvae/quantizer/hub.py): a round trip is
bit-identical. (The VQ-VAE's folders, and their errors: tests/test_export.py.)"""

import json

import pytest
import torch

from vqvae.quantizer import VectorQuantizer
from vqvae.quantizer.residual import ResidualVectorQuantizer


@pytest.mark.parametrize("make", [
    lambda: VectorQuantizer(37, 12, decay=0.9, codebook_dim=5, dead_code_threshold=0.5, init="kmeans++"),
    lambda: ResidualVectorQuantizer(3, 29, 12, cosine=True, commitment_weight=0.5, layer_dropout=True),
], ids=["single", "residual"])
def test_quantizer_round_trip_is_bit_identical(tmp_path, make, train_a_few_steps, assert_same_state):
    quantizer = train_a_few_steps(make(), torch.randn(5, 41, 12))
    quantizer.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    loaded = type(quantizer).from_pretrained(tmp_path / "q")
    assert loaded.extra_repr() == quantizer.extra_repr() and config["dim"] == 12
    assert_same_state(quantizer, loaded)
    x = torch.randn(3, 7, 12)
    a, b = quantizer(x), loaded(x)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
