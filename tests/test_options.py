"""One source for every quantizer option (vqvae/options.py): each is a YAML key, reaches the quantizer, and comes
back unchanged through a checkpoint and a save_pretrained folder."""

import dataclasses

import pytest
import torch
import yaml

from vqvae.checkpoint import save_checkpoint
from vqvae.config import ConfigError, config_to_dict, load_config
from vqvae.model import VQVAE, build_model
from vqvae.options import OptionError, QuantizerOptions, ResidualOptions, config_fields
from vqvae.quantizer import VectorQuantizerEMA
from vqvae.resume import load_model

# A valid value other than the default for every YAML key (cosine needs the frame off; the stack's options need
# layers), so that a key the config drops or the model ignores shows up as the default coming back.
CHANGED = {
    "num_codes": 32, "decay": 0.9, "eps": 1e-4, "commitment_weight": 0.5, "backend": "torch", "precision": "fast",
    "deterministic": True, "init": "kmeans++", "kmeans_iters": 3, "ema_warmup": False, "ema_warmup_steps": 50,
    "memory_rows": 8, "fit_weight_steps": 4, "affine_reparam": False, "dead_code_threshold": 0.5,
    "dead_code_memory": 10,    "restart_count": 2.0, "restart_draws": "uniform", "codebook_dim": 8, "cosine": True, "learning": "simvq",
    "codebook_weight": 0.5, "rotation_trick": True,
    "num_quantizers": 2, "shared_codebook": True, "layer_dropout": True, "min_layers": 2,
}


def test_the_changed_values_cover_every_option_and_differ_from_the_defaults():
    keys = [f.name for cls in (QuantizerOptions, ResidualOptions) for f in config_fields(cls)]
    assert sorted(keys) == sorted(CHANGED)
    defaults = {f.name: f.default for cls in (QuantizerOptions, ResidualOptions) for f in config_fields(cls)}
    assert all(CHANGED[k] != defaults[k] for k in keys)


def _yaml_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"embedding_dim": 16, "hidden_channels": 16, "residual_hidden": 8},
                                    "quantizer": CHANGED, "wandb": {"mode": "disabled"}}))
    return load_config(path)


def _options_of(model) -> dict:
    layer = model.quantizer.layers[0]
    return {**dataclasses.asdict(model.quantizer.residual), **layer.options.as_dict()}


def test_every_option_is_set_from_yaml_and_round_trips_through_a_checkpoint_and_save_pretrained(tmp_path):
    cfg = _yaml_config(tmp_path)
    model = build_model(cfg)
    built = _options_of(model)
    assert {k: built[k] for k in CHANGED} == CHANGED
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "config": config_to_dict(cfg), "step": 0})
    from_checkpoint, _, _ = load_model(tmp_path / "ckpt.pt")
    assert _options_of(from_checkpoint) == built
    model.save_pretrained(tmp_path / "pretrained")
    assert _options_of(VQVAE.from_pretrained(tmp_path / "pretrained")) == built


def test_a_single_quantizer_saves_every_option(tmp_path):
    options = {k: v for k, v in CHANGED.items() if k in {f.name for f in dataclasses.fields(QuantizerOptions)}}
    quantizer = VectorQuantizerEMA(dim=16, **options)
    quantizer(torch.randn(64, 16))
    quantizer.save_pretrained(tmp_path / "q")
    loaded = VectorQuantizerEMA.from_pretrained(tmp_path / "q")
    assert loaded.options == quantizer.options and loaded.dim == 16
    assert torch.equal(loaded.codebook, quantizer.codebook)
    assert "restart_draws='uniform'" in repr(loaded)


@pytest.mark.parametrize("key, value, message", [
    ("memory_rows", -1, r"quantizer\.memory_rows must be an int >= 0, got -1"),
    ("fit_weight_steps", 0, r"quantizer\.fit_weight_steps must be an int >= 1, got 0"),
    ("cosine", True, r"quantizer\.affine_reparam and cosine exclude each other"),
    ("backend", "cuda", r"quantizer\.backend must be one of"),
    ("restart_count", 0, r"quantizer\.restart_count must be a float > 0\.0"),
])
def test_a_bad_option_in_yaml_names_its_key_and_file(tmp_path, key, value, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"quantizer": {key: value, **({"affine_reparam": True} if key == "cosine"
                                                                  else {})}}))
    with pytest.raises(ConfigError, match=message + r".* in .*bad\.yaml"):
        load_config(path)


def test_null_is_a_value_for_the_options_that_take_none(tmp_path):
    cfg = load_config(_write(tmp_path, "quantizer:\n  restart_count: null\n  codebook_dim: null\n"))
    assert cfg.quantizer.restart_count is None and cfg.quantizer.codebook_dim is None
    with pytest.raises(ConfigError, match="quantizer.decay"):
        load_config(_write(tmp_path, "quantizer:\n  decay: null\n"))


def test_codebook_dim_zero_of_older_configs_means_no_projection():
    assert QuantizerOptions(codebook_dim=0).codebook_dim is None
    with pytest.raises(OptionError, match="codebook_dim must be an int >= 1"):
        QuantizerOptions(codebook_dim=-1)


def test_proportional_restarts_of_older_configs_and_folders_reads_as_restart_draws(tmp_path):
    cfg = load_config(_write(tmp_path, "quantizer:\n  proportional_restarts: false\n"))
    assert cfg.quantizer.restart_draws == "uniform"
    assert VectorQuantizerEMA(64, 8, proportional_restarts=True).options.restart_draws == "usage"


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path
