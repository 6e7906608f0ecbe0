"""The codebook rules' ablation table, from `bench.codebook_health` runs: does switching a rule off change anything
beyond the spread of the shipped quantizer's draws?

    python -m bench.codebook_health --variants ours --steps 150 --batch-size 16 --draw-seeds 11,12,13 --out runs/abl
    python -m bench.codebook_health --variants ours-no-kmeans-init --steps 150 --batch-size 16 --draw-seeds 11 --out runs/abl
    python -m bench.ablation runs/abl [runs/abl_flat ...]

For each folder: the range over `ours@<seed>` runs of three figures, and each `ours-no-<rule>@<seed>` run's figures,
marked where they fall outside that range (+ above, - below):
    min ppl    the lowest batch perplexity after step 1
    val PSNR   over the whole validation split at the end
    dead       codes found dead (and re-seeded) per step, the mean of the last 10 steps
A rule "changes nothing measurable" when, switched off, all three stay inside the range on every kind of data.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

FIGURES = ("min ppl", "val PSNR", "dead")


def figures(csv_path: Path) -> dict[str, float]:
    rows = list(csv.DictReader(csv_path.open()))
    val = list(csv.DictReader(csv_path.with_suffix(".val.csv").open()))[0]
    return {"min ppl": min(float(r["perplexity"]) for r in rows if int(r["step"]) > 1),
            "val PSNR": float(val["val_psnr"]),
            "dead": sum(float(r["dead_codes"]) for r in rows[-10:]) / len(rows[-10:]),
            "steps": int(rows[-1]["step"])}


def runs(folder: Path) -> dict[str, list[tuple[str, dict]]]:
    """variant -> [(seed, figures)] for every finished run (a CSV with its .val.csv) in the folder."""
    found = defaultdict(list)
    for path in sorted(folder.glob("*@*.csv")):
        if path.name.endswith(".val.csv") or not path.with_suffix(".val.csv").is_file():
            continue
        variant, seed = path.stem.rsplit("@", 1)
        found[variant].append((seed, figures(path)))
    return found


def _cell(value: float, low: float, high: float, fmt: str) -> str:
    mark = " +" if value > high else " -" if value < low else ""
    return fmt.format(value) + mark


def table(folder: Path) -> str:
    found = runs(folder)
    if "ours" not in found:
        raise SystemExit(f"{folder}: no ours@<seed> runs to take the spread from")
    fmts = {"min ppl": "{:.0f}", "val PSNR": "{:.2f}", "dead": "{:.0f}"}
    spread = {f: (min(r[f] for _, r in found["ours"]), max(r[f] for _, r in found["ours"])) for f in FIGURES}
    lines = [f"`{folder}`, {found['ours'][0][1]['steps']} steps",
             "", "| variant | draw | " + " | ".join(FIGURES) + " | outside the spread |", "| --- | --- |" + " ---: |" * 4]
    seeds = ", ".join(s for s, _ in found["ours"])
    lines.append(f"| ours (spread of {len(found['ours'])} draws) | {seeds} | "
                 + " | ".join(f"{fmts[f].format(spread[f][0])}-{fmts[f].format(spread[f][1])}" for f in FIGURES)
                 + " | |")
    for variant in sorted(v for v in found if v != "ours"):
        for seed, r in found[variant]:
            outside = [f for f in FIGURES if not spread[f][0] <= r[f] <= spread[f][1]]
            lines.append(f"| {variant} | {seed} | " + " | ".join(_cell(r[f], *spread[f], fmts[f]) for f in FIGURES)
                         + f" | {', '.join(outside) or 'none'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    for folder in parser.parse_args().folders:
        print(table(folder))


if __name__ == "__main__":
    main()
