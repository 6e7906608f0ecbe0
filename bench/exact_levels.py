"""How many rows each level of the `exact` search settles: certified by the fp16 pass, rescored among its kept
candidates, or left to the fallback pass over the whole codebook (see `vq_kernels.nearest_code`).

    python -m bench.exact_levels                                  # random, offset and duplicated-code data
    python -m bench.exact_levels --checkpoint runs/quickstart/best.pt --checkpoint runs/naruto/best.pt
    python -m bench.exact_levels --checkpoint runs/quickstart/best.pt --save-rows tests/kernels/data/quickstart_rows.pt

It runs the kernel itself: on CUDA at the seed shape by default, on the CPU in Triton's interpreter (which pins
BLOCK_K = 64, as small as the GPU's smallest tile) at a reduced N. The fractions depend on the code-tile width,
so GPU runs with BLOCK_K = 128 can send a few more rows to the fallback. Each line also reports the largest excess
of the chosen code's fp64 distance over the fp64 minimum, relative to that minimum: a sanity check, which the
tests make properly.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def synthetic_sets(n: int, k: int, d: int, device: str) -> dict:
    torch.manual_seed(0)
    sets = {}
    for offset in (0.0, 4.0, 50.0):
        name = "random normal" if offset == 0 else f"random normal + {offset:g}"
        sets[name] = (torch.randn(n, d, device=device) + offset, torch.randn(k, d, device=device) + offset)
    # Each code twice, the copies in unrelated places; half the rows near a code, half anywhere.
    base = torch.randn(k // 2, d, device=device)
    codebook = torch.cat([base, base[torch.randperm(k // 2, device=device)]])
    near = base[torch.randint(0, k // 2, (n // 2,), device=device)] + 0.05 * torch.randn(n // 2, d, device=device)
    sets["duplicated codes (each twice)"] = (torch.cat([near, torch.randn(n - n // 2, d, device=device)]), codebook)
    return sets


def level_report(x: torch.Tensor, codebook: torch.Tensor) -> dict:
    import vq_kernels  # noqa: PLC0415  (after TRITON_INTERPRET is set)

    levels = torch.empty(x.shape[0], dtype=torch.int8, device=x.device)
    indices, _ = vq_kernels.nearest_code(x, codebook, "exact", levels=levels)
    counts = torch.bincount(levels.long(), minlength=3).tolist()
    worst = 0.0
    for start in range(0, x.shape[0], 4096):
        dist = torch.cdist(x[start : start + 4096].double(), codebook.double()).square()
        best = dist.min(dim=1).values
        got = dist.gather(1, indices[start : start + 4096, None]).squeeze(1)
        worst = max(worst, float(((got - best) / best.clamp(min=1e-30)).max()))
    return {"rows": x.shape[0], "certified": counts[0], "candidates": counts[1], "fallback": counts[2],
            "max_relative_excess": worst}


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=65536 if cuda else 2048, help="rows per data set")
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--checkpoint", action="append", default=[], help="encoder outputs of this checkpoint too")
    parser.add_argument("--save-rows", default="", help="save the (first checkpoint's) rows and codebook here")
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    sets = {} if args.skip_synthetic else synthetic_sets(args.n, args.k, args.d, device)
    for path in args.checkpoint:
        from bench.fast_mismatch import encoder_rows  # noqa: PLC0415

        x, codebook = encoder_rows(path, args.n)
        sets[f"encoder outputs of {path}"] = (x.detach().to(device), codebook.detach().to(device))
        if args.save_rows and path == args.checkpoint[0]:
            torch.save(tuple(t.detach().cpu().clone() for t in sets[f"encoder outputs of {path}"]), args.save_rows)
    for name, (x, codebook) in sets.items():
        r = level_report(x, codebook)
        share = {key: f"{100 * r[key] / r['rows']:.2f}%" for key in ("certified", "candidates", "fallback")}
        print(f"{name} (N={x.shape[0]}, K={codebook.shape[0]}, D={x.shape[1]}): certified {share['certified']}, "
              f"candidates {share['candidates']}, fallback {share['fallback']}; "
              f"max relative excess {r['max_relative_excess']:.2e}")


if __name__ == "__main__":
    main()
