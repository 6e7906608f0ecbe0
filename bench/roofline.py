"""Roofline of the quantizer's operations: what a shape costs, and the least time the device at hand could take.

A cost is a number of floating-point operations and the minimal number of bytes that must cross the memory bus
(each input read once, each output written once; nothing a perfect cache could avoid). The floor time of a cost
is max(flops / compute ceiling, bytes / bandwidth ceiling), and a benchmark reports `floor / measured`: 1.0 is on
the roofline, 0.25 is four times slower than the hardware allows.

The ceilings are measured, not taken from a datasheet: once per process and precision, on first use (the benchmarks
measure them all before the first case; `bench.gpu_report` measures them once and hands them to its later stages,
`adopt_ceilings`), as the best of several repetitions of
  bandwidth  a large copy within device memory (CUDA: device to device; CPU: a memcpy-like `copy_`), counting the
             bytes read plus the bytes written;
  compute    a large square matmul in that precision (8192 on CUDA; on the CPU the largest power of two up to 2048
             that a call finishes in about 0.2 s): "fp32" (IEEE, TF32 off), "tf32" (CUDA only), "bf16" and "fp16".
             "fp16" is the Triton search's arithmetic, in both modes: fp16 tensor-core operands, fp32 accumulation.
So a fraction is against what this machine actually sustains, a little above a datasheet's share of it. On a shared
CPU a ceiling measured while another process ran comes out low, and fractions above 1 are the sign of it.

`python -m bench.roofline --n 65536 --k 4096 --d 256 --dtype float32` prints the costs and floors of one shape.
"""

import argparse
import platform
import time
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_MATMUL_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float  # minimal bytes moved

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def nearest_code_cost(n: int, k: int, d: int, itemsize: int) -> Cost:
    """N x K dot products of length D; read x and the codebook, write an int64 index and an fp32 distance per row.

    For the Triton search these are the products of its fp16 tensor-core pass, which both modes make (its floor is
    the "fp16" one). `exact` then rescores in fp32 the rows that pass cannot certify: a few kept candidates (at
    most 2 x KEEP x D FLOPs a row: 0.13 GFLOP at the seed shape, 0.1% of the pass), or, for the rare row whose
    candidates do not settle it, every code within the pass's error bound. That work depends on the data and is
    left out of the floor, so `exact`'s fraction of the floor next to `fast`'s shows what it costs.
    """
    return Cost(flops=2.0 * n * k * d, bytes=float(n * d * itemsize + k * d * itemsize + n * (8 + 4)))


def code_stats_cost(n: int, k: int, d: int, itemsize: int) -> Cost:
    """Per-code counts and sums: read x and its int64 indices, write fp32 counts [K] and sums [K, D]; one add per
    element of x. (The deterministic mode's sort moves more, but the floor is the operation's, not a method's.)"""
    return Cost(flops=float(n * d), bytes=float(n * d * itemsize + n * 8 + k * (d + 1) * 4))


def ema_blend_cost(k: int, d: int) -> Cost:
    """The blend: read the counts, sums, cluster sizes and embed sums, write the cluster sizes, embed sums and the
    codebook (fp32; [K] for counts and sizes, [K, D] for the rest); a handful of operations per element."""
    return Cost(flops=float(5 * k * d), bytes=float((4 * k * d + 3 * k) * 4))


def ema_update_cost(n: int, k: int, d: int, itemsize: int) -> Cost:
    """Read x and its int64 indices; read and write ~3 fp32 K x D tensors (the batch sums, embed_sum, codebook).

    The arithmetic (one add per element of x, a handful per element of the state) is negligible next to the
    bytes: the floor of this operation is a bandwidth floor.
    """
    return Cost(flops=float(n * d + 5 * k * d), bytes=float(n * d * itemsize + n * 8 + 3 * k * d * 4 * 2))


def quantizer_step_cost(n: int, k: int, d: int, itemsize: int, layers: int = 1) -> Cost:
    """The training step is the search and the EMA update (the rest of the step is O(N D) elementwise work); a
    residual stack's is its layers' one after another."""
    one = nearest_code_cost(n, k, d, itemsize) + ema_update_cost(n, k, d, itemsize)
    return Cost(one.flops * layers, one.bytes * layers)


# -- measured ceilings ---------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _best_seconds(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: first-call allocation, library initialisation
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def _cpu_matmul_size(dtype: torch.dtype, max_n: int = 2048, call_s: float = 0.2) -> int:
    """The largest power-of-two size, at most max_n, whose square matmul is predicted to take under call_s, from the
    time of the size below it (doubling the size multiplies the time by eight). fp32 reaches max_n, the size from
    which a 2-core CPU sustains its rate (~0.15 s a call); a CPU without bf16 or fp16 instructions emulates them at
    1/60 of that rate or less, where max_n would take ~40 s a call (the benchmark session's first fixture waited
    minutes on it)."""
    n = 256
    while n < max_n:
        a = torch.randn(n, n).to(dtype)
        start = time.perf_counter()
        torch.mm(a, a)
        if 8 * (time.perf_counter() - start) >= call_s:
            break
        n *= 2
    return n


# Ceilings of this process, measured on first use or adopted from the process that measured them:
# (device, "bandwidth") -> bytes per second, (device, precision) -> FLOP per second.
_ceilings: dict[tuple[str, str], float] = {}


def precisions(device: str) -> tuple[str, ...]:
    """The precisions with a ceiling on this kind of device (tf32 is a CUDA tensor-core format)."""
    return PRECISIONS if device == "cuda" else tuple(p for p in PRECISIONS if p != "tf32")


def peak_bandwidth(device: str) -> float:
    """Bytes per second of a large copy (read + write), measured."""
    if (device, "bandwidth") not in _ceilings:
        numel = (1 << 30 if device == "cuda" else 1 << 28) // 4  # 1 GiB on a GPU, 256 MiB on the CPU: past every cache
        src = torch.ones(numel, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        seconds = _best_seconds(lambda: dst.copy_(src), device, repeats=10 if device == "cuda" else 20)
        _ceilings[device, "bandwidth"] = 2 * src.numel() * src.element_size() / seconds
    return _ceilings[device, "bandwidth"]


def peak_flops(device: str, precision: str) -> float:
    """Floating-point operations per second of a large square matmul in `precision`, measured."""
    if precision not in precisions(device):
        raise ValueError(f"precision on {device} must be one of {precisions(device)}, got {precision!r}")
    if (device, precision) not in _ceilings:
        _ceilings[device, precision] = _measure_matmul_flops(device, precision)
    return _ceilings[device, precision]


def _measure_matmul_flops(device: str, precision: str) -> float:
    dtype = _MATMUL_DTYPE[precision]
    n = 8192 if device == "cuda" else _cpu_matmul_size(dtype)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        # The best of many: on a shared CPU, a repetition that no other process disturbed is the measurement.
        seconds = _best_seconds(lambda: torch.mm(a, b, out=out), device, repeats=5 if device == "cuda" else 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2.0 * n**3 / seconds


def measure_ceilings(device: str) -> dict[str, float]:
    """Every ceiling of the device, measured now if not yet: {"bandwidth": B/s, precision: FLOP/s, ...}."""
    return {"bandwidth": peak_bandwidth(device), **{p: peak_flops(device, p) for p in precisions(device)}}


def adopt_ceilings(device: str, ceilings: dict[str, float]) -> None:
    """Use ceilings that another process of the same run measured (a `measure_ceilings` result), so that every
    process compares its figures with the same ceilings and none spends its time measuring them again."""
    unknown = set(ceilings) - {"bandwidth", *precisions(device)}
    if unknown:
        raise ValueError(f"unknown ceilings {sorted(unknown)} for {device}: expected bandwidth and "
                         f"{', '.join(precisions(device))}")
    _ceilings.update({(device, key): float(value) for key, value in ceilings.items()})


def floor_seconds(cost: Cost, device: str, precision: str) -> float:
    return max(cost.flops / peak_flops(device, precision), cost.bytes / peak_bandwidth(device))


def describe(cost: Cost, seconds: float, device: str, precision: str) -> dict:
    """Achieved rates, the ceilings they are measured against, and the fraction of the floor, for extra_info."""
    compute_s = cost.flops / peak_flops(device, precision)
    memory_s = cost.bytes / peak_bandwidth(device)
    floor = max(compute_s, memory_s)
    return {
        "flops": cost.flops,
        "min_bytes": cost.bytes,
        "tflops": cost.flops / seconds / 1e12,
        "gbps": cost.bytes / seconds / 1e9,
        "ceiling_tflops": peak_flops(device, precision) / 1e12,
        "ceiling_gbps": peak_bandwidth(device) / 1e9,
        "frac_peak_flops": compute_s / seconds,
        "frac_peak_bw": memory_s / seconds,
        "bound": "compute" if compute_s >= memory_s else "memory",
        "floor_s": floor,
        "frac_of_floor": floor / seconds,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(_ITEMSIZE), default="float32", help="dtype of x and the codebook")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="arithmetic of the dot products (the Triton search: fp16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    itemsize = _ITEMSIZE[args.dtype]
    print(f"{device_name(args.device)}: {peak_bandwidth(args.device) / 1e9:.1f} GB/s copy, "
          f"{peak_flops(args.device, args.precision) / 1e12:.3f} TFLOP/s {args.precision} matmul (measured)")
    for name, cost_fn in (("nearest_code", nearest_code_cost), ("ema_update", ema_update_cost),
                          ("quantizer_step", quantizer_step_cost)):
        cost = cost_fn(args.n, args.k, args.d, itemsize)
        print(f"{name:15s} {cost.flops / 1e9:10.2f} GFLOP {cost.bytes / 1e6:10.2f} MB  "
              f"floor {floor_seconds(cost, args.device, args.precision) * 1e3:9.3f} ms")


if __name__ == "__main__":
    main()
