"""What the benchmark files share: the device, the shapes, which providers can run, one way to time and record.

Every case is a (provider, shape) pair. A provider that cannot run here (no CUDA, a package not installed, a
shape too slow for the CPU or too big for the memory) is still listed, as a skipped case with the reason, so that
`pytest -ra` says what was left out and why.
"""

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from bench import roofline

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
TRITON_SKIP = "Triton kernels need CUDA; the interpreter is not a benchmark"


@dataclass(frozen=True)
class Shape:
    n: int  # rows searched: images x latent height x latent width
    k: int  # codes
    d: int  # features per code

    def __str__(self) -> str:
        return f"N{self.n}-K{self.k}-D{self.d}"


SEED = Shape(65536, 4096, 256)  # the seed configuration: 64 images of 32 x 32 latents, 4096 codes of 256 features
# On the CPU, providers that are slow or materialise N x K matrices run at 16 images instead of 64 (see below).
CPU_STAND_IN = Shape(16384, 4096, 256)


def _sweeps(base: Shape, ns, ks, ds) -> list[Shape]:
    """The base shape, then one-at-a-time sweeps of N, K and D through it (the x-axes of a perf_report)."""
    shapes = [base]
    shapes += [Shape(n, base.k, base.d) for n in ns]
    shapes += [Shape(base.n, k, base.d) for k in ks]
    shapes += [Shape(base.n, base.k, d) for d in ds]
    return list(dict.fromkeys(shapes))


if ON_CUDA:
    SHAPES = _sweeps(SEED, ns=(4096, 16384, 65536, 262144), ks=(512, 4096, 16384, 65536), ds=(64, 256))
else:  # small enough that `pytest bench --benchmark-only` finishes in minutes on two cores
    SHAPES = [SEED, *_sweeps(CPU_STAND_IN, ns=(4096,), ks=(512,), ds=(64,))]

# Large codebooks: K from the seed's 4,096 to 2^18, at the dimensions large codebooks use (8, 32) and the
# seed's 256, for 64 images of 32 x 32 latents on CUDA and 16 on the CPU. Their own benchmark functions
# (`-k large_codebook`); on the CPU only with BENCH_LARGE_CODEBOOKS=1, as they take tens of minutes there.
LARGE_CODEBOOK_SHAPES = [Shape(SEED.n if ON_CUDA else CPU_STAND_IN.n, k, d)
                         for k in (4096, 16384, 65536, 262144) for d in (8, 32, 256)]
LARGE_CODEBOOKS_ON = ON_CUDA or os.environ.get("BENCH_LARGE_CODEBOOKS") == "1"

# Above this many multiply-adds (N K D), a provider marked `heavy` is skipped on the CPU: the seed shape costs it
# tens of seconds a round there, and CPU_STAND_IN measures the same code paths at a quarter of the rows.
CPU_MAX_WORK = CPU_STAND_IN.n * CPU_STAND_IN.k * CPU_STAND_IN.d


@dataclass(frozen=True)
class Provider:
    name: str
    precision: str  # arithmetic of its dot products, the roofline's ceiling: one of roofline.PRECISIONS
    dtype: torch.dtype = torch.float32  # of x (and the codebook, for the search)
    needs: tuple[str, ...] = ()  # "triton", "compile", or modules that must be importable
    cuda_only: str | None = None  # why it cannot run without CUDA
    heavy: bool = False  # skipped on the CPU above CPU_MAX_WORK
    bytes_per_nk: int = 0  # bytes it holds per element of the N x K matrix (distances, one-hot), for a fit check

    def __str__(self) -> str:
        return self.name


@functools.cache
def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if not ON_CUDA and not any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler, and none is on PATH"
    return None


@functools.cache
def _memory_bytes() -> int:
    if ON_CUDA:
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def skip_reason(provider: Provider, shape: Shape, *, interpreted_triton: bool = False) -> str | None:
    """Why the provider cannot run at this shape here, or None. interpreted_triton: let Triton providers run under
    the interpreter (`bench.gpu_report --smoke`, a check that every case still runs, not a measurement)."""
    interpreted = not ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
    if "triton" in provider.needs and interpreted and not interpreted_triton:
        return TRITON_SKIP
    if provider.cuda_only and not ON_CUDA:
        return provider.cuda_only
    for module in provider.needs:
        if module not in ("triton", "compile") and not installed(module):
            return f"{module} is not installed"
    if "compile" in provider.needs and (why := _compile_unavailable()):
        return why
    if provider.heavy and not ON_CUDA and shape.n * shape.k * shape.d > CPU_MAX_WORK:
        return f"too slow on the CPU at {shape}; {CPU_STAND_IN} stands in for the seed shape"
    if provider.bytes_per_nk * shape.n * shape.k > 0.7 * _memory_bytes():
        return (f"materialises N x K matrices (~{provider.bytes_per_nk * shape.n * shape.k / 2**30:.0f} GiB at "
                f"{shape}), more than this device's memory allows")
    return None


@dataclass(frozen=True)
class Operation:
    """One operation, benchmarked across providers: how each provider's call is made, and what it costs.

    make_case(provider, shape, device) returns (fn, make_args): one call is fn(*make_args()); make_args, untimed,
    makes the arguments afresh (state that fn changes in place starts anew). The pytest benchmarks and
    `bench.gpu_report` both time an operation through this, so they measure the same calls.
    """

    name: str
    providers: tuple[Provider, ...]
    make_case: Callable[[Provider, Shape, str], tuple[Callable, Callable[[], tuple]]]
    cost: Callable[[Shape, int], roofline.Cost]  # (shape, bytes per element of x) -> cost
    backward: bool = False  # its call runs a backward pass (a training step); otherwise it runs under no_grad

    def grad_mode(self):
        return contextlib.nullcontext() if self.backward else torch.no_grad()


def cases(providers, shapes=None, large_codebooks: bool = False) -> list:
    """pytest parameters (provider, shape) with readable ids (`-k eager-fp32`, `-k N16384`) and skip marks;
    `large_codebooks`: at LARGE_CODEBOOK_SHAPES."""
    params = []
    for shape in LARGE_CODEBOOK_SHAPES if large_codebooks else shapes or SHAPES:
        for provider in providers:
            reason = skip_reason(provider, shape)
            if large_codebooks and not LARGE_CODEBOOKS_ON:
                reason = "large codebooks on the CPU take tens of minutes: set BENCH_LARGE_CODEBOOKS=1"
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(provider, shape, id=f"{provider}-{shape}", marks=marks))
    return params


# -- timing and recording ------------------------------------------------------------------------------------


def synchronize() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


@functools.cache
def compiled(fn):
    """torch.compile(fn) once per process, allowing a recompilation per benchmarked shape and dtype."""
    import torch._dynamo  # noqa: PLC0415  (only providers that compile pay for the import)

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(fn, dynamic=False)


class ForeignLoad:
    """How many cores other processes kept busy while this one measured (Linux; None where /proc is missing).

    The CPU benchmarks use every core, so another process on the machine stretches them, and stretches code made of
    many short parallel operations most (each waits for the thread that was descheduled). This puts a number on it.
    """

    cores: float | None = None

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = [int(v) for v in f.read().rsplit(")", 1)[1].split()[11:15]]  # utime stime cutime cstime
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait (steal counts: the host took it)
        return time.monotonic(), busy, sum(own)

    def __enter__(self):
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        if self._start is not None and end is not None and end[0] > self._start[0]:
            ticks = (end[1] - self._start[1]) - (end[2] - self._start[2])
            self.cores = max(0.0, ticks / os.sysconf("SC_CLK_TCK") / (end[0] - self._start[0]))
        return False


# On a shared machine, BENCH_QUIET_WAIT_S=90 makes each case wait (up to that long) for other processes to go
# quiet before it is timed. Off by default: a dedicated benchmark machine has nothing to wait for.
QUIET_WAIT_S = float(os.environ.get("BENCH_QUIET_WAIT_S", "0"))
QUIET_CORES = 0.1


def wait_for_quiet(max_wait_s: float = QUIET_WAIT_S) -> None:
    """Return once other processes use under QUIET_CORES for a second, or after max_wait_s (then time anyway)."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        with ForeignLoad() as load:
            time.sleep(1.0)
        if load.cores is None or load.cores < QUIET_CORES:
            return


def median_seconds(fn, args=(), *, rep_ms: float = 100.0) -> float:
    """Median seconds of fn(*args), warm-up excluded, outside pytest-benchmark (`bench.gpu_report`).

    CUDA: `triton.testing.do_bench` (CUDA events, the L2 cache flushed before each call, calls filling ~rep_ms).
    CPU: wall-clock times of calls filling ~rep_ms, at least three, after one untimed call.
    """
    if ON_CUDA:
        from triton.testing import do_bench  # noqa: PLC0415

        return do_bench(lambda: fn(*args), warmup=25, rep=rep_ms, return_mode="median") / 1e3
    fn(*args)
    times, deadline = [], time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_benchmark(benchmark, fn, *, sync, setup=None, budget_s: float | None = None, max_rounds: int = 100):
    """Warm up `fn`, then time it with pytest-benchmark; returns the median in seconds (None when disabled).

    `setup()`, if given, returns the tuple of arguments for one call, made fresh and untimed before each round
    (state that `fn` mutates). `sync` ends each timed call, so a round lasts until the device has finished.
    The number of rounds fills about `budget_s` seconds, between 3 and `max_rounds`.
    """
    make_args = setup or (lambda: ())

    def timed(*args):
        fn(*args)
        sync()

    if benchmark.disabled:  # pytest-benchmark's --benchmark-disable: pedantic makes one plain call, a smoke test
        benchmark.pedantic(timed, setup=lambda: (make_args(), {}))
        return None
    timed(*make_args())  # warm-up: compiles, autotunes, allocates
    args = make_args()
    start = time.perf_counter()
    timed(*args)
    estimate = time.perf_counter() - start
    budget = budget_s if budget_s is not None else (1.0 if ON_CUDA else 1.5)
    rounds = max(3, min(max_rounds, int(budget / max(estimate, 1e-6))))
    wait_for_quiet()
    with ForeignLoad() as load:
        benchmark.pedantic(timed, setup=lambda: (make_args(), {}), rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info["foreign_cpu_cores"] = load.cores
    return benchmark.stats.stats.median


def peak_memory(fn, args=()) -> tuple[int, str]:
    """Peak bytes of tensors that one call of fn(*args) allocates above what was live before, and how it was read.

    CUDA: the caching allocator's own high-water mark (torch.cuda.max_memory_allocated after a reset).
    CPU: torch has no CPU allocator statistics, so the profiler's memory events are replayed: each tensor
    allocation and free during the call, whose running total peaks at the answer. Frees of tensors made before
    the call are not counted as gains, so this errs high, never low.
    """
    if ON_CUDA:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    return cpu_tensor_peak(fn, args), "torch.profiler memory events"


def cpu_tensor_peak(fn, args=()) -> int:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # "Total Allocated" is the profiler's running sum of the bytes allocated (less those freed) since it started.
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    return max(totals, default=0)


def case_info(provider: Provider, shape: Shape, cost: roofline.Cost, median_s, mem=None) -> dict:
    """The case, its roofline figures and its peak memory ((bytes, how read) from `peak_memory`), as a dict."""
    info = {
        "provider": provider.name,
        "n": shape.n, "k": shape.k, "d": shape.d,
        "dtype": str(provider.dtype).removeprefix("torch."),
        "precision": provider.precision,
        "device": roofline.device_name(DEVICE),
    }
    if median_s is not None:
        info["median_s"] = median_s
        info.update(roofline.describe(cost, median_s, DEVICE, provider.precision))
    if mem is not None:
        info["peak_mem_bytes"], info["peak_mem_method"] = mem
    return info


def record(benchmark, provider: Provider, shape: Shape, cost: roofline.Cost, median_s, mem=None) -> None:
    """Put the case, its roofline figures and its peak memory in the benchmark's extra_info."""
    benchmark.extra_info.update(case_info(provider, shape, cost, median_s, mem))


def benchmark_case(benchmark, operation: Operation, provider: Provider, shape: Shape) -> None:
    """A pytest-benchmark case: time one provider's call at one shape, read its peak memory, record both."""
    benchmark.group = f"{operation.name} {shape}"
    fn, make_args = operation.make_case(provider, shape, DEVICE)
    with operation.grad_mode():
        median = run_benchmark(benchmark, fn, sync=synchronize, setup=make_args)
        mem = peak_memory(fn, make_args()) if median is not None else None
    record(benchmark, provider, shape, operation.cost(shape, provider.dtype.itemsize), median, mem)


def measure_case(operation: Operation, provider: Provider, shape: Shape, rep_ms: float = 100.0) -> dict:
    """The same case outside pytest (`bench.gpu_report`): median (`median_seconds`), peak memory and roofline figures.
    The calls after the first reuse its arguments, so state changed in place carries on from call to call."""
    fn, make_args = operation.make_case(provider, shape, DEVICE)
    args = make_args()
    with operation.grad_mode():
        median = median_seconds(fn, args, rep_ms=rep_ms)
        mem = peak_memory(fn, args)
    cost = operation.cost(shape, provider.dtype.itemsize)
    return {"operation": operation.name, **case_info(provider, shape, cost, median, mem)}
