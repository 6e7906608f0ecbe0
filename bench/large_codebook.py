"""One steady-state training forward of the quantizer at a large codebook, for the code of one or more checkouts,
each in a fresh process: the median time and how far the process's resident memory rose during a forward.

    python -m bench.large_codebook --k 262144 --d 32 --n 16384                    # this checkout
    python -m bench.large_codebook --k 262144 --d 32 --n 16384 --checkout /tmp/old --checkout .   # side by side

A forward is `VectorQuantizer(K, D, backend=...)` in train mode on N fresh random rows (N / 1024 images of 32 x 32
latents, channels last) with the quantizer's defaults: the search, the EMA statistics and blend, the dead codes'
restarts. The first forward seeds the codebook (and runs the Lloyd fit); it and one more are not timed. The
memory is the resident-set high-water mark above the level before the timed forwards, with glibc told to map every
allocation of 64 KiB or more on its own (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set.
The code measured is the `vqvae` package of each checkout (an older commit: `git worktree add /tmp/old <commit>`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Run in the fresh process, with the checkout's root first on sys.path: only torch and that checkout's vqvae.
MEASURE = r"""
import json, os, statistics, sys, time
import torch
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from vqvae.quantizer import VectorQuantizer

n, k, d, repeats, backend, device = json.loads(sys.argv[1])

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

torch.manual_seed(0)
quantizer = VectorQuantizer(k, d, backend=backend).to(device).train()
rows = lambda: torch.randn(max(n // 1024, 1), min(n, 1024), d, device=device)
with torch.no_grad():
    start = time.perf_counter()
    quantizer(rows())
    first = time.perf_counter() - start
    quantizer(rows())
    batches = [rows() for _ in range(repeats)]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    before = status("VmRSS")
    times = []
    for x in batches:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        quantizer(x)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    rise = status("VmHWM") - before
print(json.dumps({"first_forward_s": first, "median_s": statistics.median(times), "times_s": times,
                  "rss_rise_bytes": rise, "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def measure(checkout: Path, n: int, k: int, d: int, repeats: int, backend: str, device: str) -> dict:
    checkout = checkout.resolve()
    if not (checkout / "vqvae").is_dir() or not (checkout / "kernels").is_dir():
        raise SystemExit(f"--checkout {checkout}: no vqvae/ and kernels/ there (a checkout of this project?)")
    with tempfile.TemporaryDirectory() as links:
        # The checkout's own kernels under their import name (the folder kernels/ installs as vq_kernels), ahead of
        # any installed copy; a checkout from before the rename imports `kernels` from its own root.
        (Path(links) / "vq_kernels").symlink_to(checkout / "kernels", target_is_directory=True)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join([links, str(checkout)]))
        done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([n, k, d, repeats, backend, device])],
                              cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring {checkout} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"checkout": str(checkout), "commit": commit or "?", **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", type=int, default=262144)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards (the median is reported)")
    parser.add_argument("--backend", default="torch", choices=("torch", "triton", "auto"))
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--checkout", type=Path, action="append",
                        help="a checkout whose vqvae to measure (repeatable; default: this one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    checkouts = args.checkout or [Path(__file__).resolve().parents[1]]
    results = []
    print(f"one training forward, N={args.n} K={args.k} D={args.d}, backend {args.backend} on {args.device}")
    print("| checkout | commit | first forward (s) | median forward (s) | peak RSS rise (GiB) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for checkout in checkouts:
        r = measure(checkout, args.n, args.k, args.d, args.repeats, args.backend, args.device)
        results.append(r)
        print(f"| {r['checkout']} | {r['commit']} | {r['first_forward_s']:.2f} | {r['median_s']:.2f} | "
              f"{r['rss_rise_bytes'] / 2**30:.2f} |", flush=True)
    if len(results) > 1:
        print(f"speed-up of the last over the first: {results[0]['median_s'] / results[-1]['median_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _cuda() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
