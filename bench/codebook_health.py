"""Codebook health at the seed configuration: does the codebook stay in use while the model trains?

Trains the seed architecture (`config/vqvae_naruto.yaml`'s model, quantizer and optimizer) on the built-in images
once per variant, with the same initial weights, the same batches and the same optimizer, and records at every
step the batch perplexity, the windowed perplexity (codes chosen over the last `train.usage_window` steps), batch
usage, dead codes, reconstruction and commitment loss, plus three numbers that show *why* a codebook collapses:
the spread of the encoder's outputs (rms distance of the batch's vectors from their mean), how far their mean moved
since the previous step, and how far it sits from the codebook's mean. At the end each variant is evaluated on the
whole validation split (loss, PSNR, perplexity, usage). Every variant writes `<out>/<variant>.csv`; the plot
`<out>/codebook_health.png` (perplexity and dead codes against steps, one line per run) and `<out>/summary.md`
are redrawn from every CSV in the folder, so variants can be run in separate calls (e.g. in the background) and
compared together.

    python -m bench.codebook_health --steps 600 --batch-size 64 --variants ours --out runs/health_b64
    python -m bench.codebook_health --steps 150 --batch-size 16 --variants ours,plain,vqp-recommended,vqp-plain
    python -m bench.codebook_health --steps 40 --batch-size 16 --variants ours,vqp-recommended --draw-seeds 11,12,13
    python -m bench.codebook_health --list                  # the variants
    python -m bench.codebook_health --plot-only --out runs/health_b16

Variants: `ours` is `VectorQuantizer` as the config builds it (the shipped defaults); `plain` switches every
health rule off (an empty rule list, `vqvae.quantizer.health.HEALTH_RULES_OFF`); `ours-no-<rule>` switches one rule
of `vqvae.quantizer.health` off (`ABLATIONS`: ema-warmup, ema-warmup-min-rows, kmeans-init, fit-weight,
affine-reparam, dead-code-restarts, usage-draws); `vqp-*` swap
vector-quantize-pytorch's `VectorQuantize` into the same model, with its recommended EMA settings
(`kmeans_init=True, threshold_ema_dead_code=2`, decay 0.99, commitment 0.25), its plain defaults, or at the config's
own quantizer settings (`vqp-as-configured`: codes' width, cosine, decay, threshold; for the large codebooks, where
a threshold of 2 rows would declare every code dead). That package is
several times slower on the CPU, so compare the peers at a small batch (16) and say which. Codes learned by gradient:
`ours-gradient`, `ours-simvq` (`vqvae.quantizer.learning`), each also `+rotation` (the rotation trick; `ours+rotation`: EMA
codes with it), against `vqp-learned` (`VectorQuantize(learnable_codebook=True, ema_update=False)`) and
`vqp-simvq` (its `SimVQ`), each with and without the rotation trick (that package's default is with it).

`--draw-seeds` repeats each variant with the random draws of the quantizer (its seeds, k-means's relocations, the
re-seeded codes) seeded anew after the model is built, so the model, data and optimizer stay the same; the runs are
written as `<variant>@<seed>.csv`, and the table and plot add their step-by-step mean as `<variant> (mean of n)`.
The table ends with the steps at which `ours` (or its mean) reads less than each peer (`vqp-*`).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():  # the kernels module must import; the torch backend runs on the CPU
        os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch import nn

from vqvae.cli import pick_device
from vqvae.config import Config, load_config
from vqvae.data import make_datasets, make_loader
from vqvae.model import build_model, quantizer_kwargs
from vqvae.quality import evaluate
from vqvae.quantizer import QuantizerOutput, VectorQuantizer
from vqvae.quantizer.health import ABLATIONS, HEALTH_RULES_OFF
from vqvae.quantizer.metrics import CodeUsage
from vqvae.train import make_optimizer, make_scheduler, train_step

SEED_CONFIG = Path(__file__).resolve().parents[1] / "config" / "vqvae_naruto.yaml"
COLUMNS = ("step", "perplexity", "window_perplexity", "usage", "window_usage", "dead_codes", "recon_loss",
           "vq_loss", "z_spread", "z_mean_shift", "code_mean_gap", "seconds")



def _ours(**overrides):
    def build(cfg: Config) -> nn.Module:
        return VectorQuantizer(**{**quantizer_kwargs(cfg), **overrides})
    return build


def _vqp(**settings):
    def build(cfg: Config) -> nn.Module:
        return PeerQuantizer(cfg.model.embedding_dim, cfg.quantizer.num_codes, **settings)
    return build


def _vqp_as_configured() -> Callable[[Config], nn.Module]:
    """The package's EMA `VectorQuantize` at the config's quantizer settings: its codes' width and l2 normalisation,
    decay, commitment weight and dead-code threshold, seeded by k-means on the first batch, with the
    straight-through estimator (its rotation trick off, as ours is by default)."""
    def build(cfg: Config) -> nn.Module:
        q = cfg.quantizer
        return PeerQuantizer(cfg.model.embedding_dim, q.num_codes, codebook_dim=q.codebook_dim,
                             use_cosine_sim=q.cosine, decay=q.decay, commitment_weight=q.commitment_weight,
                             threshold_ema_dead_code=q.dead_code_threshold, kmeans_init=True, rotation_trick=False)
    return build


VARIANTS = {
    "ours": _ours(),
    "plain": _ours(**HEALTH_RULES_OFF),  # no health rule at all
    # the ablation: each rule of vqvae.quantizer.health switched off on its own
    **{f"ours-no-{rule}": _ours(**off) for rule, off in ABLATIONS.items()},
    "ours-warmup10": _ours(ema_warmup_steps=10),
    "ours-threshold1": _ours(dead_code_threshold=1.0),
    "ours+error-draws": _ours(restart_draws="error"),
    "ours+dead-code-memory10": _ours(dead_code_memory=10),
    "ours+dead-code-memory30": _ours(dead_code_memory=30),
    "ours+dead-code-memory30+error-draws": _ours(dead_code_memory=30, restart_draws="error"),
    "ours+kmeans": _ours(init="kmeans++"),
    "ours+cosine": _ours(affine_reparam=False, cosine=True),
    "ours+codebook_dim32": _ours(codebook_dim=32),
    "ours+codebook_dim32+cosine": _ours(codebook_dim=32, affine_reparam=False, cosine=True),
    "plain+ema-warmup": _ours(**{**HEALTH_RULES_OFF, "ema_warmup": True}),
    "plain+affine-reparam": _ours(**{**HEALTH_RULES_OFF, "affine_reparam": True}),
    "vqp-recommended": _vqp(kmeans_init=True, threshold_ema_dead_code=2, decay=0.99, commitment_weight=0.25),
    "vqp-plain": _vqp(decay=0.99, commitment_weight=0.25),
    "vqp-as-configured": _vqp_as_configured(),
    # codes learned by gradient (vqvae.quantizer.learning), with the straight-through estimator or the rotation trick
    **{f"ours{learning}{rotation}": _ours(**({"learning": learning[1:], "affine_reparam": None} if learning else {}),
                                          rotation_trick=bool(rotation))
       for learning in ("", "-gradient", "-simvq") for rotation in ("", "+rotation") if learning or rotation},
    # the package's learned codebook (its loss: commitment_weight * mean((q - x)^2), both sides) and its SimVQ
    **{f"vqp-learned{rotation}": _vqp(learnable_codebook=True, ema_update=False, commitment_weight=0.25,
                                      rotation_trick=bool(rotation)) for rotation in ("", "+rotation")},
    **{f"vqp-simvq{rotation}": _vqp(simvq=True, rotation_trick=bool(rotation)) for rotation in ("", "+rotation")},
}


class PeerQuantizer(nn.Module):
    """vector-quantize-pytorch's `VectorQuantize` (or, `simvq=True`, its `SimVQ`, with that class's defaults: loss
    mean((sg[x] - q)^2) + 0.25 mean((x - sg[q])^2)) behind our quantizer's interface (channels-first in,
    `QuantizerOutput` out), so that it drops into the same VQ-VAE. Its dead codes: EMA count under its threshold
    (0 where it has none)."""

    def __init__(self, dim: int, num_codes: int, simvq: bool = False, **settings):
        super().__init__()
        import vector_quantize_pytorch as vqp  # noqa: PLC0415  (a test extra, not a dependency)

        if simvq:
            self.vq = vqp.SimVQ(dim=dim, codebook_size=num_codes, channel_first=True, **settings)
        else:
            self.vq = vqp.VectorQuantize(dim=dim, codebook_size=num_codes, accept_image_fmap=True, **settings)
        self.num_codes, self.threshold = num_codes, settings.get("threshold_ema_dead_code", 0)

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.codebook

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        quantized, indices, loss = self.vq(x)
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_codes).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * probs.clamp(min=1e-12).log()).sum())
        dead = (self.vq._codebook.cluster_size.reshape(-1) < self.threshold).sum() if self.threshold > 0 else \
            torch.zeros((), dtype=torch.int64)
        return QuantizerOutput(quantized, indices, loss.reshape(()), perplexity, (counts > 0).float().mean(), dead)


class FeatureWatch:
    """A forward pre-hook on the quantizer: statistics of the encoder's outputs that explain a collapse."""

    def __init__(self, quantizer: nn.Module):
        self.quantizer, self.last_mean, self.values = quantizer, None, {}
        quantizer.register_forward_pre_hook(self._hook)

    @torch.no_grad()
    def _hook(self, module, args):
        if not module.training:
            return
        rows = args[0].detach().float().movedim(1, -1).reshape(-1, args[0].shape[1])
        mean = rows.mean(dim=0)
        shift = float("nan") if self.last_mean is None else float((mean - self.last_mean).norm())
        codebook = module.codebook  # ours: a Codebook; vector-quantize-pytorch's: its codes
        codes = (codebook.codes if isinstance(codebook, nn.Module) else codebook).float()
        # (codes in another space than the input, codebook_dim's: no gap to measure)
        gap = float((codes.mean(dim=0) - mean).norm()) if codes.shape[1] == mean.shape[0] else float("nan")
        self.values = {"z_spread": float((rows - mean).square().sum(dim=1).mean().sqrt()), "z_mean_shift": shift,
                       "code_mean_gap": gap}
        self.last_mean = mean


def seed_config(batch_size: int | None, num_workers: int, overrides: list[str], path: Path = SEED_CONFIG) -> Config:
    """The config at ``path`` (the seed's by default) on the built-in images, at ``batch_size`` (None: its own)."""
    batch = [] if batch_size is None else [f"train.batch_size={batch_size}"]
    return load_config(path, ["data.source=builtin", f"data.num_workers={num_workers}", *batch, *overrides])


def run_variant(name: str, cfg: Config, steps: int, out_dir: Path, log_every: int, draw_seed: int | None = None
                ) -> dict:
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)  # the same initial weights for every variant
    torch.manual_seed(cfg.train.seed + 1)
    model.quantizer = VARIANTS[name](cfg)
    model.to(device)
    if draw_seed is not None:  # only the quantizer draws from the global RNG from here on (the loader has its own)
        torch.manual_seed(draw_seed)
        name = f"{name}@{draw_seed}"
    watch = FeatureWatch(model.quantizer)
    optimizer, scheduler = make_optimizer(model, cfg), None
    scheduler = make_scheduler(optimizer, cfg)  # the config's schedule: warm-up, then cosine to train.max_steps
    train_set, val_set = make_datasets(cfg.data, cfg.train.seed)
    batches = iter(make_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, seed=cfg.train.seed))
    usage = CodeUsage(cfg.quantizer.num_codes, cfg.train.usage_window, device)
    path = out_dir / f"{name}.csv"
    start = time.perf_counter()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for step in range(1, steps + 1):
            out = train_step(model, batches, optimizer, scheduler, cfg, device, usage)
            usage.advance()
            row = {"step": step, **{k: float(v) for k, v in out.items() if k in COLUMNS}, **watch.values,
                   "seconds": time.perf_counter() - start}
            writer.writerow({k: _fmt(row.get(k, float("nan"))) for k in COLUMNS})
            f.flush()
            if step % log_every == 0 or step == steps:
                print(f"{name} step {step}: ppl {row['perplexity']:.0f} (window {row.get('window_perplexity', float('nan')):.0f}) "
                      f"usage {row['usage']:.2f} dead {row['dead_codes']:.0f} recon {row['recon_loss']:.4f} "
                      f"spread {row['z_spread']:.3g} shift {row['z_mean_shift']:.3g} gap {row['code_mean_gap']:.3g}"
                      f" [{row['seconds']:.0f} s]", flush=True)
    val_loader = make_loader(val_set, cfg.train.batch_size, cfg.data.num_workers, train=False)
    val, _ = evaluate(model, val_loader, cfg, device)
    summary = {"variant": name, "steps": steps, "batch_size": cfg.train.batch_size,
               "num_codes": cfg.quantizer.num_codes, "val_rows": val_rows(val_set, cfg),
               **{f"val_{k}": v for k, v in val.items()}, "seconds": time.perf_counter() - start}
    with open(out_dir / f"{name}.val.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary))
        writer.writeheader()
        writer.writerow(summary)
    print(f"{name} validation: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()), flush=True)
    return summary


def val_rows(val_set, cfg: Config) -> int:
    """Vectors the validation split gives the quantizer: crops x latent positions (x layers)."""
    side = cfg.data.image_size // 2 ** cfg.model.num_downsamples
    return len(val_set) * side * side * cfg.quantizer.num_quantizers


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_runs(out_dir: Path) -> dict[str, tuple[list[dict], dict | None]]:
    runs = {}
    for path in sorted(out_dir.glob("*.csv")):
        if path.name.endswith(".val.csv"):
            continue
        name = path.stem
        with open(path) as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        val_path = out_dir / f"{name}.val.csv"
        val = None
        if val_path.exists():
            with open(val_path) as f:
                val = next(csv.DictReader(f), None)
        if rows:
            runs[name] = (rows, val)
    return runs


def run_group(name: str) -> str:
    """The variant a run belongs to: `ours@12`, `ours (mean of 3)` and `ours` are all `ours`."""
    return name.split("@", 1)[0].split(" ", 1)[0]


def with_means(runs: dict) -> dict:
    """The runs, with the step-by-step mean of every variant run with several draw seeds in place of its draws."""
    groups: dict[str, list[str]] = {}
    for name in runs:
        groups.setdefault(run_group(name), []).append(name)
    out = {}
    for group, names in groups.items():
        if len(names) == 1:
            out[names[0]] = runs[names[0]]
        else:
            out[f"{group} (mean of {len(names)})"] = mean_run([runs[name] for name in names])
    return out


def mean_run(members: list) -> tuple[list[dict], dict | None]:
    """Every column averaged step by step over the runs (up to the shortest), and their validation figures."""
    steps = min(len(rows) for rows, _ in members)
    rows = [{k: sum(r[i][k] for r, _ in members) / len(members) for k in members[0][0][i]} for i in range(steps)]
    vals = [val for _, val in members]
    if any(val is None for val in vals):
        return rows, None
    keys = [k for k in vals[0] if k.startswith("val_") or k == "num_codes"]
    return rows, {k: sum(float(val[k]) for val in vals) / len(vals) for k in keys}


def steps_below(runs: dict) -> str:
    """For each peer (`vqp-*`): the steps at which ours reads a lower perplexity than it (the issue's comparison)."""
    ours = [name for name in runs if run_group(name) == "ours"]
    if len(ours) != 1:
        return ""
    ours_ppl = {int(r["step"]): r["perplexity"] for r in runs[ours[0]][0]}
    lines = []
    for peer in (name for name in runs if run_group(name).startswith("vqp")):
        peer_ppl = {int(r["step"]): r["perplexity"] for r in runs[peer][0]}
        common = sorted(set(ours_ppl) & set(peer_ppl))
        lower = [s for s in common if ours_ppl[s] < peer_ppl[s]]
        lines.append(f"{ours[0]} reads less than {peer} at {len(lower)} of {len(common)} steps"
                     + (f": {', '.join(map(str, lower))}" if lower else ""))
    return "\n".join(lines)


def summary_table(runs: dict, checkpoints=(1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500, 600)) -> str:
    """Markdown: perplexity at chosen steps, its minimum after step 1, the window perplexity, dead codes and losses
    at the last step, and the validation figures."""
    lines = []
    longest = max(len(rows) for rows, _ in runs.values())
    steps = [s for s in checkpoints if s <= longest]
    lines.append("| variant | " + " | ".join(f"ppl @{s}" for s in steps)
                 + " | min ppl (step > 1) | window ppl @end | window usage @end | dead @end "
                 "| recon @end (mean of last 10) | val PSNR | val ppl | val ppl / K | val usage | val vectors / K |")
    lines.append("| --- |" + " ---: |" * (len(steps) + 10))
    for name, (rows, val) in runs.items():
        by_step = {int(r["step"]): r for r in rows}
        ppl = [f"{by_step[s]['perplexity']:.0f}" if s in by_step else "" for s in steps]
        later = [r["perplexity"] for r in rows if r["step"] > 1]
        recon = sum(r["recon_loss"] for r in rows[-10:]) / len(rows[-10:])
        v = " | | | | "
        if val:
            k = float(val.get("num_codes") or "nan")  # (runs recorded before it was written: blank)
            per_code = float(val.get("val_rows") or "nan") / k
            v = (f"{float(val['val_psnr']):.2f} | {float(val['val_perplexity']):.0f} | "
                 f"{_blank_nan(float(val['val_perplexity']) / k, '.3f')} | {float(val['val_usage']):.3f} | "
                 f"{_blank_nan(per_code, '.0f')}")
        lines.append(f"| {name} | " + " | ".join(ppl) + f" | {min(later) if later else float('nan'):.0f} | "
                     f"{rows[-1]['window_perplexity']:.0f} | {rows[-1]['window_usage']:.3f} | "
                     f"{rows[-1]['dead_codes']:.0f} | {recon:.4f} | {v} |")
    return "\n".join(lines)


def _blank_nan(value: float, spec: str) -> str:
    return "" if value != value else format(value, spec)


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415  (only the plot needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax_ppl, ax_dead) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, (rows, _) in runs.items():
        steps = [r["step"] for r in rows]
        line, = ax_ppl.plot(steps, [r["perplexity"] for r in rows], label=name, linewidth=1.2)
        ax_dead.plot(steps, [r["dead_codes"] for r in rows], label=name, color=line.get_color(), linewidth=1.2)
    ax_ppl.set(yscale="log", xlabel="step", ylabel="training perplexity (batch)", title="perplexity")
    ax_ppl.axhline(50, color="red", linestyle=":", linewidth=1)
    ax_ppl.axhline(1000, color="green", linestyle=":", linewidth=1)
    ax_dead.set(xlabel="step", ylabel="dead codes (before re-seeding)", title="dead codes")
    ax_ppl.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out_dir: Path) -> None:
    runs = read_runs(out_dir)
    if not runs:
        sys.exit(f"no runs (*.csv) in {out_dir}")
    runs = with_means(runs)
    table = summary_table(runs)
    comparison = steps_below(runs)
    if comparison:
        table += "\n\n" + comparison
    (out_dir / "summary.md").write_text(table + "\n")
    print(table)
    try:
        plot(runs, out_dir / "codebook_health.png", f"codebook health, seed configuration ({out_dir.name})")
        print(f"plot: {out_dir / 'codebook_health.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="ours,plain", help="comma-separated names (see --list)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (64 for the seed's)")
    parser.add_argument("--config", type=Path, default=SEED_CONFIG,
                        help="the config whose model, quantizer and optimizer to train (default: the seed's)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/codebook_health"))
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of the seed config (repeatable)")
    parser.add_argument("--draw-seeds", default="", metavar="S,S,...",
                        help="run each variant once per seed of the quantizer's random draws (see above)")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot and table from --out's CSVs")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(VARIANTS))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        try:
            draw_seeds = [int(s) for s in args.draw_seeds.split(",") if s.strip()] or [None]
        except ValueError:
            parser.error(f"--draw-seeds takes comma-separated ints, got {args.draw_seeds!r}")
        cfg = seed_config(args.batch_size, args.num_workers, args.set, args.config)
        for name in names:
            for draw_seed in draw_seeds:
                run_variant(name, cfg, args.steps, args.out, args.log_every, draw_seed)
    report(args.out)


if __name__ == "__main__":
    main()
