"""Typed configuration: dataclasses loaded from YAML, validated on load, overridable from the command line.

A config file has one mapping per section (``data``, ``model``, ``quantizer``, ``optim``, ``train``, ``wandb``);
any key may be left out and takes the default below. An unknown key, a value of the wrong type or a value out of
range is a ``ConfigError`` that names the key and where it came from (the file, the command line or a checkpoint).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vqvae.quantizer.options import (
    OptionError,
    QuantizerOptions,
    ResidualOptions,
    config_fields,
)


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    source: str = "builtin"  # "builtin" (scikit-image photos), "folder" (a local image folder) or "hf" (a hub dataset)
    name: str = ""  # hub dataset name, for source "hf"
    split: str = "train"  # hub split to train on
    val_split: str = ""  # hub split to validate on; "" = hold val_fraction of `split` out
    image_key: str = "image"  # hub column holding the images
    cache_dir: str = ""  # where the hub dataset is cached; "" = the datasets library's default
    path: str = ""  # image folder, for source "folder"
    image_size: int = 128
    crop_scale: float = 1.0  # random crops take a side in [crop_scale, 1] x the image's short side; 1 = whole image
    hflip: bool = True
    val_fraction: float = 0.05  # fraction of the images held out for validation (at least one), unless val_split
    # names a split of its own; "builtin" instead holds out the last quarter of every photo
    samples_per_epoch: int = 0  # crops drawn per epoch; 0 = one per training image (builtin: 1024)
    val_samples: int = 0  # validation crops; 0 = one per held-out image (builtin: 64)
    num_workers: int = 2


@dataclass
class ModelConfig:
    in_channels: int = 3
    hidden_channels: int = 128
    num_downsamples: int = 2  # stride-2 stages: 128 px -> 32 x 32 codes with 2
    residual_layers: int = 2
    residual_hidden: int = 64
    embedding_dim: int = 256


def _options_section(name: str, *options_classes) -> type:
    """A config section made of the YAML keys of options dataclasses (`vqvae.quantizer.options`): their one source."""
    fields = [(f.name, f.type, field(default=f.default, metadata=f.metadata))
              for cls in options_classes for f in config_fields(cls)]
    return dataclasses.make_dataclass(name, fields)


# The quantizer's options (vqvae/options.py), each with its default and meaning there.
QuantizerConfig = _options_section("QuantizerConfig", QuantizerOptions, ResidualOptions)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5  # cosine decay ends here at train.max_steps
    warmup_steps: int = 500
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping


@dataclass
class TrainConfig:
    out_dir: str = "runs/vqvae"
    max_steps: int = 20000
    # images per micro-batch on each process. Under torchrun this is per rank (torchrun's convention): one
    # optimizer step sees batch_size x world_size x grad_accum images
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per optimizer step
    recon_loss: str = "mse"  # "mse" or "l1"
    seed: int = 1337  # under torchrun, rank r draws its dead-code re-seed candidates from seed + r
    device: str = "auto"  # "auto" (cuda if available), "cuda", "cpu"; under torchrun, cuda means cuda:LOCAL_RANK
    bf16: bool = True  # bf16 autocast on CUDA; ignored on the CPU
    compile: bool = False  # torch.compile the encoder and decoder
    usage_window: int = 100  # steps over which "codes used" is counted
    eval_every: int = 1000
    eval_batches: int = 0  # validation batches per evaluation; 0 = the whole validation split
    # Besides PSNR and SSIM (always): "lpips", "rfid" or "lpips,rfid", when their weights are there
    # (vqvae/quality.py: where they are looked for; "" paths = torch hub's cache)
    eval_metrics: str = ""
    lpips_weights: str = ""  # torchvision's vgg16-397923af.pth
    inception_weights: str = ""  # torch-fidelity's weights-inception-2015-12-05-6726825d.pth
    ckpt_every: int = 1000
    keep_last: int = 3  # step checkpoints kept besides best.pt
    resume: str = "auto"  # "auto" (latest checkpoint in out_dir, if any), "never", or a checkpoint path


@dataclass
class WandbConfig:
    mode: str = "offline"  # "online", "offline" (sync later with `wandb sync`) or "disabled"
    project: str = "vqvae-triton"
    entity: str = ""
    name: str = ""  # run name; "" = the run folder's name


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES = {
    "data.source": ("builtin", "folder", "hf"),
    "train.recon_loss": ("mse", "l1"),
    "train.device": ("auto", "cuda", "cpu"),
    "wandb.mode": ("online", "offline", "disabled"),
}
POSITIVE = (
    "data.image_size", "model.in_channels", "model.hidden_channels", "model.num_downsamples",
    "model.residual_hidden", "model.embedding_dim",
    "train.max_steps", "train.batch_size", "train.grad_accum", "train.usage_window", "train.eval_every",
    "train.ckpt_every", "train.keep_last",
)
NON_NEGATIVE = (
    "data.samples_per_epoch", "data.val_samples", "data.num_workers", "model.residual_layers",
    "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.weight_decay",
    "optim.grad_clip", "train.eval_batches", "train.seed",
)
UNIT_INTERVAL = ("optim.beta1", "optim.beta2")  # open interval (0, 1)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply ``section.key=value`` overrides, validate, and return the Config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    cfg = config_from_dict(raw or {}, source=str(path), check=False)
    apply_overrides(cfg, overrides)
    validate(cfg, source=f"{path} (with command-line overrides)" if overrides else str(path))
    return cfg


def config_from_dict(raw: dict, source: str, check: bool = True) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    cfg = Config()
    for section, values in raw.items():
        if section not in _fields(cfg):
            raise ConfigError(f"unknown config section '{section}' in {source}{_suggest(section, _fields(cfg))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' in {source} must be a mapping, got {values!r}")
        sub = getattr(cfg, section)
        for key, value in values.items():
            _set(sub, f"{section}.{key}", key, value, source)
    if check:
        validate(cfg, source)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """Apply ``section.key=value`` strings; the value is parsed as YAML (``--train.bf16=false`` is a bool)."""
    for item in overrides:
        name, sep, text = item.partition("=")
        name = name.strip().removeprefix("--")
        if not sep or name.count(".") != 1:
            raise ConfigError(f"command-line override '{item}' must look like section.key=value")
        section, key = name.split(".")
        if section not in _fields(cfg):
            raise ConfigError(f"unknown config section '{section}' in command line{_suggest(section, _fields(cfg))}")
        sub = getattr(cfg, section)
        if key in _fields(sub) and _types(sub)[key] is str:
            value = text  # a string field takes the text as written, so --wandb.name=2024 stays "2024"
        else:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = text
        _set(sub, name, key, value, "command line")


def validate(cfg: Config, source: str) -> None:
    def get(name):
        section, key = name.split(".")
        return getattr(getattr(cfg, section), key)

    for name, choices in CHOICES.items():
        if get(name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)} (got {get(name)!r}) in {source}")
    for name in POSITIVE:
        if not get(name) > 0:
            raise ConfigError(f"{name} must be positive (got {get(name)!r}) in {source}")
    for name in NON_NEGATIVE:
        if get(name) < 0:
            raise ConfigError(f"{name} must not be negative (got {get(name)!r}) in {source}")
    for name in UNIT_INTERVAL:
        if not 0 < get(name) < 1:
            raise ConfigError(f"{name} must lie strictly between 0 and 1 (got {get(name)!r}) in {source}")
    if not 0 < cfg.data.crop_scale <= 1:
        raise ConfigError(f"data.crop_scale must lie in (0, 1] (got {cfg.data.crop_scale!r}) in {source}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must lie strictly between 0 and 1 "
                          f"(got {cfg.data.val_fraction!r}) in {source}")
    try:
        quantizer_options(cfg.quantizer)
    except OptionError as e:
        raise ConfigError(f"quantizer.{e.name} {e.problem} in {source}") from None
    if cfg.data.source == "hf" and not cfg.data.name:
        raise ConfigError(f"data.name must name a hub dataset when data.source is 'hf' in {source}")
    if cfg.data.source == "folder" and not cfg.data.path:
        raise ConfigError(f"data.path must name an image folder when data.source is 'folder' in {source}")
    if cfg.data.val_split and cfg.data.source != "hf":
        raise ConfigError(f"data.val_split names a split of a hub dataset; data.source is {cfg.data.source!r} "
                          f"(validation is held out of its images: leave data.val_split empty) in {source}")
    if cfg.data.val_split and cfg.data.val_split == cfg.data.split:
        raise ConfigError(f"data.val_split is data.split ({cfg.data.split!r}): validation would score the training "
                          f"images (leave it empty to hold data.val_fraction of them out) in {source}")
    unknown = {m.strip() for m in cfg.train.eval_metrics.split(",") if m.strip()} - {"lpips", "rfid"}
    if unknown:
        raise ConfigError(f"train.eval_metrics: unknown metric(s) {', '.join(sorted(unknown))} (choose from lpips, "
                          f"rfid, comma-separated; PSNR and SSIM are always reported) in {source}")
    factor = 2 ** cfg.model.num_downsamples
    if cfg.data.image_size < 11:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) is too small: SSIM's window needs at least "
                          f"11 pixels in {source}")
    if cfg.data.image_size % factor:
        raise ConfigError(f"data.image_size ({cfg.data.image_size}) must be divisible by 2**model.num_downsamples "
                          f"({factor}) in {source}")
    if cfg.model.hidden_channels % 2 ** (cfg.model.num_downsamples - 1):
        raise ConfigError(f"model.hidden_channels ({cfg.model.hidden_channels}) must be divisible by "
                          f"2**(model.num_downsamples - 1) in {source}")


def quantizer_options(section) -> tuple[QuantizerOptions, ResidualOptions]:
    """The options of the config's quantizer section, validated (OptionError names a bad one)."""
    values = dataclasses.asdict(section)
    split = [{f.name: values[f.name] for f in config_fields(cls)} for cls in (QuantizerOptions, ResidualOptions)]
    return QuantizerOptions(**split[0]), ResidualOptions(**split[1])


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _set(obj, name: str, key: str, value, source: str) -> None:
    types = _types(obj)
    if key not in types:
        raise ConfigError(f"unknown config key '{name}' in {source}{_suggest(key, types)}")
    expected = types[key]
    if value is None and type(None) in typing.get_args(expected):
        setattr(obj, key, value)
        return
    expected = next((t for t in typing.get_args(expected) if t is not type(None)), expected)  # int of int | None
    # bool is an int in Python; a YAML `true` for a number (or 1 for a flag) is a mistake worth reporting
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if expected is float and isinstance(value, str):
        # PyYAML reads 1e-3 (no dot) as a string, a trap worth stepping around; "ten" is still an error
        try:
            value, ok = float(value), True
        except ValueError:
            pass
    if not ok:
        raise ConfigError(f"config key '{name}' in {source} must be {expected.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    setattr(obj, key, value)


def _fields(obj) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _types(obj) -> dict[str, type]:
    return typing.get_type_hints(type(obj))


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
