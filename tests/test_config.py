"""The typed config: the shipped files load, mistakes name the key and where it came from, overrides apply."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from vqvae.checkpoint import save_checkpoint
from vqvae.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    validate,
)
from vqvae.model import VQVAE, build_model
from vqvae.resume import load_model
from vqvae.train import parse_args

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_naruto_config_holds_the_seed_numbers():
    cfg = load_config(CONFIG_DIR / "vqvae_naruto.yaml")
    assert (cfg.data.source, cfg.data.name) == ("hf", "lambdalabs/naruto-blip-captions")
    assert cfg.data.image_size == 128 and cfg.model.num_downsamples == 2
    assert cfg.data.image_size // 2 ** cfg.model.num_downsamples == 32
    assert (cfg.model.embedding_dim, cfg.quantizer.num_codes) == (256, 4096)
    assert cfg.quantizer.decay == 0.99 and cfg.quantizer.commitment_weight == 0.25
    assert cfg.train.recon_loss in ("mse", "l1")


def test_quickstart_config_needs_no_network_and_logs_offline():
    cfg = load_config(CONFIG_DIR / "vqvae_quickstart.yaml")
    assert cfg.data.source == "builtin"
    assert cfg.wandb.mode == "offline"
    assert cfg.train.out_dir.startswith("runs/")


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.max_step' in .*run\.yaml.*'max_steps'"):
        load_config(path)


def test_unknown_section_names_the_file(tmp_path):
    path = write(tmp_path, "trainer:\n  max_steps: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'trainer' in .*run\.yaml"):
        load_config(path)


@pytest.mark.parametrize("text, key, expected", [
    ("train:\n  max_steps: ten\n", "train.max_steps", "int"),
    ("train:\n  max_steps: 1.5\n", "train.max_steps", "int"),
    ("train:\n  bf16: 1\n", "train.bf16", "bool"),
    ("optim:\n  lr: true\n", "optim.lr", "float"),
    ("wandb:\n  name: 2024\n", "wandb.name", "str"),
])
def test_mistyped_value_names_the_key_the_type_and_the_file(tmp_path, text, key, expected):
    with pytest.raises(ConfigError, match=rf"'{key}' in .*run\.yaml must be {expected}"):
        load_config(write(tmp_path, text))


def test_an_int_or_yaml_exponent_string_is_a_valid_float(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-3\n"))  # PyYAML reads this as a string
    assert cfg.optim.lr == 1e-3


@pytest.mark.parametrize("text, match", [
    ("wandb:\n  mode: sometimes\n", r"wandb\.mode must be one of online, offline, disabled"),
    ("data:\n  image_size: 126\n", r"data\.image_size \(126\) must be divisible"),
    ("quantizer:\n  decay: 1.0\n", r"quantizer\.decay must be a float in \[0\.0, 1\.0\), got 1\.0"),
    ("train:\n  batch_size: 0\n", r"train\.batch_size must be positive"),
    ("data:\n  source: folder\n", r"data\.path must name an image folder"),
    ("data:\n  val_split: validation\n", r"data\.val_split names a split of a hub dataset; data\.source is "
                                         r"'builtin'"),
    ("data:\n  source: hf\n  name: a/b\n  val_split: train\n", r"data\.val_split is data\.split \('train'\)"),
])
def test_values_out_of_range_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def test_overrides_from_the_command_line(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 10\n")
    args, overrides = parse_args(["--config", str(path), "--train.max_steps=50", "--set", "optim.lr=1e-3",
                                  "--train.bf16", "false", "--wandb.name=2024", "--resume"])
    cfg = load_config(args.config, overrides)
    assert cfg.train.max_steps == 50 and cfg.optim.lr == 1e-3 and cfg.train.bf16 is False
    assert cfg.wandb.name == "2024"  # a string key takes the text as written
    assert cfg.train.resume == "latest"


def test_bad_override_names_the_command_line(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.max_stepz' in command line"):
        load_config(path, ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match=r"'train\.max_steps' in command line must be int"):
        load_config(path, ["train.max_steps=lots"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(path, ["max_steps=3"])


def test_round_trip_through_a_checkpoint_dict():
    cfg = load_config(CONFIG_DIR / "vqvae_naruto.yaml")
    again = config_from_dict(config_to_dict(cfg), source="checkpoint x.pt")
    assert again == cfg
    with pytest.raises(ConfigError, match=r"'model\.widths' in checkpoint x\.pt"):
        config_from_dict({"model": {"widths": 3}}, source="checkpoint x.pt")


def test_defaults_are_valid():
    cfg = Config()
    validate(cfg, "defaults")
    apply_overrides(cfg, ["data.source=folder", "data.path=/somewhere"])
    validate(cfg, "defaults")


def _options_of(model) -> dict:
    layer = model.quantizer.layers[0]
    return {**dataclasses.asdict(model.quantizer.residual), **layer.options.as_dict()}


def test_every_option_is_set_from_yaml_and_round_trips_through_a_checkpoint_and_save_pretrained(tmp_path,
                                                                                                changed_options):
    """One source for every quantizer option (vqvae/quantizer/options.py): each is a YAML key, reaches the
    quantizer, and comes back unchanged through a checkpoint and a save_pretrained folder."""
    cfg = load_config(write(tmp_path, yaml.safe_dump({
        "model": {"embedding_dim": 16, "hidden_channels": 16, "residual_hidden": 8},
        "quantizer": changed_options, "wandb": {"mode": "disabled"}})))
    model = build_model(cfg)
    built = _options_of(model)
    assert {k: built[k] for k in changed_options} == changed_options
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "config": config_to_dict(cfg), "step": 0})
    from_checkpoint, _, _ = load_model(tmp_path / "ckpt.pt")
    assert _options_of(from_checkpoint) == built
    model.save_pretrained(tmp_path / "pretrained")
    assert _options_of(VQVAE.from_pretrained(tmp_path / "pretrained")) == built


@pytest.mark.parametrize("key, value, message", [
    ("ema_warmup_min_rows", -1, r"quantizer\.ema_warmup_min_rows must be an int >= 0, got -1"),
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
    cfg = load_config(write(tmp_path, "quantizer:\n  restart_count: null\n  codebook_dim: null\n"))
    assert cfg.quantizer.restart_count is None and cfg.quantizer.codebook_dim is None
    with pytest.raises(ConfigError, match="quantizer.decay"):
        load_config(write(tmp_path, "quantizer:\n  decay: null\n"))
