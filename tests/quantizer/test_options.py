"""Every quantizer option, written once (vqvae/quantizer/options.py): checked by name, and kept by a save_pretrained
folder. (The YAML config and checkpoints: tests/test_config.py.)"""

import dataclasses

import pytest
import torch

from vqvae.quantizer import VectorQuantizer
from vqvae.quantizer.options import (
    OptionError,
    QuantizerOptions,
    ResidualOptions,
    config_fields,
)


def test_the_changed_values_cover_every_option_and_differ_from_the_defaults(changed_options):
    CHANGED = changed_options
    keys = [f.name for cls in (QuantizerOptions, ResidualOptions) for f in config_fields(cls)]
    assert sorted(keys) == sorted(CHANGED)
    defaults = {f.name: f.default for cls in (QuantizerOptions, ResidualOptions) for f in config_fields(cls)}
    assert all(CHANGED[k] != defaults[k] for k in keys)


def test_a_single_quantizer_saves_every_option(tmp_path, changed_options):
    options = {k: v for k, v in changed_options.items() if k in {f.name for f in dataclasses.fields(QuantizerOptions)}}
    quantizer = VectorQuantizer(dim=16, **options)
    quantizer(torch.randn(64, 16))
    quantizer.save_pretrained(tmp_path / "q")
    loaded = VectorQuantizer.from_pretrained(tmp_path / "q")
    assert loaded.options == quantizer.options and loaded.dim == 16
    assert torch.equal(loaded.codebook.codes, quantizer.codebook.codes)
    assert "restart_draws='uniform'" in repr(loaded)


@pytest.mark.parametrize("kwargs, message", [
    ({"codebook_dim": 0}, r"codebook_dim must be an int >= 1, got 0"),
    ({"decay": 1.0}, r"decay must be a float in \[0\.0, 1\.0\), got 1\.0"),
    ({"restart_draws": "often"}, r"restart_draws must be one of \('usage', 'error', 'uniform'\), got 'often'"),
    ({"learning": "hebbian"}, r"learning must be one of \('ema', 'gradient', 'simvq'\)"),
    ({"ema_warmup_min_rows": -1}, r"ema_warmup_min_rows must be an int >= 0"),
])
def test_a_bad_value_raises_an_option_error_naming_the_option(kwargs, message):
    with pytest.raises(OptionError, match=message) as caught:
        QuantizerOptions(**kwargs)
    assert caught.value.name == next(iter(kwargs))
