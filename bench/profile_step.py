"""Where one quantizer training step spends its time: the device's kernels, the host's torch ops, and the host's
Python, for a GPU loan to answer in seconds what a step's median alone cannot (is the step bound by the device or by
the host that launches its work?).

    python -m bench.profile_step --provider triton-exact --n 65536 --k 4096 --d 256 [--learning simvq]

The step is `bench.quantizer_step.make_step`'s (forward in train mode, codebook update, backward). It prints, after
a few warm-up steps:
  1. the step's wall time (host clock, device synchronised after each step; median) beside the device's busy time
     per step (the kernels' own times summed, from torch.profiler): their ratio says how much of the step the
     device spends waiting for the host;
  2. the torch ops and kernels with the most device time, and those with the most host time (torch.profiler);
  3. the Python functions with the most host time (cProfile), for the host-bound case.
On the CPU it runs too (Triton under its interpreter with a Triton provider), as a check that it works; its
figures there say nothing about a GPU.
"""

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.quantizer_step import OURS, PROVIDERS, make_step  # noqa: E402


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_seconds(step, device: str, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def device_busy_seconds(profile) -> float:
    """The kernels' and copies' own time over the profiled steps (0 on the CPU, where there are none): the device's
    events alone, as the profiler's own "Self CUDA time total" counts them (a torch op's row repeats its kernels')."""
    from torch.autograd import DeviceType  # noqa: PLC0415

    return sum(event.self_device_time_total for event in profile.key_averages()
               if event.device_type == DeviceType.CUDA and not event.is_user_annotation) / 1e6


def profile_ops(step, device: str, steps: int):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            step()
        synchronize(device)
    return profile


def python_host_time(step, device: str, steps: int, rows: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    synchronize(device)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return text.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=PROVIDERS, default="triton-exact")
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--learning", choices=("ema", "gradient", "simvq"), default=None,
                        help="how our codes learn (default: the quantizer's own default, EMA)")
    parser.add_argument("--steps", type=int, default=20, help="steps timed, and a quarter of them profiled")
    parser.add_argument("--rows", type=int, default=25, help="rows of each table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.learning and args.provider not in OURS:
        parser.error(f"--learning applies to our providers ({', '.join(OURS)}), not {args.provider}")
    torch.manual_seed(0)
    options = {"learning": args.learning} if args.learning else {}
    step = make_step(args.provider, args.n, args.k, args.d, args.device, options=options)
    wall_seconds(step, args.device, 3)  # the first step seeds the codebook; the next ones compile and allocate
    walls = wall_seconds(step, args.device, args.steps)
    profiled = max(1, args.steps // 4)
    profile = profile_ops(step, args.device, profiled)
    wall, busy = statistics.median(walls), device_busy_seconds(profile) / profiled
    learning = f", learning={args.learning}" if args.learning else ""
    print(f"# {args.provider}{learning}, N={args.n}, K={args.k}, D={args.d} on {args.device}"
          f" ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), torch {torch.__version__}")
    print(f"step wall (median of {args.steps}): {wall * 1e3:.3f} ms; device busy per step: {busy * 1e3:.3f} ms "
          f"({busy / wall:.0%} of the wall)")
    if args.device == "cuda":
        print(profile.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(python_host_time(step, args.device, profiled, args.rows))


if __name__ == "__main__":
    main()
