"""Every option of the quantizer, written once.

`QuantizerOptions` (one quantizer) and `ResidualOptions` (a stack of them) are frozen dataclasses, validated on
construction. Everything else is derived from them: the constructors' keywords (`VectorQuantizer(**options)`),
`extra_repr`, `config.json` of `save_pretrained`, the `quantizer:` section of the YAML config and its command-line
overrides (`vqvae.config` builds `QuantizerConfig` from these fields), and the model's quantizer arguments. A new
option is one field here, with its default, its check and its one-line meaning.

An invalid value raises `OptionError`, a ValueError that names the option; the config layer adds the file or flag.
"""

import dataclasses
import math
from dataclasses import KW_ONLY, dataclass, field

from vq_kernels import PRECISIONS

from vqvae.quantizer.layout import LAYOUTS
from vqvae.quantizer.learning import LEARNING_MODES

BACKENDS = ("auto", "triton", "torch")
RESTART_DRAWS = ("usage", "error", "uniform")
INITS = ("kmeans++", "random")


class OptionError(ValueError):
    """An invalid option value; `.name` is the option's name."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


def option(default, help: str, *, choices=None, low=None, high=None, open_low=False, open_high=False,
           config=True):
    """A field with its check: `choices`, or a range [low, high] (open ends with `open_low`/`open_high`).
    `config=False`: not a key of the YAML config (the model sets it)."""
    checks = {"choices": choices, "low": low, "high": high, "open_low": open_low, "open_high": open_high}
    return field(default=default, metadata={"help": help, "config": config, **checks})


@dataclass(frozen=True)
class QuantizerOptions:
    """The options of one quantizer (`VectorQuantizer`). Each health rule of the codebook (`vqvae.quantizer.health`)
    has its options here, named after it; its reasons are in its docstring."""

    num_codes: int = option(4096, "codes in the codebook", low=1)
    decay: float = option(0.99, "EMA decay of the codebook's counts and sums (at most; see ema_warmup)", low=0.0,
                          high=1.0, open_high=True)
    eps: float = option(1e-5, "Laplace smoothing of the EMA counts", low=0.0, open_low=True)
    commitment_weight: float = option(0.25, "weight of the commitment loss mean((x - sg[q])^2)", low=0.0)
    _: KW_ONLY
    backend: str = option("auto", "'triton' kernels, 'torch' reference, or 'auto' (triton on CUDA)",
                          choices=BACKENDS)
    precision: str = option("exact", "Triton search: 'exact' (fp32-exact argmin) or 'fast' (one fp16 pass)",
                            choices=PRECISIONS)
    deterministic: bool = option(False, "statistics summed in a fixed order (bit-equal runs) instead of atomics")
    init: str = option("random", "first-batch seeding: 'random' rows or 'kmeans++'", choices=INITS)
    kmeans_init_iters: int = option(10, "rule KMeansInit: k-means (Lloyd) iterations on the first batch; 0 = off",
                                    low=0)
    ema_warmup: bool = option(True, "rule EMAWarmup: decay min(decay, (1 + t) / (W + t)) at step t")
    ema_warmup_steps: int = option(200, "rule EMAWarmup: W of the warm-up", low=1)
    ema_warmup_min_rows: int = option(16, "rule EMAWarmup: rows per code its average holds at least (a floor on "
                                          "the decay at small batches); 0 = no floor", low=0)
    fit_weight_steps: int = option(16, "rule FitWeight (EMA codes): steps of rows the first fit weighs; 1 = off",
                                   low=1)
    affine_reparam: bool | None = option(None, "rule AffineReparam: codes follow the data's running moments; "
                                               "None = on for EMA codes unless cosine")
    dead_code_threshold: float = option(1.0, "rule DeadCodeRestarts: EMA rows per step under which a code is "
                                             "re-seeded; 0 = off", low=0.0)
    dead_code_memory: int = option(0, "rule DeadCodeMemory: deadness is read on an EMA count that remembers at "
                                      "least this many steps, whatever the warm-up's decay; 0 = off (read "
                                      "cluster_size)", low=0)
    restart_count: float | None = option(None, "rule DeadCodeRestarts: EMA count of a re-seeded code; None = its "
                                               "share of a step's rows", low=0.0, open_low=True)
    restart_draws: str = option("usage", "rule DeadCodeRestarts: which batch rows seed dead codes: in proportion "
                                         "to their code's count ('usage'), to their distance from it ('error'), "
                                         "or 'uniform'", choices=RESTART_DRAWS)
    codebook_dim: int | None = option(None, "search a learned projection to this many features; None = the "
                                            "input's own", low=1)
    cosine: bool = option(False, "l2-normalised vectors and codes: nearest = most similar direction")
    learning: str = option("ema", "how the codes learn: 'ema' (moving averages of their rows), 'gradient' (a "
                                  "parameter trained by the codebook loss), 'simvq' (a frozen base times a learned "
                                  "linear map)", choices=tuple(LEARNING_MODES))
    codebook_weight: float = option(1.0, "gradient and simvq: weight of the codebook loss mean((sg[x] - q)^2)",
                                    low=0.0)
    rotation_trick: bool = option(False, "the gradient through the quantizer by the rotation trick instead of "
                                         "the straight-through estimator")
    layout: str = option("auto", "input layout: (B, dim, *spatial), (..., dim), or 'auto'", choices=LAYOUTS,
                         config=False)

    def __post_init__(self):
        if self.affine_reparam is None:  # cosine codes live on the unit sphere, which is their frame; learned
            # codes are moved by their optimizer alone
            object.__setattr__(self, "affine_reparam", not self.cosine and self.learning == "ema")
        check_fields(self)
        if self.affine_reparam and self.cosine:
            raise OptionError("affine_reparam", "and cosine exclude each other: cosine codes live on the unit "
                                                "sphere (set affine_reparam to false or leave it unset)")
        if self.affine_reparam and self.learning != "ema":
            raise OptionError("affine_reparam", f"moves EMA codes; learning={self.learning!r} codes are moved by "
                                                "their optimizer (set affine_reparam to false or leave it unset)")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ResidualOptions:
    """The options of a residual stack (`ResidualVectorQuantizer`) besides its layers' `QuantizerOptions`."""

    num_quantizers: int = option(1, "residual layers, each quantizing what the ones before left; 1 = a single "
                                    "quantizer", low=1)
    shared_codebook: bool = option(False, "residual VQ: one codebook for every layer")
    layer_dropout: bool = option(False, "residual VQ: each training batch uses only the first q layers, q drawn "
                                        "uniformly from [min_layers, num_quantizers]")
    min_layers: int = option(1, "residual VQ: the fewest layers quantizer dropout keeps", low=1)

    def __post_init__(self):
        check_fields(self)
        if self.min_layers > self.num_quantizers:
            raise OptionError("min_layers", f"must be at most num_quantizers={self.num_quantizers}, got "
                                            f"{self.min_layers}")
        for name in ("shared_codebook", "layer_dropout"):
            if getattr(self, name) and self.num_quantizers == 1:
                raise OptionError(name, "needs residual layers: set num_quantizers above 1")


def check_fields(options) -> None:
    """Each field's type and its range or choices, as its `option(...)` declares them (an int given for a float
    field is stored as a float)."""
    for f in dataclasses.fields(options):
        if f.name == "_":
            continue
        value, meta = getattr(options, f.name), f.metadata
        if value is None and _allows_none(f.type):
            continue
        kind = _base_type(f.type)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # an int where a float is expected: a number all the same
            object.__setattr__(options, f.name, value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise OptionError(f.name, f"must be {_type_name(f.type)}, got {type(value).__name__} {value!r}")
        if meta["choices"] is not None and value not in meta["choices"]:
            raise OptionError(f.name, f"must be one of {meta['choices']}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise OptionError(f.name, f"must be finite, got {value}")
        if not _in_range(value, meta):
            raise OptionError(f.name, f"must be {_article(kind)} {_range_text(meta)}, got {value!r}")


def _in_range(value, meta) -> bool:
    low, high = meta["low"], meta["high"]
    if low is not None and (value <= low if meta["open_low"] else value < low):
        return False
    return high is None or (value < high if meta["open_high"] else value <= high)


def _range_text(meta) -> str:
    if meta["high"] is None:
        return f"{'>' if meta['open_low'] else '>='} {meta['low']}"
    left, right = "(" if meta["open_low"] else "[", ")" if meta["open_high"] else "]"
    return f"in {left}{meta['low']}, {meta['high']}{right}"


def _article(kind) -> str:
    return f"an {kind.__name__}" if kind.__name__[0] in "aeiou" else f"a {kind.__name__}"


def _allows_none(kind) -> bool:
    return type(None) in getattr(kind, "__args__", ())


def _base_type(kind) -> type:
    """int for `int | None`, the type itself otherwise."""
    args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
    return args[0] if args else kind


def _type_name(kind) -> str:
    return f"{_base_type(kind).__name__} or None" if _allows_none(kind) else kind.__name__


def config_fields(options_class) -> list[dataclasses.Field]:
    """The fields of an options class that are keys of the YAML config."""
    return [f for f in dataclasses.fields(options_class) if f.name != "_" and f.metadata["config"]]

